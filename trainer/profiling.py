"""Step traces and memory snapshots: the ``[profiling]`` section, with torchtitan's option names.

Every ``profile_freq``-th training step is traced with ``torch.profiler`` after up to three
warm-up steps, and written as ``<dump>/<save_traces_folder>/iteration_N/rankR_trace.json``
(Chrome trace format: Perfetto and TensorBoard open it). With ``enable_memory_snapshot`` on
CUDA, the allocator's history is recorded from the start and dumped as
``<dump>/<save_memory_snapshot_folder>/iteration_N/rankR_memory_snapshot.pickle`` at the same
steps, and once more if the run dies out of memory. ``benchmarks/profile_step.py`` reads the
traces and groups a step's CUDA time by kind of kernel.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerAction, ProfilerActivity

from longhorn_zoo.config import Profiling

WARMUP_STEPS = 3
MEMORY_HISTORY_ENTRIES = 100_000


class Profiler:
    """Traces and snapshots for the steps ``start + 1 ..``: call :meth:`step` after each, :meth:`close` at the end.

    Starts on construction; does nothing when ``enable_profiling`` and ``enable_memory_snapshot`` are off.
    """

    def __init__(self, cfg: Profiling, dump: Path, rank: int, device: torch.device, start: int) -> None:
        self.cfg, self.rank, self.start = cfg, rank, start
        self.traces = dump / cfg.save_traces_folder
        self.snapshots = dump / cfg.save_memory_snapshot_folder
        self.last_step = start
        self._memory = cfg.enable_memory_snapshot and device.type == "cuda"
        if cfg.enable_memory_snapshot and not self._memory and rank == 0:
            print("profiling.enable_memory_snapshot: the allocator's history exists on CUDA only; "
                  "this run on the CPU writes no snapshots", file=sys.stderr)
        if self._memory:
            torch.cuda.memory._record_memory_history(max_entries=MEMORY_HISTORY_ENTRIES)
            torch._C._cuda_attach_out_of_memory_observer(self._on_out_of_memory)
        self._torch_profiler: torch.profiler.profile | None = None
        if cfg.enable_profiling:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            self._torch_profiler = torch.profiler.profile(activities=activities, schedule=self._action,
                                                          on_trace_ready=self._write_trace)
            self._torch_profiler.start()

    def _action(self, index: int) -> ProfilerAction:
        """What the profiler does during its ``index``-th step, that is training step ``start + 1 + index``."""
        until = -(self.start + 1 + index) % self.cfg.profile_freq  # steps before the next traced one
        if until == 0:
            return ProfilerAction.RECORD_AND_SAVE
        return ProfilerAction.WARMUP if until <= WARMUP_STEPS else ProfilerAction.NONE

    def _write_trace(self, prof: torch.profiler.profile) -> None:
        folder = self.traces / f"iteration_{self.start + prof.step_num}"
        folder.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(folder / f"rank{self.rank}_trace.json"))

    def _dump_memory(self, name: str) -> None:
        folder = self.snapshots / name
        folder.mkdir(parents=True, exist_ok=True)
        torch.cuda.memory._dump_snapshot(str(folder / f"rank{self.rank}_memory_snapshot.pickle"))

    def _on_out_of_memory(self, device: int, alloc: int, device_alloc: int, device_free: int) -> None:
        self._dump_memory(f"iteration_{self.last_step + 1}_oom")

    def step(self, step: int) -> None:
        """Marks the end of training step ``step`` (consecutive from ``start + 1``)."""
        self.last_step = step
        if self._torch_profiler is not None:
            self._torch_profiler.step()
        if self._memory and step % self.cfg.profile_freq == 0:
            self._dump_memory(f"iteration_{step}")

    def close(self) -> None:
        if self._torch_profiler is not None:
            self._torch_profiler.stop()
            self._torch_profiler = None
        if self._memory:
            torch.cuda.memory._record_memory_history(enabled=None)
            self._memory = False
