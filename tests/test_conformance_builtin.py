"""The conformance suite on every built-in mixer, taken from the registry so new mixers are checked as they land."""

import pytest

from longhorn_zoo.conformance import Conformance, MixerConformance
from longhorn_zoo.registry import get_registry

BUILTIN = [name for name, entry in sorted(get_registry().mixers.items()) if entry.source.dist == "longhorn-zoo"]


def test_every_builtin_plugin_loads() -> None:
    assert BUILTIN
    assert not [e for e in get_registry().errors if "longhorn-zoo" in e]


class TestBuiltinMixer(MixerConformance):
    mixer = BUILTIN

    @pytest.mark.slow  # each op's own tests (test_longhorn.py, test_mamba.py, ...) run gradcheck and opcheck too
    def test_ops(self, conformance: Conformance) -> None:
        super().test_ops(conformance)
