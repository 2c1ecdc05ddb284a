"""Checkpoints with torch.distributed.checkpoint (DCP): save, resume, SIGTERM, export.

Layout under ``<dump_folder>/<checkpoint.folder>``::

    step-200/          a complete checkpoint: DCP shards, .metadata and manifest.json
    step-400.tmp/      a save in progress (or one killed mid-way): never loaded
    model.pt           the model-only export (checkpoint.export_on_finish)

A save writes ``step-N.tmp`` through :class:`~longhorn_zoo.manifest.ChecksumWriter`,
which records every file's size and CRC-32 as the bytes are written and, once every
rank's shards and DCP's ``.metadata`` are written, adds ``manifest.json``; rank 0 then
renames the folder to ``step-N``. The rename is atomic, so a kill at any moment leaves
either the complete ``step-N`` or a ``.tmp`` folder that resume ignores (and removes).
At start-up the newest ``step-N`` whose files match their manifest (sizes and
checksums, the reading shared by the ranks) is restored; a corrupt one is reported,
naming the file, and the previous one is tried.

A checkpoint holds the model and optimizer (sharded DTensors under FSDP; keys are
plain parameter names whatever compile/AC wrappers are applied), the LR schedule,
each rank's data-loader and RNG (torch CPU and CUDA) states under ``rank<r>`` keys,
and the step with the global batch and micro-batch it was trained with. A resume on
another number of ranks works: DCP reshards the model and optimizer, and the data
position is carried over from the global number of sequences read
(:func:`longhorn_zoo.data.load_resharded`); one line says what changed. ``step-0`` is a
seed checkpoint (``checkpoint.create_seed_checkpoint``): model weights only, so runs of
any rank count start from identical weights.

Works with or without a process group (a single CPU process too).
``python -m longhorn_zoo.checkpoint export --checkpoint DIR --out model.pt`` writes the
model weights as a plain ``torch.save`` state dict, loadable with
``torch.load(path, weights_only=True)``; DIR is a run's dump folder, its checkpoint
folder or one ``step-N`` folder, as for ``longhorn_zoo.eval`` and ``longhorn_zoo.generate``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import warnings
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
from longhorn_zoo.data import batch_order, load_resharded
from longhorn_zoo.manifest import ChecksumWriter, step_dirs, verify
from longhorn_zoo.tomlcompat import tomllib

__all__ = ["CheckpointError", "CheckpointManager", "SigtermFlag", "export_checkpoint", "find_checkpoint",
           "read_model_weights", "step_dirs", "verify"]

# DCP warns at every save and load without a process group that it assumes one process: here that is intended.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")

EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
"""The dtypes exported weights can take (checkpoint.export_dtype, the export commands)."""


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


def _ranks(n: int) -> str:
    return f"{n} rank" if n == 1 else f"{n} ranks"


def _change(was: int, now: int) -> str:
    return f"{now} (unchanged)" if was == now else f"{was} -> {now}"


class CheckpointManager:
    """Saves and restores the whole training state with DCP; see the module docstring."""

    def __init__(self, cfg: JobConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
                 lr_scheduler: Any, dataloader: Any, rank: int, world_size: int, device: torch.device) -> None:
        self.cfg = cfg.checkpoint
        self.folder = Path(cfg.job.dump_folder) / self.cfg.folder
        self.model, self.loader, self.rank, self.world_size = model, dataloader, rank, world_size
        self.device = device
        micro = cfg.training.local_batch_size * world_size
        gbs = cfg.training.global_batch_size
        self.step = {"step": 0, "global_batch": micro if gbs == -1 else gbs, "micro_batch": micro}
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
        return self.states if step else {"model": self.states["model"], "train": {"step": self.step["step"]}}

    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def _verify(self, path: Path) -> str | None:
        """:func:`verify` with the checksums shared out over the ranks; every rank gets the first problem."""
        problem = verify(path, (self.rank, self.world_size))
        if not dist.is_initialized():
            return problem
        problems: list[str | None] = [None] * self.world_size
        dist.all_gather_object(problems, problem)
        return next((p for p in problems if p is not None), None)

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
            problem = self._verify(path)
            if problem is not None:
                what = f"{path} is corrupt or incomplete"
            else:
                what = f"{path} could not be loaded"
                try:
                    self._restore(step, path)
                except (Exception, CheckpointException) as e:  # raised on every rank alike: all fall back
                    problem = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
            if problem is None:
                self._log(f"resumed from {path} (step {self.step['step']})")
                self.last_saved = self.step["step"]
                return self.step["step"]
            if explicit:
                raise CheckpointError(f"{what}: {problem}")
            problems.append(f"{path.name}: {problem}")
            self._log(f"{what} ({problem}); falling back to the previous checkpoint")
        if problems:
            raise CheckpointError(f"no loadable checkpoint in {self.folder}: {'; '.join(problems)}. Move the "
                                  "folder away to start from scratch.")
        self._log(f"no checkpoint in {self.folder}; starting from step 0")
        return 0

    def _restore(self, step: int, path: Path) -> None:
        """Load ``path`` into the training state, carrying it over to this world size if it was saved on another."""
        meta = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        states = dict(self._states(step))
        # keys that an older version did not save keep this run's values (as if unchanged)
        states["train"] = saved = {k: v for k, v in self.step.items() if f"train.{k}" in meta}
        saved_world = len({k.split(".")[1] for k in meta if k.startswith("rng.rank")}) or self.world_size
        resharded = saved_world != self.world_size
        data: dict[str, Any] = {}
        if resharded:  # every rank takes the data and RNG states of an old rank (the positions agree)
            source = self.rank % saved_world
            states["dataloader"] = _PerRank(source, self.loader.state_dict, data.update)
            states["rng"] = _PerRank(source, lambda: _rng_state(self.device), lambda s: _set_rng_state(s, self.device))
        dcp.load(states, checkpoint_id=str(path), no_dist=not dist.is_initialized())
        saved = {**self.step, **saved}
        self.step["step"] = saved["step"]
        if not step:
            return
        micro, batch = self.step["micro_batch"], self.step["global_batch"]
        if resharded:
            order = load_resharded(self.loader, data, saved_world, saved["micro_batch"], micro)
        elif (saved["micro_batch"], saved["global_batch"]) != (micro, batch):
            order = batch_order(self.loader, saved["micro_batch"], micro)
        else:
            return
        self._log(f"{path.name} was saved on {_ranks(saved_world)} and resumes on {_ranks(self.world_size)}: "
                  f"global batch {_change(saved['global_batch'], batch)}, "
                  f"{'model and optimizer resharded, ' if resharded else ''}data order: {order}")

    def maybe_save(self, step: int, force: bool = False) -> None:
        """Save at every ``interval``-th step, and at ``step`` when ``force`` (the last step, SIGTERM)."""
        if self.cfg.enable and step != self.last_saved and (force or step % self.cfg.interval == 0):
            self.save(step)

    def save(self, step: int) -> None:
        """Write ``step-N.tmp``; it becomes ``step-N`` once complete (at once, or later when async)."""
        self.wait()
        self.step["step"] = step
        tmp = self.folder / f"step-{step}.tmp"
        writer = ChecksumWriter(tmp, step)
        if self.cfg.async_mode == "async":
            future = dcp.async_save(self._states(step), storage_writer=writer, checkpoint_id=str(tmp),
                                    process_group=self.async_group, no_dist=not dist.is_initialized())
            self.pending = (future, step)
        else:
            dcp.save(self._states(step), storage_writer=writer, checkpoint_id=str(tmp),
                     no_dist=not dist.is_initialized())
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
        """Rank 0: rename ``.tmp`` (its manifest written) to the final name, drop old checkpoints."""
        if self.rank != 0:
            return
        tmp, final = self.folder / f"step-{step}.tmp", self.folder / f"step-{step}"
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
            torch.save({k: v.to(EXPORT_DTYPES[self.cfg.export_dtype]) for k, v in state.items()}, path)
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


def find_checkpoint(path: Path) -> Path:
    """The complete ``step-N`` folder that ``path`` names: a run's dump folder (the folder holding its
    ``config.toml``; its checkpoint folder is used), a checkpoint folder (its newest complete step) or a
    ``step-N`` folder itself. Raises :class:`CheckpointError` if there is none, or if ``step-N`` is corrupt.
    """
    if (path / "config.toml").is_file():
        with (path / "config.toml").open("rb") as f:
            path = path / tomllib.load(f).get("checkpoint", {}).get("folder", "checkpoint")
    if (path / ".metadata").is_file():
        if problem := verify(path):
            raise CheckpointError(f"{path} is corrupt or incomplete: {problem}")
        return path
    for _, step in step_dirs(path):
        if (problem := verify(step)) is None:
            return step
        print(f"checkpoint: {step} is corrupt or incomplete ({problem}); trying the previous one", file=sys.stderr)
    raise CheckpointError(f"{path} holds no complete checkpoint; pass a run's dump folder, its checkpoint folder "
                          "or a step-N folder")


def read_model_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The model weights of a DCP checkpoint as full CPU tensors; no model code or process group needed.

    Args:
        checkpoint: A run's dump folder, a checkpoint folder or a ``step-N`` folder (see :func:`find_checkpoint`).
    """
    checkpoint = find_checkpoint(checkpoint)
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
        checkpoint: A run's dump folder, a checkpoint folder or a ``step-N`` folder (see :func:`find_checkpoint`).
        out: The ``.pt`` file to write.
        dtype: ``float32`` or ``bfloat16``.
    """
    model = read_model_weights(checkpoint)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.to(EXPORT_DTYPES[dtype]) for k, v in model.items()}, out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m longhorn_zoo.checkpoint", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="write a DCP checkpoint's model weights as a torch.save state dict")
    exp.add_argument("--checkpoint", type=Path, required=True,
                     help="a run's dump folder, its checkpoint folder or a step-N folder")
    exp.add_argument("--out", type=Path, required=True, help="output .pt file")
    exp.add_argument("--dtype", default="float32", choices=sorted(EXPORT_DTYPES))
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
