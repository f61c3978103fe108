"""Saving and loading fitted calibrators as safetensors files, without pickled code.

A file holds the calibrator's fitted state (:meth:`Calibrator.fitted_state`)
as tensors and, in the safetensors metadata, what is needed to rebuild it:
the registered calibrator name, its parameters (JSON) and the arm it was
fitted for. Loading creates the calibrator through the plugin registry and
restores the arrays, so nothing in the file is ever executed or unpickled,
and a file from an untrusted run is as safe to open as an image. Like every
model file, it has a checksum beside it (:mod:`uqsynth.model_files`) and is
refused if it changed after it was written.

Format versions. ``FORMAT`` names the layout of the fitted state; it
changes when a built-in calibrator's state changes meaning, and a file of
another version is refused with one line saying so (refit it), never
loaded half-stale. ``uqsynth-calibrator-2``: the built-in calibrators fit a
floor ``c`` of an effective scale ``sqrt((s std)^2 + c^2)`` (so a zero std
has a width) and their summaries hold histograms by std; a
``uqsynth-calibrator-1`` file (state of ``r / std`` alone) is refused.
``uqsynth-calibrator-3``: the subject-level calibrators' histograms have a
region axis (Mondrian, :mod:`uqsynth.calibration.risk`); a ``-2`` file is
refused, and a run resumed on it fits its calibrators again.
Within a version a streaming calibrator is refitted from its saved summary
when loaded (:meth:`StreamingCalibrator.load_fitted_state`), which also
refuses a summary of the wrong names or shapes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from uqsynth.calibration.base import Calibrator
from uqsynth.errors import DataError, PluginError, first_line
from uqsynth.model_files import load_tensors, save_tensors

FORMAT = "uqsynth-calibrator-3"

#: Earlier formats, refused with a line saying what changed.
_OLD_FORMATS = {
    "uqsynth-calibrator-1": "written before calibrators fitted a floor for zero std",
    "uqsynth-calibrator-2": "written before subject-level calibrators kept histograms per region",
}


def save_calibrator(calibrator: Calibrator, path: str | Path, *, name: str, arm: str) -> None:
    """Write a fitted calibrator to ``path`` (safetensors), atomically.

    Args:
        calibrator: A fitted calibrator.
        path: Destination file (conventionally ``*.safetensors``).
        name: The name it is registered under (what :func:`load_calibrator`
            creates it from).
        arm: The arm whose predictions it was fitted on; loading it for
            another arm is refused.

    Raises:
        sklearn.exceptions.NotFittedError: The calibrator is not fitted.
        ValueError: A parameter is not JSON-serializable, or a fitted
            attribute is not a numeric array.
    """
    state = calibrator.fitted_state()
    tensors = {}
    for key, value in state.items():
        array = np.asarray(value)
        if not array.flags.c_contiguous:  # not ascontiguousarray: it would make 0-d arrays 1-d
            array = array.copy(order="C")
        if array.dtype.kind not in "biuf":
            raise ValueError(
                f"cannot save fitted attribute {key} of {type(calibrator).__name__}: "
                f"dtype {array.dtype} is not numeric"
            )
        tensors[key] = array
    try:
        params = json.dumps(calibrator.get_params(deep=False), sort_keys=True)
    except TypeError as error:
        raise ValueError(f"cannot save the parameters of {type(calibrator).__name__}: {error}") from None
    save_tensors(path, tensors, {"format": FORMAT, "calibrator": name, "arm": arm, "params": params})


def saved_format(path: str | Path) -> str | None:
    """The format a calibrator file was written in (its metadata only; no checksum check), or None if unreadable.

    For a run that resumes: a file of an older format than :data:`FORMAT`
    is due to be refitted rather than kept (:func:`load_calibrator` refuses it).
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="np") as handle:
            return (handle.metadata() or {}).get("format")
    except Exception:  # noqa: BLE001 - missing, truncated or not safetensors: no format to speak of
        return None


def load_calibrator(path: str | Path, *, host: Any = None, arm: str | None = None) -> tuple[str, Calibrator]:
    """Read a calibrator written by :func:`save_calibrator`.

    Args:
        path: The safetensors file.
        host: Where calibrators are created: anything whose ``["calibrator"]``
            has ``create(name, **params)``, normally a
            :class:`uqsynth.plugins.PluginHost`; default the process-wide host.
        arm: If given, the arm the file must have been fitted for.

    Returns:
        The registered calibrator name and the fitted calibrator.

    Raises:
        DataError: One line naming the file: it is missing, holds pickles,
            does not match its checksum, is not a safetensors file, has no
            uqsynth calibrator metadata or an old format, names an unknown calibrator or
            invalid parameters, holds unusable state, or was fitted for
            another arm.
    """
    path = Path(path)
    state, metadata = load_tensors(path, what="calibrator file", framework="np")

    missing = [key for key in ("calibrator", "arm", "params") if key not in metadata]
    if metadata.get("format") in _OLD_FORMATS:
        raise DataError(
            f"calibrator file {path} has the old format {metadata['format']!r} "
            f"({_OLD_FORMATS[metadata['format']]}); this uqsynth reads {FORMAT!r}: delete it and rerun "
            "`uqsynth run` with the same --out to refit it"
        )
    if metadata.get("format") != FORMAT or missing:
        raise DataError(
            f"calibrator file {path} has no uqsynth calibrator metadata "
            f"(expected format {FORMAT!r} with keys calibrator, arm, params)"
        )
    if not state:
        raise DataError(f"calibrator file {path} holds no fitted state")
    name, saved_arm = metadata["calibrator"], metadata["arm"]
    if arm is not None and saved_arm != arm:
        raise DataError(f"calibrator file {path} was fitted for arm {saved_arm!r}, not {arm!r}")
    try:
        params = json.loads(metadata["params"])
        if not isinstance(params, dict):
            raise ValueError("not a JSON object")
    except ValueError as error:
        raise DataError(f"calibrator file {path} has unreadable parameters ({first_line(error)})") from None

    if host is None:
        from uqsynth.plugins import get_host

        host = get_host()
    try:
        calibrator = host["calibrator"].create(name, **params)
    except PluginError as error:
        raise DataError(f"calibrator file {path}: {error}") from None
    except (TypeError, ValueError) as error:
        raise DataError(
            f'calibrator file {path}: cannot create calibrator "{name}" with {params}: {first_line(error)}'
        ) from None
    try:
        calibrator.load_fitted_state(state)
    except ValueError as error:
        raise DataError(
            f'calibrator file {path}: invalid state for calibrator "{name}": {first_line(error)}'
        ) from None
    return name, calibrator

