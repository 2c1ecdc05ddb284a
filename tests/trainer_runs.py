"""Launch tiny training runs for the distributed and checkpoint tests: in-process, or as
``python -m longhorn_zoo.train`` / ``torchrun`` subprocesses (CPU, gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from longhorn_zoo.config import JobConfig, load_config

ROOT = Path(__file__).resolve().parents[1]

# A 2-layer Llama of width 32 on bytes: a step takes milliseconds on one core.
TINY = ["--model.name", "llama", "--model.dim", "32", "--model.n_layers", "2", "--training.seq_len", "32",
        "--training.local_batch_size", "4", "--lr_scheduler.warmup_steps", "2", "--optimizer.lr", "3e-3",
        "--metrics.log_freq", "1", "--metrics.enable_tensorboard", "false", "--metrics.enable_jsonl", "true"]


def tiny_config(dump: Path, *overrides: str) -> JobConfig:
    return load_config(None, [*TINY, "--job.dump_folder", str(dump), *overrides])


def command(dump: Path, *overrides: str, nproc: int = 1) -> list[str]:
    """The command line of a tiny run with ``nproc`` processes (torchrun when more than one)."""
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return [*launcher, "-m", "longhorn_zoo.train", *TINY, "--job.dump_folder", str(dump), *overrides]


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run(dump: Path, *overrides: str, nproc: int = 1, timeout: float = 240) -> str:
    """Run to completion; returns stdout and stderr. Fails the test, showing the output, on a non-zero exit."""
    proc = subprocess.run(command(dump, *overrides, nproc=nproc), cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


def start(dump: Path, *overrides: str) -> subprocess.Popen:
    """Start a one-process run in its own session (so a signal reaches only it)."""
    return subprocess.Popen(command(dump, *overrides), cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def records(dump: Path) -> list[dict[str, float]]:
    """Every metrics line the runs in ``dump`` logged, in order (resumed runs append)."""
    path = dump / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def losses(dump: Path) -> dict[int, float]:
    """Training loss by step; a step logged twice (before a kill and after resume) keeps the later value."""
    return {int(r["step"]): r["loss/train"] for r in records(dump)}
