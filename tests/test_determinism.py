"""Determinism: the same seed and configuration give the same numbers on CPU.

A user who reruns a published configuration, or compares two arms across two
runs, must be able to trust that every difference comes from the change they
made, not from the run itself.
"""

from __future__ import annotations

import json

from conftest import SMOKE_RUN

from uqsynth.cli import main


def test_same_seed_and_configuration_give_the_same_metrics(smoke_run, tmp_path):
    again = tmp_path / "again"
    assert main(["run", *SMOKE_RUN, "--out", str(again)]) == 0
    first, second = (json.loads((run / "metrics.json").read_text()) for run in (smoke_run, again))
    # Wall-clock seconds per stage: the only entry that may differ between two runs.
    assert set(first.pop("timing")) == set(second.pop("timing"))
    assert set(first["arms"]) == {"mc_dropout", "concrete_dropout", "concrete_laplace"}
    assert first["arms"]["mc_dropout"]["rmse_mean"] > 0
    # The paper's comparison first, then every pair: the recommended arm against each of the paper's.
    assert first["paired_ttest"]["arms"] == ["mc_dropout", "concrete_dropout"]
    assert [test["arms"] for test in first["paired_ttests"]] == [
        ["mc_dropout", "concrete_dropout"], ["mc_dropout", "concrete_laplace"], ["concrete_dropout", "concrete_laplace"]
    ]
    assert first == second
    # The per-subject rows hold no timing at all.
    assert (smoke_run / "metrics.csv").read_text() == (again / "metrics.csv").read_text()
