"""What the wheel and the sdist carry: every package folder, every tracked file, one import name."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from longhorn_zoo.tomlcompat import tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]
NOT_IN_SDIST = {".ci/run", ".ci/oldest_triton", ".gitignore"}  # the CI scripts and git's own file
SDIST_ONLY = {"PKG-INFO", "setup.cfg"}  # written by setuptools


def package_folders() -> dict[str, Path]:
    """Every folder with an ``__init__.py`` under the package-dir roots, by the import name it gets."""
    found = {}
    for name, folder in SETUPTOOLS["package-dir"].items():
        root = ROOT / folder
        for init in root.rglob("__init__.py"):
            rel = init.parent.relative_to(root)
            found[".".join([name, *rel.parts])] = init.parent
    return found


def test_packages_list_names_every_package_folder():
    """A new plugin (or any) folder with an __init__.py that pyproject does not list would be left out of the wheel."""
    listed, found = set(SETUPTOOLS["packages"]), set(package_folders())
    assert listed == found, f"missing from pyproject's packages: {sorted(found - listed)}; " \
                            f"listed without a folder: {sorted(listed - found)}"
    assert {"longhorn_zoo.csrc", "longhorn_zoo.train_configs"} <= listed


def test_everything_installs_under_the_one_import_name():
    assert all(name == "longhorn_zoo" or name.startswith("longhorn_zoo.") for name in SETUPTOOLS["packages"])
    assert all(target.startswith("longhorn_zoo") for target in PYPROJECT["project"]["scripts"].values())


def _git_files() -> set[str] | None:
    """Tracked and untracked-but-not-ignored files that exist, or None outside a git checkout."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        return None
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return {f for f in out.splitlines() if (ROOT / f).is_file()}


def test_sdist_holds_every_file_of_the_checkout(tmp_path):
    """The sdist is the project (tests, conftest, configs, CUDA sources, docs, examples), so its tests pass from it."""
    files = _git_files()
    if files is None:
        pytest.skip("not a git checkout (an unpacked sdist, say): nothing to compare the sdist with")
    pytest.importorskip("setuptools", minversion=PYPROJECT["build-system"]["requires"][0].split(">=")[1])
    code = f"from setuptools import build_meta; print(build_meta.build_sdist({str(tmp_path)!r}))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with tarfile.open(tmp_path / proc.stdout.split()[-1]) as tar:
        members = {m.name.split("/", 1)[1] for m in tar.getmembers() if m.isfile()}
    members = {m for m in members if m not in SDIST_ONLY and ".egg-info/" not in m}
    expected = files - NOT_IN_SDIST
    assert members == expected, f"missing from the sdist: {sorted(expected - members)}; " \
                                f"not in the checkout: {sorted(members - expected)}"
    assert {"LICENSE", "tests/conftest.py", "tests/trainer_runs.py", "csrc/binding.cpp",
            "train_configs/debug_longhorn.toml"} <= members
