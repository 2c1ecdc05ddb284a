"""Metrics: one console line per log step, TensorBoard scalars and an optional JSON-lines file.

Every number the trainer reports is computed here. Loss and accuracy are averaged
over all data-parallel ranks; throughput and memory are this device's (rank 0's).
TensorBoard scalar names (under ``<dump_folder>/<save_tb_folder>``; the same keys
in ``<dump_folder>/metrics.jsonl`` with ``metrics.enable_jsonl``, plus ``step``):

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

Forward FLOPs per token come from :func:`longhorn_zoo.model.flops_per_token`, which asks
each mixer plugin for its count (attention's T-dependent term, a scan's state
updates), so MFU means the same thing for every mixer.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist


def memory_gib(device: torch.device) -> tuple[float, float]:
    """(max active, max reserved) GiB on CUDA; (max RSS, max RSS) of the process on CPU."""
    if device.type == "cuda":
        active = torch.cuda.memory_stats(device).get("active_bytes.all.peak", 0)
        return active / 2**30, torch.cuda.max_memory_reserved(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return rss, rss


class MetricsLogger:
    """Accumulates step statistics and writes them every ``log_freq`` steps (rank 0 only)."""

    def __init__(self, tb_dir: Path | None, log_freq: int, rank: int, device: torch.device,
                 flops_per_token: float, peak_flops: float | None, jsonl: Path | None = None) -> None:
        self.log_freq, self.rank, self.device = log_freq, rank, device
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.jsonl = jsonl if rank == 0 else None
        self.writer = None
        if tb_dir is not None and rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(tb_dir))
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
            if self.writer is not None:
                for k, v in out.items():
                    self.writer.add_scalar(k, v, step)
                self.writer.flush()
            if self.jsonl is not None:
                self.jsonl.parent.mkdir(parents=True, exist_ok=True)
                with self.jsonl.open("a") as f:
                    f.write(json.dumps({"step": step, **out}) + "\n")
        self._reset()
        return out

    def scalar(self, name: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(name, value, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        sys.stdout.flush()
