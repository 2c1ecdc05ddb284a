"""Shared fixtures: throwaway plugins installed as dist-info folders on sys.path; the ``slow`` marker."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: a minute or more on 2 CPU cores (torchrun ranks, compilers, whole "
                                       "pipelines); deselected by default (pyproject's addopts), `pytest -m slow` "
                                       "and CI run them")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The conformance suite's compile and distributed checks are slow too."""
    for item in items:
        if item.get_closest_marker("conformance_compile") or item.get_closest_marker("conformance_distributed"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def install_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Install a throwaway plugin distribution on sys.path: ``install_plugin(dist, {ep: module_source})``."""
    monkeypatch.syspath_prepend(str(tmp_path))
    installed: list[str] = []

    def install(dist: str, modules: dict[str, str], version: str = "0.1") -> Path:
        info = tmp_path / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        lines = ["[longhorn_zoo.mixers]"]
        for ep_name, source in modules.items():
            mod = f"{dist.replace('-', '_')}_{ep_name}"
            (tmp_path / f"{mod}.py").write_text(textwrap.dedent(source))
            lines.append(f"{ep_name} = {mod}")
            installed.append(mod)
        (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
        return tmp_path

    yield install
    for mod in installed:
        sys.modules.pop(mod, None)
