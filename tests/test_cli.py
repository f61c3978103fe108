"""The command line as a user meets it: exit statuses and one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import uqsynth
from uqsynth.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "uqsynth", *args], capture_output=True, text=True, timeout=120)


def test_version_through_python_dash_m():
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"uqsynth {uqsynth.__version__}"


def test_missing_config_is_one_error_line_with_status_2(tmp_path):
    result = run_cli("run", str(tmp_path / "does-not-exist.toml"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'does-not-exist.toml'}: no such configuration file"]
    assert "Traceback" not in result.stderr


def test_unknown_plugin_names_the_close_match(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text('[arms.a]\nstochastic_layer = { name = "concrete_dropuot" }\n')
    assert main(["run", str(config), "--out", str(tmp_path / "out")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"error: {config}: arms.a.stochastic_layer: unknown stochastic_layer")
    assert '"concrete_dropout"' in lines[0]
    assert not (tmp_path / "out").exists()


def test_invalid_toml_is_a_user_error(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text("[train\nepochs = 1\n")
    assert main(["run", str(config)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {config}: invalid TOML")


def test_debug_shows_the_traceback(tmp_path, capsys):
    assert main(["run", str(tmp_path / "none.toml"), "--debug"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_bad_command_line_is_one_error_line():
    result = run_cli("run", "--no-such-flag")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stderr.startswith("error: ")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_cuda_device_is_refused(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text('[arms.a]\nstochastic_layer = "mc_dropout"\n')
    assert main(["run", str(config), "--device", "cuda:0", "--out", str(tmp_path / "o")]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_debug_before_the_subcommand_also_shows_the_traceback(tmp_path, capsys):
    assert main(["--debug", "run", str(tmp_path / "none.toml")]) == 2
    assert "Traceback" in capsys.readouterr().err
