"""Another distribution's top-level ``trainer``/``plugins`` packages neither shadow nor remove ours.

PyPI's ``trainer`` and ``coqui-tts-trainer`` install a top-level ``trainer/`` (``__init__``,
``config``, ``model``). This test pip-installs a stand-in for them into the running environment,
checks that longhorn-zoo still imports, trains and finds its plugins, uninstalls it and checks that
every file of ours survived. It changes the environment, so it is marked ``installs`` (deselected by
default); ``.ci/run`` runs it in the throwaway venv that holds the installed wheel.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.resources
import json
import os
import subprocess
import sys
import zipfile
from importlib.metadata import PackagePath, distributions
from pathlib import Path

import pytest

pytestmark = pytest.mark.installs

DUMMY = "clashing-trainer"
OUR_PACKAGES = ("longhorn_zoo", "longhorn_zoo.plugins", "longhorn_zoo.csrc", "longhorn_zoo.train_configs")
GENERIC_NAMES = {"trainer", "plugins", "csrc", "train_configs"}
BUILT_IN = {"gla", "llama", "longhorn", "mamba", "retnet", "rwkv"}
PROBE = """
import importlib.util, json
import longhorn_zoo.config, longhorn_zoo.model, longhorn_zoo.train
from longhorn_zoo.registry import get_registry
spec = importlib.util.find_spec("trainer")
reg = get_registry()
print(json.dumps({"trainer": spec and spec.origin, "mixers": reg.names(), "errors": [str(e) for e in reg.errors]}))
"""


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def build_dummy_wheel(folder: Path) -> Path:
    """A wheel of ``clashing-trainer``: top-level ``trainer`` (with config and model) and ``plugins``."""
    info = f"{DUMMY.replace('-', '_')}-1.0.dist-info"
    files = {
        "trainer/__init__.py": b'OWNER = "clashing-trainer"\n',
        "trainer/config.py": b"import coqpit  # noqa: F401  (as the real one needs a package we lack)\n",
        "trainer/model.py": b'OWNER = "clashing-trainer"\n',
        "plugins/__init__.py": b'OWNER = "clashing-trainer"\n',
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {DUMMY}\nVersion: 1.0\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = [_record_line(n, d) for n, d in files.items()] + [f"{info}/RECORD,,"]
    files[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    path = folder / f"{DUMMY.replace('-', '_')}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as whl:
        for name, data in files.items():
            whl.writestr(name, data)
    return path


def our_files() -> dict[str, str]:
    """sha256 of every file of our packages where this environment imports them from."""
    out = {}
    for pkg in OUR_PACKAGES:
        root = Path(str(importlib.resources.files(pkg)))
        for f in root.rglob("*"):
            if f.is_file() and "__pycache__" not in f.parts:
                out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def installed_record() -> list[PackagePath]:
    """The files pip installed for longhorn-zoo (its RECORD; not a checkout's egg-info on sys.path)."""
    (dist,) = [d for d in distributions(name="longhorn-zoo") if d.read_text("RECORD") is not None]
    return list(dist.files or [])


def run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, env=env,
                          cwd=Path.home() if Path.home().is_dir() else None)


def probe() -> dict:
    proc = run("-c", PROBE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_a_clashing_top_level_trainer_neither_shadows_nor_removes_ours(tmp_path):
    if run("-m", "pip", "--version").returncode != 0:
        pytest.skip("pip is not available in this environment")
    record = installed_record()
    assert not {Path(str(f)).parts[0] for f in record} & GENERIC_NAMES, "we install a generic top-level name"
    before = our_files()
    assert before
    wheel = build_dummy_wheel(tmp_path)
    installed = run("-m", "pip", "install", "--no-deps", "--no-index", str(wheel))
    assert installed.returncode == 0, installed.stderr[-3000:]
    try:
        seen = probe()
        assert seen["trainer"] and seen["trainer"].endswith(os.path.join("trainer", "__init__.py"))
        assert BUILT_IN <= set(seen["mixers"]) and not seen["errors"], seen
        helped = run("-m", "longhorn_zoo.train", "--help")
        assert helped.returncode == 0 and "--training.steps" in helped.stdout, helped.stderr[-3000:]
        assert our_files() == before
    finally:
        removed = run("-m", "pip", "uninstall", "-y", DUMMY)
    assert removed.returncode == 0, removed.stderr[-3000:]
    assert our_files() == before, "uninstalling the other distribution changed or removed files of ours"
    missing = [str(f) for f in record if not Path(str(f.locate())).exists()]
    assert not missing, f"files of longhorn-zoo's RECORD gone: {missing[:5]}"
    after = probe()
    assert after["trainer"] is None and BUILT_IN <= set(after["mixers"]) and not after["errors"], after
