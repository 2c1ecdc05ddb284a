"""The longhorn-zoo conformance suite on the deltanet mixer: ``pytest examples/third_party_mixer/tests``."""

from longhorn_zoo.conformance import MixerConformance


class TestDeltaNet(MixerConformance):
    mixer = "deltanet"
