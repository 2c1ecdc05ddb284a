"""pytest plugin of the conformance suite, registered as the ``pytest11`` entry point ``longhorn_zoo``.

It adds ``--mixer NAME`` (repeatable): with no test paths, ``pytest --mixer NAME``
runs the whole suite on those mixers; with paths, it names the mixers of any
:class:`~longhorn_zoo.conformance.MixerConformance` subclass that leaves ``mixer`` unset.
This module is loaded by every pytest run in the environment, so it imports
nothing heavy.
"""

from __future__ import annotations

from pathlib import Path

import pytest

SUITE = Path(__file__).with_name("selected.py")
"""The test module collected by ``pytest --mixer NAME``."""


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("longhorn_zoo", "longhorn-zoo mixer conformance suite")
    group.addoption("--mixer", action="append", default=[], metavar="NAME",
                    help="Run the conformance suite on this mixer (repeatable), or on a hybrid stack of several "
                         "named with + (longhorn+llama). Without test paths, runs only the suite.")
    group.addoption("--conformance-compile-backend", default="aot_eager", metavar="BACKEND",
                    help="torch.compile backend of the compile check. The default, aot_eager, traces the "
                         "forward and backward graphs (graph breaks, fake tensors) in seconds; inductor also "
                         "generates and runs code, at about 30 s of CPU per mixer.")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "conformance_compile: the conformance suite's torch.compile check (slow)")
    config.addinivalue_line("markers", "conformance_distributed: the conformance suite's 2-rank FSDP2 check (slow)")


def pytest_load_initial_conftests(early_config: pytest.Config, parser: pytest.Parser, args: list[str]) -> None:
    ns = early_config.known_args_namespace
    if getattr(ns, "mixer", None) and not getattr(ns, "file_or_dir", None):
        args.append(str(SUITE))
