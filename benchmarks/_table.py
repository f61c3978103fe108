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


def options_name(o: dict) -> str:
    """The engine's options in short: ``bf16+compile``, ``fp32``."""
    return "+".join([o["precision"]] + [k for k in ("channels_last", "compile") if o[k]])


def sampling_table(rows: list[dict]) -> list[str]:
    lines = [
        "| generator | size | T | strategy | options | s / batch | slice-samples/s | vs naive | vs batch_repeat "
        "| TFLOP/s (full-net) | executed TFLOP/s | peak TFLOP/s | executed / peak | peak MB | mean rel err | std rel err |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in rows:
        options = options_name(e["options"])
        lines.append(
            f"| {e.get('generator', 'unet')} | {e['image_size']} | {e['samples']} | {e['strategy']} | {options} | {e['seconds']:.2f} "
            f"| {e['slice_samples_per_s']:.1f} | {fmt(e.get('speedup_vs_naive_loop'), '.2f')} "
            f"| {fmt(e.get('speedup_vs_batch_repeat'), '.2f')} | {e['achieved_tflops']:.3f} | {e['executed_tflops']:.3f} "
            f"| {e['peak_tflops']:.3f} | {e['executed_fraction_of_peak']:.2f} | {e['peak_memory_mb']:.0f} "
            f"| {fmt(e.get('mean_rel_err'), '.1e')} | {fmt(e.get('std_rel_err'), '.1e')} |"
        )
    return lines


def _setup(e: dict) -> tuple:
    return e["image_size"], e["samples"], e["slices"], e["device"]


def _z_cell(e: dict, name: str) -> str:
    return f"{e[f'vs_engine_{name}_rms_z']:.2f}, {100 * e[f'vs_engine_{name}_beyond_3se']:.2f} %"


def peers_table(rows: list[dict]) -> list[str]:
    """benchmarks/test_peers.py: each strategy's rate, the engine's speed-up over it, and its maps' agreement.

    "engine / this" divides the engine's slice-samples per second by the
    row's, within the same set-up (size, T, slices, device).
    """
    lines = [
        "| size | T | strategy | package | s / batch | slice-samples/s | engine / this | engine_fast / this | peak MB "
        "| mean: RMS z, > 3 SE | std: RMS z, > 3 SE | agrees |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rates = {(_setup(e), e["strategy"]): e["slice_samples_per_s"] for e in rows}
    for e in rows:
        rate = e["slice_samples_per_s"]
        ratios = [rates.get((_setup(e), name)) for name in ("engine", "engine_fast")]
        ratios = [fmt(None if r is None else r / rate, ".2f") for r in ratios]
        options = f" ({options_name(e['options'])})" if e.get("options") else ""
        lines.append(
            f"| {e['image_size']} | {e['samples']} | {e['strategy']} | {e['package']} {e['package_version']}{options} "
            f"| {e['seconds']:.2f} | {rate:.1f} | {ratios[0]} | {ratios[1]} | {e['peak_memory_mb']:.0f} "
            f"| {_z_cell(e, 'mean')} | {_z_cell(e, 'std')} | {'yes' if e['vs_engine_agrees'] else '**no**'} |"
        )
    first = rows[0]
    lines.append(
        f"\nMonte Carlo noise alone (the engine against itself, other masks): mean {first['null_mean_rms_z']:.2f}, "
        f"{100 * first['null_mean_beyond_3se']:.2f} %; std {first['null_std_rms_z']:.2f}, "
        f"{100 * first['null_std_beyond_3se']:.2f} %. Tolerance: RMS z <= {fmt(first['tolerance_max_rms_z'], '.2f')} "
        f"and <= {100 * first['tolerance_max_beyond_3se']:.2f} % beyond 3 SE, for both maps."
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
    groups: dict[str, list[dict]] = {"sampling": [], "peers": [], "recalibration": [], "quality": []}
    for bench in document["benchmarks"]:
        info = bench["extra_info"]
        if info.get("suite") == "peers":
            groups["peers"].append(info)
        elif "strategy" in info:
            groups["sampling"].append(info)
        elif "method" in info:
            groups["recalibration"].append(info)
        elif "arm" in info:
            groups["quality"].append(info)
    print(f"{document['datetime']}, {document['machine_info'].get('cpu', {}).get('brand_raw', '')}")
    tables = (("sampling", sampling_table), ("peers", peers_table), ("recalibration", recalibration_table),
              ("quality", quality_table))
    for name, make in tables:
        if groups[name]:
            print(f"\n{name}\n")
            print("\n".join(make(groups[name])))


if __name__ == "__main__":
    main(sys.argv[1])
