"""Checkpoints with torch.distributed.checkpoint (DCP): save, resume, SIGTERM, export.

Layout under ``<dump_folder>/<checkpoint.folder>``::

    step-200/          a complete checkpoint: DCP shards, .metadata and manifest.json
    step-400.tmp/      a save in progress (or one killed mid-way): never loaded
    model.pt           the model-only export (checkpoint.export_on_finish)

A save writes ``step-N.tmp``; once every rank's shards and DCP's ``.metadata`` are
written, rank 0 adds ``manifest.json`` (each file and its size) and renames the
folder to ``step-N``. The rename is atomic, so a kill at any moment leaves either
the complete ``step-N`` or a ``.tmp`` folder that resume ignores (and removes).
At start-up the newest ``step-N`` whose files match its manifest and which loads
is restored; a corrupt one is reported and the previous one is tried.

A checkpoint holds the model and optimizer (sharded DTensors under FSDP; keys are
plain parameter names whatever compile/AC wrappers are applied), the LR schedule,
each rank's data-loader and RNG (torch CPU and CUDA) states under ``rank<r>`` keys,
and the step. Resume therefore needs the same number of data-parallel ranks. The
exception is ``step-0``, a seed checkpoint (``checkpoint.create_seed_checkpoint``):
model weights only, so runs of any rank count start from identical weights.

Works with or without a process group (a single CPU process too).
``python -m longhorn_zoo.checkpoint export --checkpoint DIR --out model.pt`` writes the
model weights as a plain ``torch.save`` state dict, loadable with
``torch.load(path, weights_only=True)``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sys
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from longhorn_zoo.config import JobConfig

MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded, or a checkpoint folder with none that can."""


class _ModelState:
    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.model)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_model_state_dict(self.model, state)


class _OptimizerState:
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state)


class _PerRank:
    """State that differs between ranks, stored under ``rank<r>`` so DCP keeps every rank's copy."""

    def __init__(self, rank: int, get: Callable[[], dict[str, Any]], put: Callable[[dict[str, Any]], None]) -> None:
        self.key, self.get, self.put = f"rank{rank}", get, put

    def state_dict(self) -> dict[str, Any]:
        return {self.key: self.get()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.put(state[self.key])


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def step_dirs(folder: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``step-N`` folder (saved complete), newest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found, reverse=True)


def verify(path: Path) -> str | None:
    """None if ``path`` holds every file its manifest lists at the listed size, else what is wrong."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return f"no {MANIFEST} (not written by a finished save)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as e:
        return f"unreadable {MANIFEST}: {e}"
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            return f"missing file {name}"
        if f.stat().st_size != size:
            return f"file {name} has {f.stat().st_size} bytes, the manifest says {size}"
    return None


class CheckpointManager:
    """Saves and restores the whole training state with DCP; see the module docstring."""

    def __init__(self, cfg: JobConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
                 lr_scheduler: Any, dataloader: Any, rank: int, device: torch.device) -> None:
        self.cfg = cfg.checkpoint
        self.folder = Path(cfg.job.dump_folder) / self.cfg.folder
        self.model, self.rank = model, rank
        self.step = {"step": 0}
        self.states = {
            "model": _ModelState(model),
            "optimizer": _OptimizerState(model, optimizer),
            "lr_scheduler": lr_scheduler,
            "dataloader": _PerRank(rank, dataloader.state_dict, dataloader.load_state_dict),
            "rng": _PerRank(rank, lambda: _rng_state(device), lambda s: _set_rng_state(s, device)),
            "train": self.step,
        }
        self.pending: tuple[Future, int] | None = None
        self.last_saved = -1
        # async writes run collectives from a background thread: give them their own gloo group
        self.async_group = None
        if self.cfg.enable and self.cfg.async_mode == "async" and dist.is_initialized():
            self.async_group = dist.new_group(backend="gloo")

    def _log(self, msg: str) -> None:
        if self.rank == 0:
            print(f"checkpoint: {msg}", flush=True)

    def _states(self, step: int) -> dict[str, Any]:
        """What a checkpoint of ``step`` holds: everything, or the weights alone for the seed (step 0)."""
        return self.states if step else {"model": self.states["model"], "train": self.step}

    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def load(self) -> int:
        """Restore the newest complete checkpoint (or ``load_step``); returns its step, 0 if none."""
        if not self.cfg.enable:
            return 0
        if self.rank == 0:
            for tmp in self.folder.glob("step-*.tmp"):
                self._log(f"removing {tmp.name}, a save that did not finish")
                shutil.rmtree(tmp, ignore_errors=True)
        self._barrier()
        candidates = step_dirs(self.folder)
        explicit = self.cfg.load_step != -1
        if explicit:
            candidates = [(s, p) for s, p in candidates if s == self.cfg.load_step]
            if not candidates:
                raise CheckpointError(f"checkpoint.load_step = {self.cfg.load_step}, but {self.folder} has no "
                                      f"complete step-{self.cfg.load_step}; found: "
                                      f"{[p.name for _, p in step_dirs(self.folder)] or 'none'}")
        problems = []
        for step, path in candidates:
            problem = verify(path)
            if problem is None:
                try:
                    dcp.load(self._states(step), checkpoint_id=str(path), no_dist=not dist.is_initialized())
                except (Exception, CheckpointException) as e:  # raised on every rank alike: all fall back
                    problem = f"loading failed: {type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
            if problem is None:
                self._log(f"resumed from {path} (step {self.step['step']})")
                self.last_saved = self.step["step"]
                return self.step["step"]
            if explicit:
                raise CheckpointError(f"checkpoint {path} is corrupt or incomplete: {problem}")
            problems.append(f"{path.name}: {problem}")
            self._log(f"{path} is corrupt or incomplete ({problem}); falling back to the previous checkpoint")
        if problems:
            raise CheckpointError(f"no loadable checkpoint in {self.folder}: {'; '.join(problems)}. Move the "
                                  "folder away to start from scratch.")
        self._log(f"no checkpoint in {self.folder}; starting from step 0")
        return 0

    def maybe_save(self, step: int, force: bool = False) -> None:
        """Save at every ``interval``-th step, and at ``step`` when ``force`` (the last step, SIGTERM)."""
        if self.cfg.enable and step != self.last_saved and (force or step % self.cfg.interval == 0):
            self.save(step)

    def save(self, step: int) -> None:
        """Write ``step-N.tmp``; it becomes ``step-N`` once complete (at once, or later when async)."""
        self.wait()
        self.step["step"] = step
        tmp = self.folder / f"step-{step}.tmp"
        if self.cfg.async_mode == "async":
            future = dcp.async_save(self._states(step), checkpoint_id=str(tmp), process_group=self.async_group,
                                    no_dist=not dist.is_initialized())
            self.pending = (future, step)
        else:
            dcp.save(self._states(step), checkpoint_id=str(tmp), no_dist=not dist.is_initialized())
            self._finalize(step)
        self.last_saved = step

    def wait(self) -> None:
        """Block until an async save in flight is written and finalized."""
        if self.pending is not None:
            future, step = self.pending
            future.result()
            self.pending = None
            self._finalize(step)

    def _finalize(self, step: int) -> None:
        """Rank 0: write the manifest, rename ``.tmp`` to the final name, drop old checkpoints."""
        if self.rank != 0:
            return
        tmp, final = self.folder / f"step-{step}.tmp", self.folder / f"step-{step}"
        files = {f.name: f.stat().st_size for f in tmp.iterdir() if f.is_file()}
        (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=1))
        if final.exists():  # an older save of the same step, e.g. from before a fallback
            shutil.rmtree(final)
        os.replace(tmp, final)
        self._log(f"saved {final}")
        if self.cfg.keep_latest_k > 0:
            for _, old in step_dirs(self.folder)[self.cfg.keep_latest_k:]:
                shutil.rmtree(old, ignore_errors=True)

    def export(self, path: Path | None = None) -> Path:
        """Gather full weights and write them (rank 0) as a plain state dict; a collective under FSDP."""
        path = path or self.folder / "model.pt"
        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({k: v.to(_DTYPES[self.cfg.export_dtype]) for k, v in state.items()}, path)
            self._log(f"exported model weights to {path}")
        self._barrier()
        return path

    def close(self, export: bool) -> None:
        """Finish an async save in flight; export the weights if asked and ``export``."""
        self.wait()
        if export and self.cfg.export_on_finish:
            self.export()


class SigtermFlag:
    """Records SIGTERM (e.g. a preemption); every rank agrees on it so all stop at the same step."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.received = device, False
        self.previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        self.received = True

    def requested(self) -> bool:
        """True on every rank if any rank got SIGTERM (a collective when distributed)."""
        if not dist.is_initialized():
            return self.received
        flag = torch.tensor([float(self.received)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self.previous)


def read_model_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The model weights of a DCP checkpoint as full CPU tensors; no model code or process group needed.

    Args:
        checkpoint: A ``step-N`` folder, or a checkpoint folder (its newest complete step is used).
    """
    if not (checkpoint / ".metadata").is_file():
        complete = [p for _, p in step_dirs(checkpoint) if verify(p) is None]
        if not complete:
            raise CheckpointError(f"{checkpoint} is neither a DCP checkpoint nor a folder holding a complete one")
        checkpoint = complete[0]
    meta = dcp.FileSystemReader(str(checkpoint)).read_metadata()
    model = {k.removeprefix("model."): torch.empty(m.size, dtype=m.properties.dtype)
             for k, m in meta.state_dict_metadata.items()
             if k.startswith("model.") and isinstance(m, TensorStorageMetadata)}
    if not model:
        raise CheckpointError(f"{checkpoint} holds no model weights")
    dcp.load({"model": model}, checkpoint_id=str(checkpoint), no_dist=True)
    return model


def export_checkpoint(checkpoint: Path, out: Path, dtype: str = "float32") -> Path:
    """Write the model weights of a DCP checkpoint (see :func:`read_model_weights`) as a ``torch.save`` file.

    Args:
        checkpoint: A ``step-N`` folder, or a checkpoint folder (its newest complete step is used).
        out: The ``.pt`` file to write.
        dtype: ``float32`` or ``bfloat16``.
    """
    model = read_model_weights(checkpoint)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.to(_DTYPES[dtype]) for k, v in model.items()}, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m longhorn_zoo.checkpoint", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="write a DCP checkpoint's model weights as a torch.save state dict")
    exp.add_argument("--checkpoint", type=Path, required=True, help="a step-N folder or the checkpoint folder")
    exp.add_argument("--out", type=Path, required=True, help="output .pt file")
    exp.add_argument("--dtype", default="float32", choices=sorted(_DTYPES))
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.out, args.dtype)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
