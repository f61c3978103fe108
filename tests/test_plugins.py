"""The plugin host: built-ins, entry-point discovery, and every way a plugin can go wrong."""

from __future__ import annotations

import json

import pytest
from conftest import make_distribution

from uqsynth.cli import main
from uqsynth.errors import PluginError
from uqsynth.layers import MCDropout
from uqsynth.plugins import KINDS, PluginHost, get_host

GOOD_PLUGIN = """
    import uqsynth
    from uqsynth.layers import MCDropout

    class Spatial(MCDropout):
        '''Spatial dropout from a third party.'''

    @uqsynth.hookimpl
    def uqsynth_register_stochastic_layers(register):
        register("thirdparty_dropout", Spatial)
"""


def listing(capsys) -> dict:
    assert main(["plugins", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_builtins_are_listed_under_the_seven_kinds(capsys):
    data = listing(capsys)
    assert list(data) == list(KINDS) == [
        "stochastic_layer", "generator", "discriminator", "adversarial_loss", "calibrator", "dataset", "likelihood"
    ]
    assert {i["name"] for i in data["likelihood"]} >= {"l1", "laplace", "gaussian"}
    layers = {item["name"]: item for item in data["stochastic_layer"]}
    assert {"mc_dropout", "concrete_dropout"} <= set(layers)
    assert layers["mc_dropout"]["distribution"] == "uqsynth"
    assert set(layers["mc_dropout"]) == {"name", "plugin", "distribution", "version"}
    assert {i["name"] for i in data["generator"]} >= {"unet"}
    assert {i["name"] for i in data["discriminator"]} >= {"patchgan"}
    assert {i["name"] for i in data["adversarial_loss"]} >= {"vanilla", "lsgan", "hinge"}
    assert {i["name"] for i in data["dataset"]} >= {"brats", "paired_nifti", "phantom"}


def test_entry_point_plugin_is_discovered_with_its_distribution(site_dir, capsys):
    make_distribution(site_dir, "thirdparty-dist", "2.3.4", {"mine": "thirdparty_good"}, {"thirdparty_good": GOOD_PLUGIN})
    layers = {item["name"]: item for item in listing(capsys)["stochastic_layer"]}
    assert layers["thirdparty_dropout"] == {
        "name": "thirdparty_dropout", "plugin": "mine", "distribution": "thirdparty-dist", "version": "2.3.4"
    }
    layer = get_host()["stochastic_layer"].create("thirdparty_dropout", p=0.2)
    assert isinstance(layer, MCDropout) and layer.p == 0.2


def test_autoload_switch_hides_entry_points(site_dir, monkeypatch, capsys):
    make_distribution(site_dir, "thirdparty-dist", "1.0", {"mine": "thirdparty_good"}, {"thirdparty_good": GOOD_PLUGIN})
    monkeypatch.setenv("UQSYNTH_DISABLE_PLUGIN_AUTOLOAD", "1")
    names = [item["name"] for item in listing(capsys)["stochastic_layer"]]
    assert "thirdparty_dropout" not in names


def test_plugin_failing_to_import_is_reported_and_others_still_listed(site_dir, capsys):
    make_distribution(site_dir, "broken-dist", "0.1", {"broken": "thirdparty_broken"},
                      {"thirdparty_broken": "raise RuntimeError('boom at import')\n"})
    make_distribution(site_dir / "other", "fine-dist", "1.0", {"mine": "thirdparty_good"},
                      {"thirdparty_good": GOOD_PLUGIN})
    import sys
    sys.path.insert(0, str(site_dir / "other"))
    try:
        assert main(["plugins", "--json"]) == 0
        json_output = capsys.readouterr()
        assert main(["plugins"]) == 0
        text_output = capsys.readouterr()
    finally:
        sys.path.remove(str(site_dir / "other"))
    message = 'Error importing plugin "broken": RuntimeError: boom at import'
    assert "thirdparty_dropout" in [i["name"] for i in json.loads(json_output.out)["stochastic_layer"]]
    assert "thirdparty_dropout" in text_output.out
    assert f"broken (broken-dist 0.1): BROKEN: {message}" in text_output.out
    # Both listings warn on stderr, in one line that names the plugin, whatever the output format.
    assert json_output.err == text_output.err == f"warning: {message}\n"


def test_run_refuses_a_broken_plugin_with_one_error_line(site_dir, tmp_path, capsys):
    make_distribution(site_dir, "broken-dist", "0.1", {"broken": "thirdparty_broken"},
                      {"thirdparty_broken": "import no_such_module_anywhere\n"})
    config = tmp_path / "c.toml"
    config.write_text('[arms.a]\nstochastic_layer = "mc_dropout"\n')
    assert main(["run", str(config), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith('error: Error importing plugin "broken": ModuleNotFoundError')
    assert not (tmp_path / "out").exists()


def test_duplicate_name_names_both_plugins(site_dir):
    clash = GOOD_PLUGIN.replace("thirdparty_dropout", "mc_dropout")
    make_distribution(site_dir, "clash-dist", "1.0", {"clash": "thirdparty_clash"}, {"thirdparty_clash": clash})
    host = PluginHost().load()
    with pytest.raises(PluginError) as info:
        host.check()
    message = str(info.value)
    assert 'stochastic_layer "mc_dropout" is registered twice' in message
    assert '"uqsynth.builtins.stochastic_layers" (uqsynth)' in message and '"clash" (clash-dist)' in message
    assert host["stochastic_layer"].get("mc_dropout").plugin.distribution == "uqsynth"


def test_registration_is_all_or_nothing(site_dir):
    source = GOOD_PLUGIN + """
    @uqsynth.hookimpl
    def uqsynth_register_calibrators(register):
        register("thirdparty_cal", object)   # not a Calibrator: rejected
"""
    make_distribution(site_dir, "half-dist", "1.0", {"half": "thirdparty_half"}, {"thirdparty_half": source})
    host = PluginHost().load()
    assert "thirdparty_cal" not in host["calibrator"]
    assert len(host.broken) == 1
    assert "does not derive from uqsynth.calibration.base.Calibrator" in host.broken[0].message


def test_unknown_hook_is_reported_with_a_close_match(site_dir):
    source = GOOD_PLUGIN.replace("uqsynth_register_stochastic_layers", "uqsynth_register_stochastic_layer")
    make_distribution(site_dir, "typo-dist", "1.0", {"typo": "thirdparty_typo"}, {"thirdparty_typo": source})
    host = PluginHost().load()
    assert len(host.broken) == 1
    message = host.broken[0].message
    assert "unknown hook uqsynth_register_stochastic_layer" in message
    assert '"uqsynth_register_stochastic_layers"' in message


def test_unknown_name_lists_close_matches_and_the_listing_command():
    with pytest.raises(PluginError) as info:
        get_host()["stochastic_layer"].create("mc_dropuot")
    assert '"mc_dropout"' in str(info.value)
    assert "uqsynth plugins" in str(info.value)


def test_factory_returning_the_wrong_type_is_refused_when_built(site_dir):
    source = """
        import uqsynth
        from torch import nn

        @uqsynth.hookimpl
        def uqsynth_register_stochastic_layers(register):
            register("thirdparty_identity", lambda: nn.Identity())
    """
    make_distribution(site_dir, "wrong-dist", "1.0", {"wrong": "thirdparty_wrong"}, {"thirdparty_wrong": source})
    with pytest.raises(PluginError, match=r'plugin "wrong" .* torch.nn.modules.linear.Identity, which is not a'):
        get_host()["stochastic_layer"].create("thirdparty_identity")
