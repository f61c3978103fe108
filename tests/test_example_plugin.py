"""The example third-party plugin, installed with pip as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "uqsynth-gaussian-dropout"


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict[str, str]:
    """pip-install the example into a private target directory; return the environment that sees it."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(EXAMPLE)],
        check=True, capture_output=True, text=True, timeout=300,
    )
    env = {k: v for k, v in os.environ.items() if k != "UQSYNTH_DISABLE_PLUGIN_AUTOLOAD"}
    env["PYTHONPATH"] = os.pathsep.join([str(target), env.get("PYTHONPATH", "")])
    return env


def uqsynth(env: dict[str, str], *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "uqsynth", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_pip_installed_plugin_is_listed_with_its_distribution(installed):
    result = uqsynth(installed, "plugins", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    expected = {"plugin": "gaussian_dropout", "distribution": "uqsynth-gaussian-dropout", "version": "0.1.0"}
    assert {"name": "gaussian_dropout", **expected} in data["stochastic_layer"]
    assert {"name": "gaussian_shift_scale", **expected} in data["calibrator"]


def test_plugin_layer_is_usable_by_name_in_a_toml(installed, tmp_path):
    config = tmp_path / "gaussian.toml"
    config.write_text('[arms.gaussian]\nstochastic_layer = { name = "gaussian_dropout", p = 0.3 }\n')
    script = (
        "import sys, torch, uqsynth\n"
        "from uqsynth.config import load_config\n"
        "from uqsynth.plugins import get_host\n"
        "config = load_config(sys.argv[1], host=get_host())\n"
        "spec = config.arms['gaussian'].stochastic_layer\n"
        "layer = uqsynth.create('stochastic_layer', spec.name, **spec.params)\n"
        "x = torch.ones(4000)\n"
        "with uqsynth.sampling(layer):\n"
        "    y = layer(x)\n"
        "print(type(layer).__name__, round(float(y.var()), 2))\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(config)], env=installed,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    name, variance = result.stdout.split()
    assert name == "GaussianDropout"
    assert abs(float(variance) - 0.3 / 0.7) < 0.06   # multiplicative noise variance p/(1-p)


def test_example_layer_passes_the_stochastic_layer_contract(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLE / "src"))
    from uqsynth_gaussian_dropout import GaussianDropout

    from uqsynth.testing import check_stochastic_layer

    check_stochastic_layer(lambda: GaussianDropout(p=0.3))
    check_stochastic_layer(lambda: GaussianDropout(p=0.2, channelwise=True))
