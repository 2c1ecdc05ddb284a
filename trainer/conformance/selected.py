"""The suite that ``pytest --mixer NAME`` and ``python -m longhorn_zoo.conformance NAME`` collect."""

from longhorn_zoo.conformance.suite import MixerConformance


class TestMixer(MixerConformance):
    """Every check on the mixers named with ``--mixer`` (every installed mixer when none is named)."""
