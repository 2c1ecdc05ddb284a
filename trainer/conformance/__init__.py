"""The mixer conformance suite: every property a mixer plugin must have, checked on tiny sizes.

Three ways to run it on a mixer:

* ``pytest --mixer my_mixer`` (the ``pytest11`` plugin :mod:`longhorn_zoo.conformance.pytest_plugin`);
* ``python -m longhorn_zoo.conformance my_mixer``;
* a test module of your own::

      from longhorn_zoo.conformance import MixerConformance

      class TestMyMixer(MixerConformance):
          mixer = "my_mixer"

The properties are the functions of :mod:`longhorn_zoo.conformance.checks` (plus
:mod:`longhorn_zoo.conformance.documents` and :mod:`longhorn_zoo.conformance.distributed`); each
raises :class:`ConformanceError` naming the mixer and the property. See ``docs/plugins.md``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Conformance", "ConformanceError", "MixerConformance"]


def __getattr__(name: str) -> Any:
    # Lazy: pytest imports this package for the plugin in every run; torch is loaded only when the suite is used.
    if name in ("Conformance", "ConformanceError"):
        from longhorn_zoo.conformance import harness

        return getattr(harness, name)
    if name == "MixerConformance":
        from longhorn_zoo.conformance.suite import MixerConformance

        return MixerConformance
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
