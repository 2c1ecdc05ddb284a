"""The suite that ``pytest --mixer NAME`` and ``python -m trainer.conformance NAME`` collect."""

from trainer.conformance.suite import MixerConformance


class TestMixer(MixerConformance):
    """Every check on the mixers named with ``--mixer`` (every installed mixer when none is named)."""
