#!/usr/bin/env bash
# Nsight Compute profile of the Longhorn and Mamba CUDA selective-scan kernels (issue 7).
#
#   bash benchmarks/profile_scan.sh [OUT_DIR]      # on the GPU machine; OUT_DIR defaults to outputs/profile
#
# Shape: the target row of benchmarks/ops.py (bf16, B=4, T=2048, D_inner=4096, N=16, initial state, rare
# resets; BATCH=8 for the 1.3B step's micro-batch), each scan's forward and backward called through the op
# as the blocks call it. Steps:
#   1. build the extension outside the profiler (about 2 min when cold; cached in $LONGHORN_ZOO_BUILD_DIR);
#   2. under ncu, per scan: 3 warm-up fwd+bwd steps, then one step inside cudaProfilerStart/Stop
#      (--profile-from-start off, so warm-up launches are never profiled, whatever the chunking launches);
#      only our kernels (selective_scan::{fwd,bwd,summary,combine}_kernel, csrc/selective_scan.cuh) are
#      measured, with the sections below; clocks are left alone (--clock-control none, needed on Firecracker);
#   3. print one line per kernel: duration, DRAM / memory / SM throughput (% of peak), issue slots busy,
#      achieved / theoretical occupancy and its limiter, registers per thread, the top warp stall reasons.
# Without ncu, or when it fails (e.g. no access to the counters), the same steps run under torch.profiler
# instead, which gives kernel times only. Whole script: about 1 min with a warm build, 3 min cold.
# In OUT_DIR: scan.ncu-rep (open in Nsight Compute), details.txt (ncu's full text), raw.csv, summary.txt, ncu.log.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${1:-$REPO/outputs/profile}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$REPO"
PY=${PYTHON:-python3}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

cat > "$OUT/scan_driver.py" <<'PY'
"""Longhorn and Mamba CUDA scans, forward and backward, at benchmarks/ops.py's target shape (profile_scan.sh).

``scan_driver.py ncu``: per scan, warm-up steps, then one step inside cudaProfilerStart/Stop.
``scan_driver.py torch``: the same steps under torch.profiler; prints each kernel's mean time.
"""

import os
import sys

import torch

from benchmarks.ops import build_cases
from longhorn_zoo.ops import set_backend_preference

B, T, WIDTH, WARMUP, STEPS = int(os.environ.get("BATCH", "4")), 2048, 4096, 3, 5
mode = sys.argv[1]


def step(op, leaves: list, cots: list) -> None:
    wrt = [a for a in leaves if isinstance(a, torch.Tensor) and a.requires_grad]
    torch.autograd.grad(op(*leaves), wrt, cots, allow_unused=True)  # as benchmarks/ops.py times it


set_backend_preference("cuda")
for case in [c for c in build_cases() if c.name in ("longhorn", "mamba")]:
    if "cuda" not in case.op.available_backends():
        sys.exit(f"{case.name}: the CUDA extension is unavailable (see the warning above)")
    args = case.inputs(B, T, torch.bfloat16, torch.Generator(device="cuda").manual_seed(0), WIDTH)
    leaves = [a.requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    with torch.no_grad():
        cots = [torch.randn_like(o) for o in case.op(*args)]
    for _ in range(WARMUP):
        step(case.op, leaves, cots)
    torch.cuda.synchronize()
    if mode == "ncu":
        torch.cuda.profiler.start()
        step(case.op, leaves, cots)
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
        continue
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(STEPS):
            step(case.op, leaves, cots)
        torch.cuda.synchronize()
    kernels = [e for e in prof.key_averages() if e.device_time_total > 0]
    ours = sorted((e for e in kernels if "selective_scan::" in e.key), key=lambda e: -e.device_time_total)
    other = sum(e.device_time_total for e in kernels if e not in ours) / STEPS
    print(f"\n{case.name}, B={B} T={T} C={WIDTH} bf16, torch.profiler, mean of {STEPS} fwd+bwd steps:")
    for e in ours:
        print(f"  {e.device_time_total / e.count:8.1f} µs  x{e.count // STEPS}  {e.key[:120]}")
    print(f"  {other:8.1f} µs  other kernels per step (input copies, zeroing, ...)")
PY

cat > "$OUT/summarize.py" <<'PY'
"""One line per profiled kernel from ``ncu --import REPORT --page raw --csv --print-units base`` (profile_scan.sh)."""

import csv
import re
import sys

lines = open(sys.argv[1]).read().splitlines()
table = list(csv.reader(lines[next(i for i, line in enumerate(lines) if line.startswith('"ID"')) :]))
header, rows = table[0], table[1:]
units = dict(zip(header, rows.pop(0))) if rows and not rows[0][0] else {}
if not rows:
    sys.exit("ncu profiled no kernel: no selective_scan:: kernel ran inside the profiler range")
TIME = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3, "second": 1e6}
STALL = re.compile(r"smsp__average_warps_issue_stalled_(\w+?)_per_issue_active\.ratio")


def num(row: dict, *names: str) -> float | None:
    for name in names:
        try:
            return float(row[name].replace(",", ""))
        except (KeyError, ValueError):
            continue
    return None


def fmt(x: float | None, spec: str = ".0f") -> str:
    return "?" if x is None else format(x, spec)


print("| scan | phase | kernel | grid x block | µs | DRAM % | mem % | SM % | issue % | occupancy % (limit) | regs "
      "| top stalls, cycles per issued instruction (of total) |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
scan = phase = "?"
for values in rows:
    row = dict(zip(header, values))
    name = row.get("Kernel Name", "?")
    scan = next((s for s in ("Longhorn", "Mamba") if s in name), scan)  # combine_kernel: the scan before it
    adjoint = re.search(r"summary_kernel<.*, (\w+)>", name)  # its last template argument: kAdj
    if "fwd_kernel" in name or (adjoint and adjoint.group(1) in ("0", "false")):
        phase = "fwd"
    elif "bwd_kernel" in name or (adjoint and adjoint.group(1) in ("1", "true")):
        phase = "bwd"
    short = re.sub(r"^void |selective_scan::|\(.*\)$|Longhorn, |Mamba, ", "", name).replace("__nv_bfloat16", "bf16")
    us = num(row, "gpu__time_duration.sum")
    us = None if us is None else us * TIME.get(units.get("gpu__time_duration.sum", "nsecond"), 1e-3)
    limits = {k: num(row, f"launch__occupancy_limit_{k}") for k in ("registers", "shared_mem", "warps", "blocks")}
    limits = {k: v for k, v in limits.items() if v is not None}
    limit = "/".join(k for k, v in limits.items() if v == min(limits.values())) if limits else "?"
    occupancy = (f"{fmt(num(row, 'sm__warps_active.avg.pct_of_peak_sustained_active'))} / "
                 f"{fmt(num(row, 'sm__maximum_warps_per_active_cycle_pct'))} ({limit})")
    stalls = {m.group(1): num(row, k) for k in header if (m := STALL.fullmatch(k)) and m.group(1) != "selected"}
    stalls = {k: v for k, v in stalls.items() if v is not None}
    total = sum(stalls.values()) or 1.0
    ranked = sorted(stalls.items(), key=lambda kv: -kv[1])[:3]
    top = ", ".join(f"{k} {v:.1f} ({100 * v / total:.0f}%)" for k, v in ranked)
    cells = [
        scan.lower(), phase, short, f"{row.get('Grid Size', '?')} x {row.get('Block Size', '?')}", fmt(us, ".1f"),
        fmt(num(row, "dram__throughput.avg.pct_of_peak_sustained_elapsed",
                "gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed")),
        fmt(num(row, "gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed")),
        fmt(num(row, "sm__throughput.avg.pct_of_peak_sustained_elapsed")),
        fmt(num(row, "smsp__issue_active.avg.pct_of_peak_sustained_active")),
        occupancy, fmt(num(row, "launch__registers_per_thread")), top or "?",
    ]
    print("| " + " | ".join(cells) + " |")
PY

echo "== building the selective-scan extension (cached in ${LONGHORN_ZOO_BUILD_DIR:-~/.cache/longhorn_zoo/torch_extensions})"
"$PY" -m longhorn_zoo.plugins.selective_scan.cuda --build

NCU=${NCU:-$(command -v ncu || true)}
for candidate in /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu; do
  if [[ -z $NCU && -x $candidate ]]; then NCU=$candidate; fi
done
rm -f "$OUT/scan.ncu-rep"
if [[ -n $NCU ]]; then
  echo "== profiling with $NCU ($("$NCU" --version | tail -1)); log in $OUT/ncu.log"
  "$NCU" --clock-control none --target-processes all --profile-from-start off \
    --kernel-name-base demangled --kernel-name "regex:selective_scan::(fwd|bwd|summary|combine)_kernel" \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
    --section WarpStateStats --section SchedulerStats \
    --metrics dram__throughput.avg.pct_of_peak_sustained_elapsed \
    --force-overwrite --export "$OUT/scan" "$PY" "$OUT/scan_driver.py" ncu > "$OUT/ncu.log" 2>&1 || true
fi
if [[ -s $OUT/scan.ncu-rep ]]; then
  "$NCU" --import "$OUT/scan.ncu-rep" --page details > "$OUT/details.txt"
  "$NCU" --import "$OUT/scan.ncu-rep" --page raw --csv --print-units base > "$OUT/raw.csv"
  echo "== ncu, bf16 B=${BATCH:-4} T=2048 C=4096 N=16, one fwd+bwd step per scan (full text: $OUT/details.txt)"
  "$PY" "$OUT/summarize.py" "$OUT/raw.csv" | tee "$OUT/summary.txt"
else
  if [[ -n $NCU ]]; then
    echo "== ncu made no report; the end of $OUT/ncu.log:"
    tail -n 15 "$OUT/ncu.log"
  fi
  echo "== no ncu report: kernel times from torch.profiler instead"
  "$PY" "$OUT/scan_driver.py" torch | tee "$OUT/summary.txt"
fi
