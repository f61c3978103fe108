"""The report's slice viewer: scroll through every test subject's axial slices in the page itself.

A figure of three fixed slices shows one subject; a reader wants to look
through each test subject where the synthesis fails and whether its
uncertainty says so. For every test subject the viewer shows, per axial
slice, the T1w and true T2w, and per arm the synthesized T2w, the |error|,
the total std and, in red over the synthesized image, the voxels whose
truth lies outside the arm's calibrated 90 % interval (its first fitted
calibrator, as ``uqsynth predict`` uses).

Self-contained: each subject is one JPEG sprite (rows: slices, columns:
panels), embedded as a data URI, drawn into a canvas by a few lines of
vanilla JavaScript (a subject menu, a slice slider, arrow keys); no network,
no library. Sprites are JPEG (quality :data:`JPEG_QUALITY`), size is bounded: a panel at most :data:`MAX_SIDE` pixels a
side, at most :data:`MAX_SLICES` slices per subject (evenly spaced among
those holding brain) and :data:`MAX_PIXELS` pixels per subject's sprite.

The page can be driven from its address, ``report.html#subject=ID&slice=K``,
and the canvas records what it drew (``data-subject``, ``data-slice`` and a
checksum of its pixels, ``data-checksum``), so a headless browser can check
that the slider changes the picture (``tests/test_viewer.py``).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import matplotlib.image
import numpy as np

from uqsynth.calibration.io import load_calibrator
from uqsynth.config import Config
from uqsynth.data.base import Dataset
from uqsynth.data.slices import EvalVolume, axial_axis
from uqsynth.evaluation import read_prediction
from uqsynth.run_directory import ArmPaths

#: Largest side of a panel in pixels (larger slices are subsampled).
MAX_SIDE = 96

#: Most slices shown per subject (evenly spaced among those holding brain).
MAX_SLICES = 64

#: Most pixels of one subject's sprite: a 240 x 240 x 155 BraTS volume with three arms shows 33 of its slices.
MAX_PIXELS = 3_000_000

#: Level of the interval whose misses are shown.
LEVEL = 0.9

#: Quality of the sprites' JPEG encoding (Pillow's scale, 1-95).
JPEG_QUALITY = 85

#: Intensity ranges of the colour-mapped panels (normalized scale); the std's is each subject's 99th percentile.
ERROR_MAX = 0.5


@dataclass
class SubjectSprite:
    """One subject's slices as a JPEG sprite: rows are slices, columns the panels."""

    subject: str
    slices: list[int]
    cell: tuple[int, int]
    jpeg: bytes


def columns(arms: list[str]) -> list[str]:
    """The panels' titles, in sprite column order."""
    per_arm = ("synthesized", "|error|", "std", f"outside {LEVEL:.0%}")
    return ["T1w", "true T2w", *(f"{arm}: {title}" for arm in arms for title in per_arm)]


def _gray(image: np.ndarray) -> np.ndarray:
    value = (np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)
    return np.repeat(value[..., None], 3, axis=-1)


def _mapped(image: np.ndarray, vmax: float) -> np.ndarray:
    colours = matplotlib.colormaps["magma"](np.clip(image / max(vmax, 1e-12), 0.0, 1.0))
    return (colours[..., :3] * 255).astype(np.uint8)


def _outside(synthesized: np.ndarray, outside: np.ndarray) -> np.ndarray:
    rgb = _gray(synthesized)
    rgb[outside] = (230, 30, 30)
    return rgb


def _display(volume: np.ndarray, index: int, axis: int, step: int) -> np.ndarray:
    """An axial slice as displayed in the report's figures (superior up), subsampled by ``step``."""
    return np.take(volume, index, axis=axis).T[::-1][::step, ::step]


def subject_sprite(
    subject_id: str,
    source: np.ndarray,
    truth: np.ndarray,
    mask: np.ndarray,
    axis: int,
    arms: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
) -> SubjectSprite:
    """The sprite of one subject: its volumes (normalized scale) and, per arm, ``(mean, std, outside)``."""
    area = mask.sum(axis=tuple(a for a in range(mask.ndim) if a != axis))
    present = np.flatnonzero(area > 0)
    shape = [n for a, n in enumerate(mask.shape) if a != axis]
    step = max(1, math.ceil(max(shape) / MAX_SIDE))
    row_pixels = math.prod(math.ceil(n / step) for n in shape) * (2 + 4 * len(arms))
    most = max(1, min(MAX_SLICES, MAX_PIXELS // row_pixels))
    if present.size > most:
        present = present[np.round(np.linspace(0, present.size - 1, most)).astype(int)]
    rows = []
    for index in present:
        def show(volume):
            return _display(volume, int(index), axis, step)

        cells = [_gray(show(source)), _gray(show(truth))]
        for mean, std, outside in arms:
            brain = std[mask]
            std_max = float(np.percentile(brain, 99)) if brain.size else 1.0
            cells += [_gray(show(mean)), _mapped(show(np.abs(mean - truth) * mask), ERROR_MAX),
                      _mapped(show(std * mask), std_max), _outside(show(mean), show(outside))]
        rows.append(np.concatenate(cells, axis=1))
    sheet = np.concatenate(rows, axis=0) if rows else np.zeros((1, 1, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    # JPEG: the std and error maps are noise to PNG's compressor (a main-job subject: 1.4 MB as PNG, 0.37 MB here).
    matplotlib.image.imsave(buffer, sheet, format="jpeg", pil_kwargs={"quality": JPEG_QUALITY})
    cell = (rows[0].shape[0], rows[0].shape[1] // (2 + 4 * len(arms))) if rows else (1, 1)
    return SubjectSprite(subject_id, [int(i) for i in present], cell, buffer.getvalue())


def sprites(config: Config, dataset: Dataset, test_ids: list[str], run_dir: Path) -> list[SubjectSprite]:
    """Every test subject's sprite, from the saved predictions and the arms' first fitted calibrators."""
    configured = [spec.name for spec in config.calibration.calibrators]
    calibrators = {}
    for arm in config.arms:
        fitted = ArmPaths(run_dir / arm).fitted(configured)
        if fitted:
            calibrators[arm] = load_calibrator(ArmPaths(run_dir / arm).calibrator(fitted[0]), arm=arm)[1]
    out = []
    for subject_id in test_ids:
        volumes = dataset.load(subject_id)
        evaluation = EvalVolume(volumes, image_size=config.data.image_size)
        truth, mask = evaluation.normalized_target(), evaluation.native_mask()
        arms = []
        for arm in config.arms:
            paths = ArmPaths(run_dir / arm)
            mean = read_prediction(paths.prediction(subject_id, "mean"))
            std = read_prediction(paths.prediction(subject_id, "std"))
            outside = np.zeros(mask.shape, dtype=bool)
            calibrator = calibrators.get(arm)
            if calibrator is not None:
                lower, upper = calibrator.interval(mean[mask], std[mask], LEVEL)
                outside[mask] = (truth[mask] < lower) | (truth[mask] > upper)
            arms.append((mean, std, outside))
        out.append(subject_sprite(subject_id, evaluation.normalized_source(), truth, mask,
                                  axial_axis(volumes.affine), arms))
    return out


def viewer_html(entries: list[SubjectSprite], titles: list[str], scale: int = 2) -> str:
    """The viewer's HTML: a subject menu, a slice slider, the column titles and the canvas, with its script."""
    if not entries:
        return "<p>No test subject to show.</p>"
    subjects = [{"id": e.subject, "slices": e.slices, "cell": list(e.cell), "image": f"viewer-image-{k}"}
                for k, e in enumerate(entries)]
    images = "".join(f"<img id='viewer-image-{k}' hidden alt='' src='data:image/jpeg;base64,"
                     f"{base64.b64encode(e.jpeg).decode()}'>" for k, e in enumerate(entries))
    options = "".join(f"<option value='{k}'>{html.escape(e.subject)}</option>" for k, e in enumerate(entries))
    width = entries[0].cell[1] * scale
    heads = "".join(f"<span style='display:inline-block;width:{width}px;font-size:11px;text-align:center;"
                    f"overflow:hidden;white-space:nowrap'>{html.escape(t)}</span>" for t in titles)
    data = json.dumps({"subjects": subjects, "columns": len(titles), "scale": scale})
    script = """
(function () {
  const data = JSON.parse(document.getElementById('viewer-data').textContent);
  const menu = document.getElementById('viewer-subject'), slider = document.getElementById('viewer-slice');
  const canvas = document.getElementById('viewer-canvas'), caption = document.getElementById('viewer-caption');
  const context = canvas.getContext('2d');
  function draw() {
    const subject = data.subjects[Number(menu.value)], k = Number(slider.value);
    const [h, w] = subject.cell, n = data.columns, s = data.scale;
    canvas.width = n * w * s; canvas.height = h * s;
    context.imageSmoothingEnabled = false;
    context.drawImage(document.getElementById(subject.image), 0, k * h, n * w, h, 0, 0, n * w * s, h * s);
    const pixels = context.getImageData(0, 0, canvas.width, canvas.height).data;
    let checksum = 0;
    for (let i = 0; i < pixels.length; i += 4) checksum = (checksum * 31 + pixels[i] + 7 * pixels[i + 1]) % 1000000007;
    caption.textContent = subject.id + ': axial slice ' + subject.slices[k] + ' (' + (k + 1) + ' of ' + subject.slices.length + ')';
    canvas.dataset.subject = subject.id; canvas.dataset.slice = String(subject.slices[k]);
    canvas.dataset.checksum = String(checksum);
  }
  function choose(index, slice) {
    menu.value = String(index);
    const subject = data.subjects[index], image = document.getElementById(subject.image);
    slider.max = String(subject.slices.length - 1);
    slider.value = String(Math.min(slice, subject.slices.length - 1));
    if (image.complete && image.naturalWidth) draw(); else image.decode().then(draw);
  }
  menu.addEventListener('change', function () { choose(Number(menu.value), Number(slider.value)); });
  slider.addEventListener('input', draw);
  document.addEventListener('keydown', function (event) {
    if (event.key === 'ArrowUp' || event.key === 'ArrowRight') { slider.value = String(Number(slider.value) + 1); draw(); }
    if (event.key === 'ArrowDown' || event.key === 'ArrowLeft') { slider.value = String(Number(slider.value) - 1); draw(); }
  });
  function start() {
    const wanted = new URLSearchParams(location.hash.slice(1));
    const index = Math.max(0, data.subjects.findIndex(function (s) { return s.id === wanted.get('subject'); }));
    const first = data.subjects[index];
    choose(index, wanted.has('slice') ? Number(wanted.get('slice')) : Math.floor(first.slices.length / 2));
  }
  start();
  window.addEventListener('hashchange', start);
})();
"""
    return (f"<div id='viewer'><p><label>subject <select id='viewer-subject'>{options}</select></label> "
            f"<label>slice <input id='viewer-slice' type='range' min='0' max='0' value='0'></label> "
            f"<span id='viewer-caption'></span></p><div>{heads}</div><canvas id='viewer-canvas'></canvas>"
            f"<script id='viewer-data' type='application/json'>{data.replace('</', '<' + chr(92) + '/')}</script>"
            f"{images}<script>{script}</script></div>")
