"""benchmarks/gpu_check.sh: the one command a lent GPU machine runs, checked here at its tiny size on the CPU.

Why: a GPU is lent for minutes and rarely; a script that first fails there
wastes the loan. ``--shrink`` runs every stage (sampling suite, phantom
volume, ``uqsynth run``, ``uqsynth predict``, training speed, the JSON) at a
size a CPU does in about a minute, so the script's wiring is tested on every
run of the suite; only the figures differ on a GPU.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
SECTIONS = ("device", "software", "commit", "sampling", "predict", "training")
STRATEGIES = {"naive_loop", "batch_repeat", "engine", "engine_fast"}


def gpu_check(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), "--python", sys.executable, *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT,
    )


def numbers(value):
    """Every int and float inside ``value`` (nested dicts and lists), booleans excepted."""
    if isinstance(value, dict):
        return [n for item in value.values() for n in numbers(item)]
    if isinstance(value, list):
        return [n for item in value for n in numbers(item)]
    return [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


@pytest.fixture(scope="module")
def shrunk(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu-check") / "out"
    done = gpu_check("--shrink", "--device", "cpu", "--out", str(out), timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == str(out / "gpu_check.json")
    return json.loads((out / "gpu_check.json").read_text())


def test_shrink_writes_every_section_with_finite_numbers(shrunk):
    assert shrunk["mode"] == "shrink"
    for section in SECTIONS:
        assert shrunk[section], section
    for section in ("sampling", "predict", "training"):
        values = numbers(shrunk[section])
        assert values and all(math.isfinite(v) for v in values), section
    assert math.isfinite(shrunk["seconds_total"]) and shrunk["seconds_total"] > 0


def test_shrink_sections_say_what_ran(shrunk):
    assert shrunk["device"]["type"] == "cpu" and shrunk["device"]["name"]
    assert shrunk["software"]["torch"]
    assert set(shrunk["sampling"]["strategies"]) == STRATEGIES
    assert all(s["slice_samples_per_s"] > 0 for s in shrunk["sampling"]["strategies"].values())
    predict = shrunk["predict"]
    assert predict["volume_shape"] == [60, 60, 40] and predict["samples"] == 4 and predict["seconds"] > 0
    training = shrunk["training"]
    assert training["fp32"]["steps_per_s"] > 0 and training["bf16"]["steps_per_s"] > 0


@pytest.mark.parametrize(
    "args, says",
    [
        (["--bogus"], "unknown argument: --bogus"),
        (["--out"], "--out needs a value"),
        (["--device", "tpu", "--shrink"], '--device: expected "auto", "cpu" or "cuda[:i]"'),
        (["--device", "cpu"], "no CUDA device"),
    ],
    ids=["unknown-flag", "missing-value", "bad-device", "full-check-without-cuda"],
)
def test_bad_input_is_one_error_line(tmp_path, args, says):
    out = [] if args == ["--out"] else ["--out", str(tmp_path / "out")]
    done = gpu_check(*out, *args)
    assert done.returncode == 2
    assert not (tmp_path / "out").exists()  # refused before anything is written
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and says in errors[0], done.stderr


def test_refuses_an_out_that_is_not_empty(tmp_path):
    (tmp_path / "earlier.json").write_text("{}")
    done = gpu_check("--shrink", "--out", str(tmp_path))
    assert done.returncode == 2
    assert "not empty" in done.stderr and (tmp_path / "earlier.json").read_text() == "{}"
