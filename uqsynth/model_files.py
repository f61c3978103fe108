"""Model files that cannot carry code: safetensors, with a checksum file beside each.

Every weight, checkpoint and calibrator file uqsynth writes is a safetensors
file (tensors plus string metadata; reading one never unpickles or executes
anything) with ``<file>.sha256`` beside it. Reading refuses:

* a file holding pickled Python objects (``torch.save`` / ``pickle`` output),
  which could run code on load, with a message saying so;
* a file whose SHA-256 is not the one recorded when uqsynth wrote it
  (tampered with or damaged), or that has no checksum file at all;
* a tensor holding NaN or infinite values (weights of a diverged training
  run, or a file edited or written elsewhere): every number computed from
  it would be meaningless, so it is refused on reading, naming the tensor,
  and never written (:func:`nonfinite_tensor` is the one check).

Nested training state (optimizer states, random-number-generator states)
goes through :func:`save_state` / :func:`load_state`: tensors into the
safetensors body, everything else (numbers, strings, the nesting) into a
JSON skeleton in the metadata.

Writes are atomic and crash-safe as a pair: the checksum file lists the
digest of the new file *and* of the one it replaces until the new one is in
place, so a crash between the two renames still leaves a pair that verifies.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from uqsynth._files import atomic_path, atomic_write_text
from uqsynth.errors import DataError, OutputError, first_line

#: Leading bytes of files that hold pickles: torch.save's zip archive, and pickle protocols 2-5.
#: (Only asked of files that are not safetensors: a safetensors header length can start with these too.)
PICKLE_SIGNATURES = (b"PK\x03\x04", b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
STATE_KEY = "uqsynth_state"


def checksum_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def holds_pickle(path: str | Path) -> bool:
    """True for a file that is not safetensors but starts like a pickle (``torch.save``, ``pickle.dump``).

    A safetensors file starts with the little-endian length n of its JSON
    header, then the header (``{...}``); those bytes can look like a pickle
    opcode, so that layout is checked first.
    """
    with open(path, "rb") as handle:
        head = handle.read(9)
        size = handle.seek(0, 2)
    if len(head) == 9 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size:
        return False
    return head.startswith(PICKLE_SIGNATURES)


def _recorded_digests(path: Path) -> list[str]:
    sidecar = checksum_path(path)
    try:
        lines = sidecar.read_text(encoding="ascii").splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    return [line.split()[0].lower() for line in lines if line.strip()]


def nonfinite_tensor(tensors: dict[str, Any], kind: str = "tensor") -> str | None:
    """Describe the first tensor holding NaN or infinite values, or None when every one is finite.

    The description reads ``"tensor w holds 2 NaN and 0 infinite values"``
    (``kind`` names what the tensors are). Integer tensors (counts, RNG
    states) are always finite. Accepts torch tensors and numpy arrays alike.
    """
    for key, value in tensors.items():
        if isinstance(value, torch.Tensor):
            if not (value.is_floating_point() or value.is_complex()) or bool(torch.isfinite(value).all()):
                continue
            nan, inf = int(torch.isnan(value).sum()), int(torch.isinf(value).sum())
        else:
            array = np.asarray(value)
            if array.dtype.kind not in "fc" or bool(np.isfinite(array).all()):
                continue
            nan, inf = int(np.isnan(array).sum()), int(np.isinf(array).sum())
        return f"{kind} {key} holds {nan} NaN and {inf} infinite values"
    return None


def save_tensors(path: str | Path, tensors: dict[str, Any], metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` (torch tensors or numpy arrays, one kind) as safetensors at ``path``, with its checksum.

    The file gets the permissions of every other output (0o666 less the
    umask), not the 0o600 safetensors gives the files it creates.

    Raises:
        ValueError: A tensor holds NaN or infinite values (:func:`load_tensors` would refuse the file; callers
            such as the trainer check first, to say what diverged).
        OutputError: The system refused the write.
    """
    path = Path(path)
    problem = nonfinite_tensor(tensors)
    if problem is not None:
        raise ValueError(f"refusing to write {path}: {problem}")
    values = list(tensors.values())
    if values and all(isinstance(v, np.ndarray) for v in values):
        from safetensors.numpy import save_file
    else:
        from safetensors.torch import save_file
    with atomic_path(path) as tmp:
        mode = os.stat(tmp).st_mode & 0o777  # what atomic_path created: 0o666 less the umask
        try:
            save_file(tensors, str(tmp), metadata=metadata)
        except SafetensorError as error:  # raised instead of OSError, e.g. when the disk is full
            raise OutputError(f"cannot write {path}: {first_line(error)}") from None
        os.chmod(tmp, mode)  # save_file creates the file anew, private (0o600)
        digest = sha256_of(tmp)
        # Accept the file in place too (whichever recorded digest it has) until the new one replaces it.
        previous = _recorded_digests(path) if path.exists() else []
        accepted = list(dict.fromkeys([digest, *previous]))
        atomic_write_text(checksum_path(path), "".join(f"{d}  {path.name}\n" for d in accepted))
    atomic_write_text(checksum_path(path), f"{digest}  {path.name}\n")


def check_model_file(path: str | Path, *, what: str, verify: bool = True) -> Path:
    """Refuse a missing file, a pickle, or (``verify``) a file whose checksum does not match; return the path.

    ``verify=False`` is for files uqsynth did not write (a timm checkpoint
    downloaded by the user), which have no checksum file; they are still
    refused when they hold pickles.

    Raises:
        DataError: One line naming ``what`` and the file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} {path} does not exist")
    if holds_pickle(path):
        raise DataError(
            f"{what} {path} holds pickled Python objects (a torch.save or pickle file), which can run code "
            "when loaded; uqsynth reads only safetensors files"
        )
    if verify:
        recorded = _recorded_digests(path)
        if not recorded:
            raise DataError(
                f"{what} {path} has no checksum file {checksum_path(path).name} beside it, so it cannot be "
                "verified; uqsynth writes one with every model file (copy both)"
            )
        if sha256_of(path) not in recorded:
            raise DataError(
                f"{what} {path} does not match its checksum in {checksum_path(path).name}: it changed after "
                "uqsynth wrote it (tampered with or damaged)"
            )
    return path


def load_tensors(
    path: str | Path, *, what: str, framework: str = "pt", verify: bool = True
) -> tuple[dict[str, Any], dict[str, str]]:
    """The tensors and metadata of a safetensors file, after :func:`check_model_file`.

    Raises:
        DataError: One line naming ``what`` and the file, for any of the
            refusals above, a file that is not safetensors, or a tensor
            holding NaN or infinite values (naming the tensor).
    """
    path = check_model_file(path, what=what, verify=verify)
    try:
        with safe_open(str(path), framework=framework) as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # safetensors raises its own error types for any malformed header
        raise DataError(f"{what} {path} is not a safetensors file ({first_line(error)})") from None
    problem = nonfinite_tensor(tensors)
    if problem is not None:
        raise DataError(f"{what} {path} is unusable: its {problem} (left by a training run that diverged, "
                        "or edited since)")
    return tensors, metadata



# --------------------------------------------------------------------------- nested state


def save_state(path: str | Path, state: Any, metadata: dict[str, str] | None = None) -> None:
    """Write a nest of dicts, lists, tensors and JSON scalars (e.g. a training checkpoint) as safetensors."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(state, "", tensors)
    save_tensors(path, tensors, {**(metadata or {}), STATE_KEY: json.dumps(skeleton)})


def load_state(path: str | Path, *, what: str, map_location: str | torch.device = "cpu") -> Any:
    """Read back what :func:`save_state` wrote (tuples come back as lists)."""
    tensors, metadata = load_tensors(path, what=what)
    try:
        skeleton = json.loads(metadata[STATE_KEY])
        return _unflatten(skeleton, {k: v.to(map_location) for k, v in tensors.items()})
    except (KeyError, ValueError, TypeError) as error:
        raise DataError(f"{what} {path} holds no readable uqsynth state ({error})") from None


def state_tensors(state: Any) -> dict[str, torch.Tensor]:
    """The tensors of a nested state under the names :func:`save_state` gives them in the file, not copied.

    For checks before saving (on the tensors' own device), such as :func:`nonfinite_tensor`.
    """
    tensors: dict[str, torch.Tensor] = {}
    _flatten(state, "", tensors, copy=False)
    return tensors


def _flatten(value: Any, key: str, tensors: dict[str, torch.Tensor], copy: bool = True) -> Any:
    if isinstance(value, torch.Tensor):
        tensors[key] = value.detach().cpu().contiguous() if copy else value.detach()
        return {"$tensor": key}
    if isinstance(value, dict):
        # Pairs, not a JSON object: optimizer states use int keys, which JSON would turn into strings.
        return {"$dict": [[k, _flatten(v, f"{key}/{k}", tensors, copy)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return [_flatten(v, f"{key}/{i}", tensors, copy) for i, v in enumerate(value)]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store {type(value).__name__} at {key or '/'}: only tensors, dicts, lists and scalars")


def _unflatten(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if "$tensor" in value:
            return tensors[value["$tensor"]]
        return {k: _unflatten(v, tensors) for k, v in value["$dict"]}
    if isinstance(value, list):
        return [_unflatten(v, tensors) for v in value]
    return value
