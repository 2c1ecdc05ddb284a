"""The conformance suite as an importable pytest test class.

Subclass :class:`MixerConformance` in a test module and name your mixer::

    from longhorn_zoo.conformance import MixerConformance

    class TestMyMixer(MixerConformance):
        mixer = "my_mixer"

Each property is one test, parametrized by mixer name, so a failure reads
``TestMyMixer::test_causality[my_mixer]`` with the message
``mixer 'my_mixer' breaks causality: ...``. The compile and distributed tests
carry the markers ``conformance_compile`` and ``conformance_distributed`` so a
quick run can leave them out (``-m "not conformance_compile"``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from longhorn_zoo.conformance import checks
from longhorn_zoo.conformance.distributed import distributed_problems
from longhorn_zoo.conformance.documents import check_documents
from longhorn_zoo.conformance.harness import Conformance
from longhorn_zoo.registry import get_registry

_DISTRIBUTED = pytest.StashKey[dict[str, "str | None"]]()


class MixerConformance:
    """Every conformance check, as pytest tests, for the mixers named by :attr:`mixer`.

    Attributes:
        mixer: A mixer name, a sequence of names, or None for the names given
            with ``--mixer`` (every installed mixer when there are none).
        dim: Model width of the checks.
        n_layers: Blocks of the LM-level checks (gradients, checkpoint, distributed).
        seq_len: Longest sequence; the checks also use 7 tokens and 1.
        options: ``[model.mixer]`` overrides for the checks, e.g. ``{"n_heads": 2}``.
    """

    mixer: str | Sequence[str] | None = None
    dim: int = 64
    n_layers: int = 2
    seq_len: int = 24
    options: Mapping[str, Any] = {}

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        if "mixer_name" not in metafunc.fixturenames:
            return
        names = self.mixer
        if names is None:
            names = metafunc.config.getoption("mixer", None) or get_registry().names()
        names = [names] if isinstance(names, str) else list(names)
        metafunc.parametrize("mixer_name", names, ids=names)

    @pytest.fixture
    def conformance(self, mixer_name: str, request: pytest.FixtureRequest) -> Conformance:
        backend = request.config.getoption("conformance_compile_backend", "aot_eager")
        return Conformance(mixer_name, self.dim, self.n_layers, self.seq_len, self.options, backend)

    def test_contract(self, conformance: Conformance) -> None:
        checks.check_contract(conformance)

    def test_shapes(self, conformance: Conformance) -> None:
        checks.check_shapes(conformance)

    def test_causality(self, conformance: Conformance) -> None:
        checks.check_causality(conformance)

    def test_step(self, conformance: Conformance) -> None:
        checks.check_step(conformance)

    def test_state_split(self, conformance: Conformance) -> None:
        checks.check_state_split(conformance)

    def test_gradients(self, conformance: Conformance) -> None:
        checks.check_gradients(conformance)

    def test_ops(self, conformance: Conformance) -> None:
        checks.check_ops(conformance)  # fails a forward that calls a scan op not in MixerSpec.ops
        if not conformance.ops:
            pytest.skip(f"mixer {conformance.name!r} registers no scan ops and its forward calls none")

    def test_resets(self, conformance: Conformance) -> None:
        if not checks.resetting_ops(conformance):
            pytest.skip(f"mixer {conformance.name!r} has no scan op with document resets")
        checks.check_resets(conformance)

    def test_documents(self, conformance: Conformance) -> None:
        check_documents(conformance)

    def test_checkpoint(self, conformance: Conformance) -> None:
        checks.check_checkpoint(conformance)

    @pytest.mark.conformance_compile
    def test_compile(self, conformance: Conformance) -> None:
        checks.check_compile(conformance)

    @pytest.mark.conformance_distributed
    def test_distributed(self, conformance: Conformance, request: pytest.FixtureRequest) -> None:
        problem = _distributed_results(request)[_key(conformance)]
        if problem:
            raise conformance.fail("distributed", problem)


def _key(c: Conformance) -> str:
    return json.dumps(c.settings(), sort_keys=True, default=str)


def _distributed_results(request: pytest.FixtureRequest) -> dict[str, str | None]:
    """Results of the distributed check for every mixer selected in this session, computed in one batch.

    The first distributed test of a session spawns the two ranks once for all the
    mixers whose distributed test was selected, instead of once per mixer.
    """
    results = request.config.stash.setdefault(_DISTRIBUTED, {})
    pending: dict[str, Conformance] = {}
    for item in request.session.items:
        cls = getattr(item, "cls", None)
        callspec = getattr(item, "callspec", None)
        if not (cls and issubclass(cls, MixerConformance) and item.get_closest_marker("conformance_distributed")
                and callspec and "mixer_name" in callspec.params):
            continue
        backend = request.config.getoption("conformance_compile_backend", "aot_eager")
        c = Conformance(callspec.params["mixer_name"], cls.dim, cls.n_layers, cls.seq_len, cls.options, backend)
        if _key(c) not in results:
            pending[_key(c)] = c
    if pending:
        results.update(zip(pending, distributed_problems(list(pending.values()))))
    return results
