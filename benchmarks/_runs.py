"""Where the accuracy-and-calibration suite finds a trained run (no heavy imports: conftest.py loads this)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

#: The tiny run trained when no run directory is given (tests/test_report.py's: 5 phantom subjects, 2 tested).
TINY_RUN = """
[run]
name = "bench-tiny"
seed = 3

[data]
source = "phantom"
image_size = 32
test_fraction = 0.4

[data.phantom]
subjects = 5
shape = [24, 28, 20]

[model]
generator = { name = "unet", ngf = 4 }
discriminator = { name = "patchgan", ndf = 8 }

[train]
epochs = 2
batch_size = 8
max_steps_per_epoch = 3

[arms.mc]
stochastic_layer = { name = "mc_dropout", p = 0.5 }
positions = [2, 3]
lambda_kl = 0.0

[arms.concrete]
stochastic_layer = { name = "concrete_dropout", init_p = 0.1 }
positions = [2, 3]
"""


def run_directory(config: pytest.Config) -> Path | None:
    """The trained run to evaluate: ``--uqsynth-run``, else ``$UQSYNTH_BENCH_RUN``, else ``None``."""
    value = config.getoption("uqsynth_run") or os.environ.get("UQSYNTH_BENCH_RUN")
    return Path(value) if value else None
