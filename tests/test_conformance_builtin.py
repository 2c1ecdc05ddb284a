"""The conformance suite on every built-in mixer, taken from the registry so new mixers are checked as they land."""

from longhorn_zoo.conformance import MixerConformance
from longhorn_zoo.registry import get_registry

BUILTIN = [name for name, entry in sorted(get_registry().mixers.items()) if entry.source.dist == "longhorn-zoo"]


def test_every_builtin_plugin_loads() -> None:
    assert BUILTIN
    assert not [e for e in get_registry().errors if "longhorn-zoo" in e]


class TestBuiltinMixer(MixerConformance):
    mixer = BUILTIN
