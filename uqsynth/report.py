"""The report: the paper's Figs. 2-7 for every arm, as PNGs and one offline HTML page.

Everything here is drawn from the evaluate stage's results (no sampling),
so ``uqsynth report RUN`` rebuilds it from the saved predictions:

- ``fig2_rmse.png``: per-subject volume RMSE per arm, with the paired t-test;
- ``fig3_examples_<arm>.png``: three slices of one test subject: T1w, true
  T2w, synthesized T2w, |error| and uncertainty (total std, and beside it
  its epistemic and aleatoric parts where the run saved them);
- ``fig4_error_vs_uncertainty_<arm>.png``: voxel, slice and volume level;
- ``fig5_sparsification.png``: RMSE of the voxels kept as the most uncertain
  are removed, with the oracle (removal by true error);
- ``fig6_7_calibration_<arm>.png``: calibration curves before and after each
  calibrator, with their RMS distance to y = x;
- ``fig8_subject_miscoverage.png``: each test subject's fraction of brain
  voxels outside the 90 % interval, per interval and arm, against alpha.

``report.html`` embeds the images (base64) and the tables (accuracy,
calibration, triage of the test volumes by nSTD, coverage per subject,
coverage and width per region, the spread of the std), and
says which subjects the calibrators were fitted on, so it opens offline
and can be mailed as one file.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display needed, and the same output everywhere
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from uqsynth._files import atomic_path, atomic_write_text  # noqa: E402
from uqsynth.evaluation import ArmEvaluation  # noqa: E402


def _save(figure: plt.Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(figure)
    return path


def figure_rmse(evaluations: dict[str, ArmEvaluation], ttest: dict | None, path: Path) -> Path:
    """Fig. 2: box plots of per-subject RMSE (brain mask, [0, 255])."""
    figure, axes = plt.subplots(figsize=(1.8 + 1.6 * len(evaluations), 4))
    values = [list(e.result["rmse_per_subject"].values()) for e in evaluations.values()]
    axes.boxplot(values, sym="r+")
    axes.set_xticks(range(1, len(values) + 1), list(evaluations))
    axes.set_ylabel("volume RMSE (brain, [0, 255])")
    title = "Synthesis accuracy per test subject"
    if ttest and ttest.get("p") is not None:
        title += f"\npaired t-test {ttest['arms'][0]} vs {ttest['arms'][1]}: p = {ttest['p']:.3g}"
    axes.set_title(title, fontsize=10)
    return _save(figure, path)


def _example_slices(mask: np.ndarray, axis: int, count: int = 3) -> list[int]:
    """Slices at the quartiles of the brain's extent along ``axis``."""
    area = mask.sum(axis=tuple(a for a in range(mask.ndim) if a != axis))
    present = np.flatnonzero(area > 0.25 * area.max())
    return [int(present[int(len(present) * q)]) for q in np.linspace(0.25, 0.75, count)]


#: Fig. 3's std columns: example key -> column title; the parts appear where the run saved them.
STD_COLUMNS = (("std", "uncertainty (total std)"), ("std_epistemic", "epistemic std"),
               ("std_aleatoric", "aleatoric std"))


def figure_examples(name: str, evaluation: ArmEvaluation, path: Path) -> Path:
    """Fig. 3: T1w, true T2w, synthesized, |error| and uncertainty on three slices.

    The uncertainty is the total std and, where the run saved them, its
    epistemic and aleatoric parts, on one colour scale (the total's
    maximum), so the columns compare at a glance.
    """
    example = evaluation.example
    axis = int(example["axis"])
    rows = _example_slices(example["mask"], axis)
    error = np.abs(example["mean"] - example["truth"]) * example["mask"]
    std_max = max(float(example["std"].max()), 1e-6)
    columns = [("T1w", example["source"], 1.0), ("true T2w", example["truth"], 1.0),
               ("synthesized T2w", example["mean"], 1.0), ("|error|", error, 0.5),
               *[(title, example[key], std_max) for key, title in STD_COLUMNS if key in example]]
    figure, axes = plt.subplots(len(rows), len(columns), figsize=(2.2 * len(columns), 2.2 * len(rows)),
                                layout="constrained")  # room for the figure title above the panels'
    for r, index in enumerate(rows):
        for c, (title, volume, vmax) in enumerate(columns):
            image = np.take(volume, index, axis=axis).T[::-1]  # superior-up display of the axial plane
            ax = axes[r, c]
            ax.imshow(image, cmap="gray" if c < 3 else "magma", vmin=0, vmax=vmax)
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=9)
        axes[r, 0].set_ylabel(f"slice {index}", fontsize=8)
    figure.suptitle(f"{name}: subject {example['subject']}", fontsize=10)
    return _save(figure, path)


def figure_levels(name: str, evaluation: ArmEvaluation, path: Path) -> Path:
    """Fig. 4: error against uncertainty at the voxel, slice and volume level."""
    result = evaluation.result
    first = next(iter(evaluation.evaluator.voxel_pairs_))
    abs_error, std = evaluation.evaluator.voxel_pairs_[first]
    slices = [(v, n) for s in result["subjects"].values() for v, n in zip(s["slices"]["nstd"], s["slices"]["nrmse"])]
    volumes = [(s["nstd"], s["nrmse"]) for s in result["subjects"].values()]
    levels = result["levels"]
    panels = [
        (f"voxel (subject {first})", std, abs_error, "std", "|error|", levels["voxel"]),
        ("slice", [a for a, _ in slices], [b for _, b in slices], "nSTD", "nRMSE", levels["slice"]),
        ("volume", [a for a, _ in volumes], [b for _, b in volumes], "nSTD", "nRMSE", levels["volume"]),
    ]
    figure, axes = plt.subplots(1, 3, figsize=(12, 3.6), layout="constrained")  # room for the figure title
    for ax, (title, x, y, xlabel, ylabel, stats) in zip(axes, panels):
        ax.scatter(x, y, s=2 if title.startswith("voxel") else 10, alpha=0.4 if title.startswith("voxel") else 0.8)
        pearson = stats.get("pearson")
        spearman = stats.get("spearman")
        ax.set_title(f"{title}\nPearson {_fmt(pearson)}, Spearman {_fmt(spearman)}", fontsize=9)
        ax.set_xlabel(xlabel), ax.set_ylabel(ylabel)
    figure.suptitle(f"{name}: error vs uncertainty", fontsize=10)
    return _save(figure, path)


def figure_sparsification(evaluations: dict[str, ArmEvaluation], path: Path) -> Path:
    """Fig. 5: precision-recall (sparsification) curves with their oracles."""
    figure, ax = plt.subplots(figsize=(6, 4))
    for index, (name, evaluation) in enumerate(evaluations.items()):
        curve = evaluation.result["sparsification"]
        color = f"C{index}"
        ax.plot(curve["recall"], curve["rmse"], color=color, label=f"{name} (AUSE {_fmt(curve['ause'])})")
        ax.plot(curve["recall"], curve["rmse_oracle"], color=color, linestyle="--", label=f"{name} oracle")
    ax.invert_xaxis()
    ax.set_xlabel("recall (fraction of voxels kept, most uncertain removed first)")
    ax.set_ylabel("RMSE of kept voxels ([0, 255])")
    ax.legend(fontsize=8)
    return _save(figure, path)


def figure_calibration(name: str, evaluation: ArmEvaluation, path: Path) -> Path:
    """Figs. 6-7: expected vs observed proportion below the predicted p-quantile."""
    result = evaluation.result
    figure, ax = plt.subplots(figsize=(4.6, 4.6))
    ax.plot([0, 1], [0, 1], color="0.6", linewidth=1)
    curves = {"before (Gaussian)": result["gaussian"]["calibration"]}
    curves.update({f"after {n}": c["calibration"] for n, c in result["calibrators"].items() if "calibration" in c})
    for label, curve in curves.items():
        ax.plot(curve["expected"], curve["observed"], marker=".", label=f"{label}: RMS {_fmt(curve['rms'])}")
    ax.plot([0.5], [0.5], marker="*", color="green", markersize=10, linestyle="none")
    ax.set_xlabel("expected confidence level"), ax.set_ylabel("observed confidence level")
    ax.set_title(f"{name}: calibration", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    return _save(figure, path)


#: The level whose per-subject miscoverage the report shows (the calibrators' default ``alpha = 0.1``).
MISCOVERAGE_LEVEL = "0.9"


def figure_subject_miscoverage(arms: dict, path: Path) -> Path:
    """Fig. 8: each test subject's fraction of brain voxels outside the 90 % interval, per interval and arm, against alpha.

    A subject-level calibrator promises that this fraction's expectation
    over new subjects is at most alpha (the dashed line); the spread of the
    points is what one patient can get.
    """
    panels = {name: a["subject_miscoverage"] for name, a in arms.items() if a.get("subject_miscoverage")}
    figure, axes = plt.subplots(1, len(panels), figsize=(0.6 + 2.6 * len(panels), 3.8), squeeze=False,
                                sharey=True, layout="constrained")
    rng = np.random.default_rng(0)  # the jitter only; the same figure every time
    for ax, (name, groups) in zip(axes[0], panels.items()):
        labels = list(groups)
        for x, group in enumerate(labels):
            numbers = groups[group][MISCOVERAGE_LEVEL]
            values = np.array(list(numbers["per_subject"].values()))
            ax.scatter(x + rng.uniform(-0.15, 0.15, values.size), values, s=10, alpha=0.7, color=f"C{x}")
            ax.plot([x - 0.3, x + 0.3], [numbers["mean"]] * 2, color="black", linewidth=1.5)
        alpha = next(iter(groups.values()))[MISCOVERAGE_LEVEL]["alpha"]
        ax.axhline(alpha, color="0.4", linestyle="--", linewidth=1, label=f"alpha = {alpha:g}")
        ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right", fontsize=8)
        ax.set_title(name, fontsize=9)
        ax.legend(fontsize=7, loc="upper right")
    axes[0, 0].set_ylabel(f"fraction of a subject's brain voxels\noutside the {MISCOVERAGE_LEVEL} interval")
    figure.suptitle("Per-subject miscoverage on the test subjects (bar: mean)", fontsize=10)
    return _save(figure, path)


def miscoverage_table(arms: dict) -> str:
    """Per arm and interval at 0.9: what it promises, and the test subjects' mean, worst and count above alpha."""
    rows = []
    for name, a in arms.items():
        guarantees = a.get("guarantees", {})
        for group, levels in a.get("subject_miscoverage", {}).items():
            numbers = levels[MISCOVERAGE_LEVEL]
            unit = guarantees.get(group, {}).get("unit") if group != "uncalibrated" else None
            rows.append([name, group, unit or "none", numbers["mean"], numbers["max"],
                         f"{numbers['above_alpha']} of {len(numbers['per_subject'])}"])
    if not rows:
        return "<p>No per-subject miscoverage was recorded.</p>"
    note = ("<p>Per test subject, the fraction of its brain voxels whose true intensity lies outside the central "
            "90 % interval; alpha = 0.1. A calibrator whose promise is about a subject (conformal_risk, risk_control) "
            "keeps the expected fraction of a new subject at most alpha (risk_control with probability 1 - delta "
            "over the calibration draw); one whose promise is about a voxel, or that makes none, does not speak of "
            "subjects at all. The mean is an estimate from the test subjects, not a proof.</p>")
    return note + _table(["arm", "interval", "promise about", "mean miscoverage", "worst subject",
                          "subjects above alpha"], rows)


def triage_section(arms: dict) -> str:
    """Per arm, the test volumes ranked by predicted nSTD beside their true nRMSE rank, and what a threshold flags.

    The paper's clinical use: with no ground truth, a reader checks the most
    uncertain volumes first. The threshold shown flags the top quarter by nSTD
    (at least one volume); it works as far as those are the volumes with the
    largest true error, which the last column and the sentence count.
    """
    parts = []
    for name, arm in arms.items():
        triage = arm.get("triage")
        if not triage:
            continue
        ranking = triage["ranking"]
        flagged = max(1, int(np.ceil(len(ranking) / 4)))
        threshold = ranking[flagged - 1]["nstd"]
        hits = sum(1 for row in ranking[:flagged] if row["nrmse_rank"] <= flagged)
        rows = [[rank, row["id"], row["nstd"], row["nrmse"], row["nrmse_rank"], "flagged" if rank <= flagged else ""]
                for rank, row in enumerate(ranking, start=1)]
        parts.append(
            f"<h3>{html.escape(name)}</h3><p>Spearman rank correlation of nSTD and nRMSE over the {len(ranking)} "
            f"test volumes: {_fmt(triage['spearman'])}. A threshold at nSTD &ge; {_fmt(threshold)} flags the "
            f"{flagged} most uncertain; {hits} of them are among the {flagged} with the largest true error.</p>"
            + _table(["nSTD rank", "volume", "nSTD", "nRMSE", "nRMSE rank", "threshold"], rows))
    if not parts:
        return "<p>Fewer than two test volumes: nothing to rank.</p>"
    note = ("<p>The test volumes ranked by their predicted uncertainty (nSTD, the RMS of the std on [0, 255]), "
            "most uncertain first, beside the rank of their true error (nRMSE; 1 = largest). "
            "<code>uqsynth predict</code> writes the same ranking for new volumes, with no truth, to "
            "<code>uncertainty_summary.csv</code>.</p>")
    return note + "".join(parts)


def _fmt(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and not np.isfinite(value)) else f"{value:.3g}"


def build_report(out_dir: Path, evaluations: dict[str, ArmEvaluation], document: dict, viewer: str = "") -> Path:
    """Write every figure and ``report.html`` (with ``viewer``, the slice viewer's HTML); return the HTML path."""
    figures: list[tuple[str, Path]] = [
        ("Fig. 2: accuracy", figure_rmse(evaluations, document.get("paired_ttest"), out_dir / "fig2_rmse.png"))
    ]
    for name, evaluation in evaluations.items():
        figures.append((f"Fig. 3: examples, {name}", figure_examples(name, evaluation, out_dir / f"fig3_examples_{name}.png")))
    for name, evaluation in evaluations.items():
        figures.append((f"Fig. 4: error vs uncertainty, {name}",
                        figure_levels(name, evaluation, out_dir / f"fig4_error_vs_uncertainty_{name}.png")))
    figures.append(("Fig. 5: sparsification", figure_sparsification(evaluations, out_dir / "fig5_sparsification.png")))
    for name, evaluation in evaluations.items():
        figures.append((f"Figs. 6-7: calibration, {name}",
                        figure_calibration(name, evaluation, out_dir / f"fig6_7_calibration_{name}.png")))
    if any(a.get("subject_miscoverage") for a in document["arms"].values()):
        figures.append(("Fig. 8: per-subject miscoverage",
                        figure_subject_miscoverage(document["arms"], out_dir / "fig8_subject_miscoverage.png")))
    page = render_html(document, figures, viewer)
    atomic_write_text(out_dir / "report.html", page)
    return out_dir / "report.html"


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(v) if isinstance(v, float) or v is None else str(v))}</td>"
                         for v in row) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _count(value) -> str:
    return "n/a" if value is None else ("none" if value == 0 else f"{value:,}")


def _first_calibrator(regions: dict) -> str | None:
    """The first calibrator an arm's regions were scored with (the configuration's order), or None."""
    first = next(iter(regions.values()), {})
    return next((name for name in first.get("picp_90", {}) if name != "uncalibrated"), None)


def region_table(arms: dict) -> str:
    """PICP-90 and mean 90 % width per region (rows) and arm, uncalibrated and after the arm's first calibrator.

    A dataset without region labels gives a sentence saying so instead.
    """
    with_regions = {name: a["regions"] for name, a in arms.items() if a.get("regions")}
    if not with_regions:
        return ("<p>No region labels: the dataset labels no region of the test subjects, so coverage is "
                "reported for the whole brain only.</p>")
    regions: dict[str, dict] = {}
    for per_region in with_regions.values():
        for region, numbers in per_region.items():
            regions.setdefault(region, numbers)
    header, columns = ["region", "voxels", "subjects"], []
    for name in with_regions:
        first = _first_calibrator(with_regions[name])
        groups = [("uncalibrated", "uncalibrated")] + ([(first, f"after {first}")] if first else [])
        for metric, label in (("picp_90", "PICP 90%"), ("width_90", "width 90%")):
            for group, group_label in groups:
                header.append(f"{name} {label} {group_label}")
                columns.append((name, metric, group))
    rows = []
    for region, numbers in regions.items():
        row = [region, _count(numbers["voxels"]), str(numbers.get("subjects", ""))]
        for name, metric, group in columns:
            row.append(with_regions[name].get(region, {}).get(metric, {}).get(group))
        rows.append(row)
    note = ("<p>Per region: the fraction of true intensities inside the central 90 % interval (PICP; 0.9 when "
            "calibrated) and the interval's mean width on [0, 255], pooled over the test subjects' voxels of the "
            "region (each voxel in the region of its label).</p>")
    return note + _table(header, rows)


def calibration_text(document: dict) -> str:
    """Which subjects the calibrators were fitted on, and how many (``metrics.json``'s ``calibration``)."""
    record = document.get("calibration")
    if not record:
        return "The subjects the calibrators were fitted on were not recorded."
    count = record.get("count")
    if record.get("subjects") == "train":
        which = f"the {count} training subject(s), as in the paper (calibration.subjects = \"train\")"
    elif record.get("subjects") == "held_out":
        which = (f"{count} held-out calibration subject(s), a split apart from training and test "
                 "(calibration.subjects = \"held_out\")")
    else:
        which = f"{count} subject(s) (calibration.subjects = {record.get('subjects')!r})"
    stride = record.get("slice_stride", 1)
    slices = f", one axial slice in {stride}" if stride > 1 else ""
    return f"Calibrators were fitted on {which}{slices}."


def spread_table(arms: dict) -> str:
    """The std in the brain per arm: its mean, and how many voxels have none (a point mass, left out of the NLL)."""
    floor = next((a.get("std_floor") for a in arms.values() if a.get("std_floor") is not None), None)
    below = f"brain voxels with total std < {floor:g}" if floor is not None else "brain voxels with total std below the floor"
    nll_names = sorted({c for a in arms.values() for c in a.get("nll_after", {})})
    rows = [[name, a.get("std_mean"), _count(a.get("brain_voxels")), _count(a.get("std_below_floor_voxels")),
             a.get("nll"), *[a.get("nll_after", {}).get(c) for c in nll_names]] for name, a in arms.items()]
    note = (f"<p>The Gaussian NLL is over the brain voxels whose std is resolved; the {html.escape(below)} "
            "are a point mass (every sample agreed), have no finite NLL, and are left out of it and counted "
            "here.</p>")
    return _table(["arm", "mean std (brain, [0, 255])", "brain voxels", below, "NLL (uncalibrated)",
                   *[f"NLL after {c}" for c in nll_names]], rows) + note


def render_html(document: dict, figures: list[tuple[str, Path]], viewer: str = "") -> str:
    """One self-contained page: summary tables, the slice viewer, then every figure embedded as base64 PNG."""
    arms = document["arms"]
    summary = _table(
        ["arm", "RMSE", "MAE", "PSNR (dB)", "SSIM", "CRPS", "NLL", "PICP 95%", "AUSE",
         "volume Spearman (nSTD vs nRMSE)", "learned p"],
        [[name, a["rmse_mean"], a["mae_mean"], a["psnr_mean"], a["ssim_mean"], a["crps"], a["nll"],
          a["picp"].get("0.95"), a["ause"], a["volume_spearman"],
          ", ".join(f"{p:.3f}" for p in a["learned_p"]) or "fixed"] for name, a in arms.items()],
    )
    calibrators = sorted({c for a in arms.values() for c in a["calibration_rms_after"]})
    calibration = _table(
        ["arm", "calibration RMS before", *[f"after {c}" for c in calibrators],
         "PICP 90% before", *[f"PICP 90% {c}" for c in calibrators]],
        [[name, a["calibration_rms_before"], *[a["calibration_rms_after"].get(c) for c in calibrators],
          a["picp"].get("0.9"), *[a["picp_after"].get(c, {}).get("0.9") for c in calibrators]]
         for name, a in arms.items()],
    )
    linear = document.get("baselines", {}).get("linear_map", {})
    linear_rmse = linear.get("rmse_per_subject", {})
    subjects = sorted({s for a in arms.values() for s in a["rmse_per_subject"]})
    per_subject = _table(
        ["subject", *arms, "linear map (baseline)"],
        [[s, *[arms[a]["rmse_per_subject"].get(s) for a in arms], linear_rmse.get(s)] for s in subjects],
    )
    baseline_text = (
        f"Baseline: a per-subject least-squares linear map from source to target intensities, fitted to the "
        f"subject's own target (it sees the truth), has mean RMSE {_fmt(linear.get('rmse_mean'))}." if linear else ""
    )
    tests = document.get("paired_ttests") or ([document["paired_ttest"]] if document.get("paired_ttest") else [])
    ttest_text = (
        "Two-sided paired t-tests on per-subject RMSE: " + "; ".join(
            f"{t['arms'][0]} vs {t['arms'][1]}: t = {_fmt(t['t'])}, p = {_fmt(t['p'])} (n = {t['n']})" for t in tests
        ) + "." if tests else "Only one arm: no t-test."
    )
    timing = ", ".join(f"{k} {v:.1f} s" for k, v in document.get("timing", {}).items())
    images = "".join(
        f"<figure><img alt='{html.escape(title)}' src='data:image/png;base64,"
        f"{base64.b64encode(path.read_bytes()).decode()}'><figcaption>{html.escape(title)}</figcaption></figure>"
        for title, path in figures
    )
    style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
             "text-align:right}th{background:#f4f4f4}td:first-child{text-align:left}"
             "figure{margin:1.5em 0}img{max-width:100%}figcaption{color:#555;font-size:90%}")
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>uqsynth report</title>"
        f"<style>{style}</style></head><body><h1>uqsynth report</h1>"
        f"<p>Errors on the [0, 255] scale inside the brain mask; intensities normalized per slice. {html.escape(ttest_text)}</p>"
        f"<h2>Accuracy and uncertainty</h2>{summary}{spread_table(arms)}"
        f"<h2>Calibration</h2><p>{html.escape(calibration_text(document))}</p>{calibration}"
        f"<h2>Triage: volumes ranked by uncertainty</h2>{triage_section(arms)}"
        f"<h2>Coverage per subject</h2>{miscoverage_table(arms)}"
        f"<h2>Coverage by region</h2>{region_table(arms)}"
        f"<h2>Per-subject RMSE</h2>{per_subject}<p>{html.escape(baseline_text)}</p><p>Timing: {html.escape(timing)}</p>"
        + (f"<h2>Slice viewer: every test subject</h2><p>Drag the slider (or use the arrow keys) to scroll "
           "through the axial slices; red marks the voxels whose truth lies outside the arm's calibrated 90 % "
           f"interval.</p>{viewer}" if viewer else "")
        + f"<h2>Figures</h2>{images}</body></html>"
    )

