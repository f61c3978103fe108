"""Which torch device a run or a prediction uses.

Below both :mod:`uqsynth.pipeline` and :mod:`uqsynth.predict`, so neither
imports the other for it.
"""

from __future__ import annotations

import torch

from uqsynth.errors import ConfigError


def resolve_device(spec: str, *, key: str = "run.device") -> torch.device:
    """``"auto"`` -> CUDA when present, else CPU; a requested CUDA device must exist.

    ``key`` is where ``spec`` came from (``run.device`` or ``--device``), for messages.
    """
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f'{key}: expected "auto", "cpu" or "cuda[:i]", found {spec!r}') from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{key}: {spec} requested but CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"{key}: {spec} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif device.type != "cpu":
        raise ConfigError(f'{key}: expected "auto", "cpu" or "cuda[:i]", found {spec!r}')
    return device
