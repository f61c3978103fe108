"""Markdown tables of a ``--benchmark-json`` file, as pasted into benchmarks/README.md.

    python -m benchmarks._table bench.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def fmt(value, spec: str = ".3g") -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def sampling_table(rows: list[dict]) -> list[str]:
    lines = [
        "| generator | size | T | strategy | options | s / batch | slice-samples/s | vs naive | vs batch_repeat "
        "| TFLOP/s (full-net) | executed TFLOP/s | peak TFLOP/s | executed / peak | peak MB | mean rel err | std rel err |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in rows:
        o = e["options"]
        options = "+".join([o["precision"]] + [k for k in ("channels_last", "compile") if o[k]])
        lines.append(
            f"| {e.get('generator', 'unet')} | {e['image_size']} | {e['samples']} | {e['strategy']} | {options} | {e['seconds']:.2f} "
            f"| {e['slice_samples_per_s']:.1f} | {fmt(e.get('speedup_vs_naive_loop'), '.2f')} "
            f"| {fmt(e.get('speedup_vs_batch_repeat'), '.2f')} | {e['achieved_tflops']:.3f} | {e['executed_tflops']:.3f} "
            f"| {e['peak_tflops']:.3f} | {e['executed_fraction_of_peak']:.2f} | {e['peak_memory_mb']:.0f} "
            f"| {fmt(e.get('mean_rel_err'), '.1e')} | {fmt(e.get('std_rel_err'), '.1e')} |"
        )
    return lines


def recalibration_table(rows: list[dict]) -> list[str]:
    lines = ["| fit | voxels | s (total) | s (fit only) | peak MB | max abs diff to the other fit |", "|---|---|---|---|---|---|"]
    for e in rows:
        lines.append(
            f"| {e['method']} | {e['voxels']:.0e} | {e['seconds']:.2f} | {e['fit_seconds']:.2f} | {e['peak_memory_mb']:.0f} "
            f"| {fmt(e.get('max_abs_diff_vs_other_fit'), '.1e')} |"
        )
    return lines


def quality_table(rows: list[dict]) -> list[str]:
    lines = [
        "| arm | stochastic layer | s | RMSE | PSNR | SSIM | cal. RMS before | after (isotonic / sigma / conformal) "
        "| CRPS | AUSE | PICP-95 | PICP-95 after |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in rows:
        after = " / ".join(fmt(v) for v in e["calibration_rms_after"].values())
        picp_after = " / ".join(fmt(v) for v in e["picp_95_after"].values())
        lines.append(
            f"| {e['arm']} | {e['stochastic_layer']} | {e['seconds']:.3f} | {e['rmse']:.2f} | {e['psnr']:.2f} | {e['ssim']:.3f} "
            f"| {e['calibration_rms_before']:.3f} | {after} | {e['crps']:.2f} | {e['ause']:.2f} | {fmt(e['picp_95'])} | {picp_after} |"
        )
    return lines


def main(path: str) -> None:
    document = json.loads(Path(path).read_text())
    groups: dict[str, list[dict]] = {"sampling": [], "recalibration": [], "quality": []}
    for bench in document["benchmarks"]:
        info = bench["extra_info"]
        if "strategy" in info:
            groups["sampling"].append(info)
        elif "method" in info:
            groups["recalibration"].append(info)
        elif "arm" in info:
            groups["quality"].append(info)
    print(f"{document['datetime']}, {document['machine_info'].get('cpu', {}).get('brand_raw', '')}")
    for name, make in (("sampling", sampling_table), ("recalibration", recalibration_table), ("quality", quality_table)):
        if groups[name]:
            print(f"\n{name}\n")
            print("\n".join(make(groups[name])))


if __name__ == "__main__":
    main(sys.argv[1])
