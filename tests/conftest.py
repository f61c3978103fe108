"""Shared fixtures. Tests never see plugins installed in the environment."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import pytest

os.environ["UQSYNTH_DISABLE_PLUGIN_AUTOLOAD"] = "1"

from uqsynth.plugins import reset_host  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_plugin_host():
    """Each test starts with a plugin host built from the current environment."""
    reset_host()
    yield
    reset_host()


def make_distribution(
    site: Path, name: str, version: str, entry_points: dict[str, str], modules: dict[str, str]
) -> Path:
    """Lay out an installed distribution under ``site``: modules plus a dist-info.

    This is what ``pip install`` leaves behind, so ``importlib.metadata``
    discovers its ``uqsynth`` entry points exactly as for a real package.
    """
    site.mkdir(parents=True, exist_ok=True)
    for module, source in modules.items():
        (site / f"{module}.py").write_text(textwrap.dedent(source))
    dist_info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = "\n".join(f"{ep} = {target}" for ep, target in entry_points.items())
    (dist_info / "entry_points.txt").write_text(f"[uqsynth]\n{lines}\n")
    return site


#: A smoke run of the shipped configuration, on the phantom whatever lies in data/.
SMOKE_RUN = (
    str(Path(__file__).resolve().parents[1] / "plugins" / "bcgan_t1t2.toml"),
    "--smoke", "--device", "cpu", "--set", "data.source=phantom",
)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> Path:
    """One finished run of :data:`SMOKE_RUN` (arms mc_dropout and concrete_dropout), shared by the session.

    Tests that change anything in it must work on a copy.
    """
    from uqsynth.cli import main

    out = tmp_path_factory.mktemp("smoke") / "run"
    assert main(["run", *SMOKE_RUN, "--out", str(out)]) == 0
    return out


@pytest.fixture
def site_dir(tmp_path, monkeypatch):
    """A fresh site directory on ``sys.path`` with plugin autoload switched on."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv("UQSYNTH_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    yield site
    for module in [m for m in sys.modules if m.startswith("thirdparty_")]:
        del sys.modules[module]


@pytest.fixture(scope="session")
def finished(tmp_path_factory):
    """A finished tiny run of 5 phantom subjects (2 test subjects), shared by the report and viewer tests."""
    from test_training import TINY

    from uqsynth.cli import main

    root = tmp_path_factory.mktemp("report")
    config = root / "tiny.toml"
    config.write_text(TINY.replace("subjects = 3", "subjects = 5").replace("test_fraction = 0.34", "test_fraction = 0.4"))
    assert main(["run", str(config), "--out", str(root / "run")]) == 0
    return root / "run"
