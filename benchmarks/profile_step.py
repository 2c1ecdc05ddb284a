"""Where one training step's GPU time goes, by kind of kernel.

    python -m benchmarks.profile_step train_configs/longhorn_1b.toml [--steps 8] [--section.key value ...]

Trains ``--steps`` steps of the config through the trainer itself (compile, FSDP and the rest as
configured), traces the last one with the ``[profiling]`` section, and prints that step's CUDA
kernel time grouped as: scan, conv, attention, matmul, optimizer, copies, communication and
elementwise (inductor's fused kernels and the rest), with the largest kernels of each group.
The trace stays in ``<dump_folder>/profile_traces`` for Perfetto or TensorBoard.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

# First match wins; names are CUDA kernel names as the profiler records them.
GROUPS: tuple[tuple[str, str], ...] = (
    ("elementwise", r"^triton_(poi|red|per)_"),  # inductor's fused kernels, whatever ops they hold
    ("attention", r"flash|fmha|attention|sdpa|cudnn::fusion::convert_dq"),  # cuDNN's attention backward casts dq
    ("conv", r"conv"),
    # the CUDA selective scans (csrc/) and the Triton linear-attention chunks (plugins/linear_attention/)
    ("scan", r"summary_kernel|fwd_kernel|bwd_kernel|combine_kernel|^_(fwd|bwd)_(state|output|chunk)|scan"),
    ("matmul", r"gemm|xmma|cutlass|cublas|nvjet|wgmma|gemv|splitk"),
    ("optimizer", r"multi_tensor|adam|foreach"),
    ("copies", r"copy|memcpy|memset|catarray"),
    ("communication", r"nccl"),
    ("elementwise", r""),
)


def group_of(kernel: str) -> str:
    """The group of a CUDA kernel name (see :data:`GROUPS`)."""
    low = kernel.lower()
    return next(name for name, pattern in GROUPS if re.search(pattern, low))


def group_kernels(events: list[dict]) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Microseconds per group, and per kernel name within each group, from Chrome-trace events."""
    per_group: dict[str, float] = defaultdict(float)
    per_kernel: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for ev in events:
        if ev.get("ph") == "X" and ev.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"):
            name = ev["name"] if ev["cat"] == "kernel" else ev["cat"]
            group = group_of(name)
            per_group[group] += float(ev["dur"])
            per_kernel[group][name] += float(ev["dur"])
    return dict(per_group), {g: dict(k) for g, k in per_kernel.items()}


def step_wall_us(events: list[dict]) -> float | None:
    """The traced step's host-side duration (the profiler's ProfilerStep#N span)."""
    spans = [float(ev["dur"]) for ev in events
             if ev.get("ph") == "X" and ev.get("name", "").startswith("ProfilerStep#")]
    return max(spans) if spans else None


def report(events: list[dict], top: int = 3) -> str:
    """The table of a trace's kernel time per group, largest kernels under each group."""
    per_group, per_kernel = group_kernels(events)
    total = sum(per_group.values())
    if total == 0:
        return "no CUDA kernels in the trace (a CPU run?): open the trace itself in Perfetto"
    lines = [f"{'group':<14}{'ms/step':>10}{'share':>8}"]
    for group in sorted(per_group, key=per_group.get, reverse=True):
        lines.append(f"{group:<14}{per_group[group] / 1e3:>10.1f}{per_group[group] / total:>8.0%}")
        for name, us in sorted(per_kernel[group].items(), key=lambda kv: -kv[1])[:top]:
            lines.append(f"    {us / 1e3:8.1f} ms  {name[:100]}")
    wall = step_wall_us(events)
    lines.append(f"{'total':<14}{total / 1e3:>10.1f}   (kernel time"
                 + (f"; the step's host span {wall / 1e3:.1f} ms)" if wall else ")"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="Further arguments are config overrides (--section.key value).")
    parser.add_argument("config", help="a TOML config (e.g. train_configs/longhorn_1b.toml)")
    parser.add_argument("--steps", type=int, default=8, help="steps to train; the last one is traced (default 8)")
    parser.add_argument("--json", type=Path, help="also write the per-group milliseconds to this file")
    args, overrides = parser.parse_known_args(argv)
    if args.steps < 1:
        parser.error(f"--steps {args.steps}: at least 1")

    from longhorn_zoo.config import ConfigError, load_config
    from longhorn_zoo.train import train

    forced = ["--training.steps", str(args.steps), "--profiling.enable_profiling", "true",
              "--profiling.profile_freq", str(args.steps), "--checkpoint.enable", "false",
              "--metrics.enable_tensorboard", "false"]
    try:
        cfg = load_config(args.config, [*overrides, *forced])
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    train(cfg)
    traces = Path(cfg.job.dump_folder) / cfg.profiling.save_traces_folder
    trace = traces / f"iteration_{args.steps}" / "rank0_trace.json"
    events = json.loads(trace.read_text())["traceEvents"]
    print(f"trace: {trace}")
    print(report(events))
    if args.json:
        args.json.write_text(json.dumps({g: us / 1e3 for g, us in group_kernels(events)[0].items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
