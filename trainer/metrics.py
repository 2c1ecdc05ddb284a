"""Metrics: one console line per log step, TensorBoard or Weights & Biases scalars, an optional JSON-lines file.

Every number the trainer reports is computed here. Loss and accuracy are averaged
over all data-parallel ranks; throughput and memory are this device's (rank 0's).
Each run writes its TensorBoard events to a folder of its own,
``<dump_folder>/<save_tb_folder>/<YYYYmmdd-HHMMSS>``, so that runs sharing a dump folder
(a resumed run, a repeated one) stay separate runs in TensorBoard. The scalar names
(the same for W&B, ``metrics.enable_wandb``; the same keys in ``<dump_folder>/metrics.jsonl``
with ``metrics.enable_jsonl``, plus ``step``):

==========================  =====================================================
``loss/train``              mean training loss over the log interval and all ranks
``loss/val``                validation loss (when evaluated)
``accuracy/train``          token accuracy on scored labels (MQAR: recall accuracy)
``lr``                      learning rate at the step
``grad_norm``               total gradient norm before clipping
``throughput/tokens_per_s`` tokens per second per device over the interval
``throughput/tflops``       achieved model TFLOP/s per device: 3 x forward FLOPs/token x tokens/s
``throughput/mfu_pct``      model FLOPs utilisation, percent of the peak (CUDA only)
``memory/max_active_gib``   peak active device memory (CUDA), else process RSS
``memory/max_reserved_gib`` peak reserved device memory (CUDA)
``time/data_s``             seconds spent waiting for data over the interval
==========================  =====================================================

A log step is every ``metrics.log_freq`` steps, the first step of a run and the last.

Forward FLOPs per token come from :func:`longhorn_zoo.model.flops_per_token`, which asks
each mixer plugin for its count (attention's T-dependent term, a scan's state
updates), so MFU means the same thing for every mixer.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from longhorn_zoo.config import JobConfig


def memory_gib(device: torch.device) -> tuple[float, float]:
    """(max active, max reserved) GiB on CUDA; (max RSS, max RSS) of the process on CPU."""
    if device.type == "cuda":
        active = torch.cuda.memory_stats(device).get("active_bytes.all.peak", 0)
        return active / 2**30, torch.cuda.max_memory_reserved(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return rss, rss


class ScalarWriter(Protocol):
    """Where the scalars of a log step go (TensorBoard, W&B)."""

    def write(self, scalars: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def new_run_folder(parent: Path) -> Path:
    """A new folder under ``parent`` named for the current time (``-1``, ``-2``... if it is taken)."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    parent.mkdir(parents=True, exist_ok=True)
    for n in range(1000):
        path = parent / (stamp if n == 0 else f"{stamp}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise FileExistsError(f"no free run folder for {stamp} under {parent}")


class TensorBoardWriter:
    """TensorBoard events in a new timestamped folder under ``parent`` (:func:`new_run_folder`)."""

    def __init__(self, parent: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = new_run_folder(parent)
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def write(self, scalars: dict[str, float], step: int) -> None:
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbWriter:
    """A Weights & Biases run (``wandb`` imported here, only when enabled).

    The project is ``$WANDB_PROJECT`` (default ``longhorn-zoo``); W&B's own files go under the
    dump folder; the resolved job config is the run's config. W&B's other environment
    variables (``WANDB_MODE=offline``, ``WANDB_ENTITY``, ...) apply as usual.
    """

    def __init__(self, dump_folder: Path, config: dict[str, Any], name: str) -> None:
        try:
            import wandb
        except ImportError:
            from longhorn_zoo.config import ConfigError

            raise ConfigError("metrics.enable_wandb = true needs the wandb package: pip install wandb "
                              "(or 'longhorn-zoo[wandb]')") from None
        dump_folder.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "longhorn-zoo"), dir=str(dump_folder),
                              config=config, name=name)

    def write(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


class MetricsLogger:
    """Accumulates step statistics and writes them every log step (rank 0 only) to ``writers``."""

    def __init__(self, writers: list[ScalarWriter], rank: int, device: torch.device, flops_per_token: float,
                 peak_flops: float | None, jsonl: Path | None = None) -> None:
        self.rank, self.device = rank, device
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.jsonl = jsonl if rank == 0 else None
        self.writers = writers if rank == 0 else []
        self._reset()

    def _reset(self) -> None:
        self.t0 = time.perf_counter()
        self.tokens = 0
        self.losses: list[float] = []
        self.correct = 0
        self.scored = 0
        self.data_time = 0.0

    def record(self, loss: float, tokens: int, correct: int, scored: int, data_time: float) -> None:
        self.losses.append(loss)
        self.tokens += tokens
        self.correct += correct
        self.scored += scored
        self.data_time += data_time

    def _global_sums(self) -> tuple[float, float, float, float]:
        """(loss sum, loss count, correct, scored) over all ranks (a collective when distributed)."""
        sums = [sum(self.losses), float(len(self.losses)), float(self.correct), float(self.scored)]
        if dist.is_initialized():
            t = torch.tensor(sums, dtype=torch.float64, device=self.device)
            dist.all_reduce(t)
            sums = t.tolist()
        return sums[0], sums[1], sums[2], sums[3]

    def log(self, step: int, lr: float, grad_norm: float) -> dict[str, float]:
        """Write and print the interval's numbers; returns them. Call on every rank."""
        dt = max(time.perf_counter() - self.t0, 1e-9)
        tps = self.tokens / dt
        active, reserved = memory_gib(self.device)
        loss_sum, n_losses, correct, scored = self._global_sums()
        out = {
            "loss/train": loss_sum / max(n_losses, 1),
            "accuracy/train": correct / max(scored, 1),
            "lr": lr,
            "grad_norm": grad_norm,
            "throughput/tokens_per_s": tps,
            "throughput/tflops": 3 * self.flops_per_token * tps / 1e12,
            "memory/max_active_gib": active,
            "memory/max_reserved_gib": reserved,
            "time/data_s": self.data_time,
        }
        if self.peak_flops:
            out["throughput/mfu_pct"] = 100 * 3 * self.flops_per_token * tps / self.peak_flops
        if self.rank == 0:
            mfu = f"  mfu {out['throughput/mfu_pct']:.1f}%" if "throughput/mfu_pct" in out else ""
            print(f"step {step:6d}  loss {out['loss/train']:.4f}  acc {out['accuracy/train']:.3f}  lr {lr:.2e}  "
                  f"grad_norm {grad_norm:.3f}  tok/s {tps:,.0f}{mfu}  mem {active:.2f}GiB", flush=True)
            for writer in self.writers:
                writer.write(out, step)
            if self.jsonl is not None:
                self.jsonl.parent.mkdir(parents=True, exist_ok=True)
                with self.jsonl.open("a") as f:
                    f.write(json.dumps({"step": step, **out}) + "\n")
        self._reset()
        return out

    def scalar(self, name: str, value: float, step: int) -> None:
        for writer in self.writers:
            writer.write({name: value}, step)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()
        sys.stdout.flush()


def build_metrics_logger(cfg: JobConfig, rank: int, device: torch.device, flops_per_token: float,
                         peak_flops: float | None) -> MetricsLogger:
    """The run's metrics logger, with the writers ``[metrics]`` enables (created on rank 0 only)."""
    m, dump = cfg.metrics, Path(cfg.job.dump_folder)
    writers: list[ScalarWriter] = []
    if rank == 0 and m.enable_tensorboard:
        writers.append(TensorBoardWriter(dump / m.save_tb_folder))
    if rank == 0 and m.enable_wandb:
        writers.append(WandbWriter(dump, cfg.to_dict(), cfg.job.description or dump.name))
    return MetricsLogger(writers, rank, device, flops_per_token, peak_flops,
                         dump / "metrics.jsonl" if m.enable_jsonl else None)
