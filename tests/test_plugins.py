"""Plugin discovery: built-ins, a throwaway plugin, and each kind of broken plugin."""

from __future__ import annotations

import subprocess
import sys

import pytest

from longhorn_zoo.registry import PluginError, build_registry

GOOD = """
from pathlib import Path
from torch import nn
from longhorn_zoo.hookspecs import MixerSpec, hookimpl

DEFAULTS = Path(__file__).with_name("{name}_defaults.toml")
DEFAULTS.write_text("mlp = true\\n[mixer]\\nwidth = 2\\n")

class Identity(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.lin = nn.Linear(args.dim, args.dim)
    def forward(self, x, state=None, *, return_state=False):
        y = self.lin(x)
        return (y, None) if return_state else y
    def step(self, x, state):
        return self.lin(x), None
    def init_weights(self):
        self.lin.reset_parameters()

@hookimpl
def longhorn_zoo_mixers():
    return [MixerSpec(name="{name}", build=Identity, defaults=DEFAULTS)]
"""


def test_builtin_mixers_are_found_through_entry_points():
    reg = build_registry()
    assert {"llama", "longhorn"} <= set(reg.names())
    assert reg.get("longhorn").source.dist == "longhorn-zoo"


def test_throwaway_plugin_is_discovered_and_builds(install_plugin):
    install_plugin("lz-toy", {"toy": GOOD.format(name="toy")}, version="1.2.3")
    reg = build_registry()
    entry = reg.get("toy")
    assert (entry.source.dist, entry.source.version) == ("lz-toy", "1.2.3")
    assert not reg.errors


def test_broken_import_is_reported_by_name_and_others_stay_usable(install_plugin):
    install_plugin("lz-broken", {"broken": "raise ImportError('needs libfoo')\n"})
    reg = build_registry()
    assert any("'broken'" in e and "lz-broken" in e and "needs libfoo" in e for e in reg.errors)
    assert "longhorn" in reg.names()
    with pytest.raises(PluginError, match="failed to load"):
        reg.get("broken")


def test_invalid_spec_is_reported(install_plugin):
    src = "from longhorn_zoo import hookimpl\n@hookimpl\ndef longhorn_zoo_mixers():\n    return ['not a spec']\n"
    install_plugin("lz-bad", {"bad": src})
    reg = build_registry()
    assert any("lz-bad" in e and "invalid spec" in e and "MixerSpec" in e for e in reg.errors)
    assert "llama" in reg.names()


def test_missing_defaults_file_is_an_invalid_spec(install_plugin):
    src = GOOD.format(name="nodefaults").replace("DEFAULTS.write_text", "str")
    install_plugin("lz-nodefaults", {"nd": src})
    reg = build_registry()
    assert any("lz-nodefaults" in e and "does not exist" in e for e in reg.errors)



def test_a_bad_valid_table_is_an_invalid_spec(install_plugin):
    src = GOOD.format(name="badvalid").replace("width = 2\\n", "width = 2\\n[valid]\\nwidht = { min = 1 }\\n")
    install_plugin("lz-badvalid", {"bv": src})
    reg = build_registry()
    assert any("lz-badvalid" in e and "'widht', which is not an option of [mixer]" in e and "'width'" in e
               for e in reg.errors)


def test_duplicate_name_names_both_distributions(install_plugin):
    install_plugin("lz-dup-a", {"a": GOOD.format(name="dupe")})
    install_plugin("lz-dup-b", {"b": GOOD.format(name="dupe")})
    reg = build_registry()
    with pytest.raises(PluginError, match=r"lz-dup-a.*lz-dup-b|lz-dup-b.*lz-dup-a"):
        reg.get("dupe")
    assert "longhorn" in reg.names()


def test_a_plugin_named_like_a_builtin_is_an_error_naming_both_distributions(install_plugin):
    """The entry point's name and the mixer's name are both "llama", as the built-in's are."""
    install_plugin("lz-my-llama", {"llama": GOOD.format(name="llama")})
    reg = build_registry()
    with pytest.raises(PluginError, match=r"mixer 'llama' is registered by more than one plugin.*longhorn-zoo.*"
                                          r"lz-my-llama|lz-my-llama.*longhorn-zoo"):
        reg.get("llama")
    assert any("'llama' registered twice" in e and "lz-my-llama" in e and "longhorn-zoo" in e for e in reg.errors)
    assert "longhorn" in reg.names()


def test_unknown_mixer_suggests_a_close_match():
    with pytest.raises(PluginError, match="Did you mean 'longhorn'"):
        build_registry().get("longhron")


def test_listing_command_prints_every_mixer_with_backends():
    cmd = [sys.executable, "-m", "longhorn_zoo.registry"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert "longhorn" in lines and "llama" in lines
    assert "longhorn-zoo" in lines["longhorn"] and "cpu-reference" in lines["longhorn"]
