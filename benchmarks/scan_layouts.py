"""Kernel-only timings of the CUDA selective scans for the two input layouts (issue 7).

    python benchmarks/scan_layouts.py        # on a GPU machine, from the repo root

At B=4, T=2048, C=4096, bf16: the forward and the backward kernels called directly (no autograd),
once on the inputs as the block passes them (x transposed from the convolution, z a slice of
in_proj: ``benchmarks/selective_scan.py``) and once on contiguous copies; then torch's own copy of
the transposed x, which is what reading it in place saves. Median of CUDA-event timings, µs.
"""

from __future__ import annotations

from functools import partial

import torch
from triton.testing import do_bench

from benchmarks import selective_scan as bss
from longhorn_zoo.plugins.selective_scan import cuda as ss

B, T, C = 4, 2048, 4096


def main() -> None:
    x = None
    for kind, make in (("longhorn", bss.longhorn_inputs), ("mamba", bss.mamba_inputs)):
        args = make(B, T, torch.bfloat16, torch.Generator(device="cuda").manual_seed(0), C)
        if kind == "longhorn":
            x, dt, k, q, D, z, h0, rs = args
            A = None
        else:
            x, dt, A, k, q, D, z, h0, rs = args
        code = ss.LONGHORN if kind == "longhorn" else ss.MAMBA
        for layout in ("views", "contiguous"):
            xi, zi = (x, z) if layout == "views" else (x.contiguous(), z.contiguous())
            inputs = (code, xi, dt, k, q, A, D, zi, h0, rs)
            y, hT, entry = ss._run_fwd(*inputs)
            grads = (torch.randn_like(y), torch.randn_like(hT))
            tf = do_bench(partial(ss._run_fwd, *inputs), warmup=50, rep=500) * 1e3
            tb = do_bench(partial(ss._run_bwd, *inputs, *grads, entry if entry.numel() else None),
                          warmup=50, rep=500) * 1e3
            print(f"{kind:8s} {layout:10s}: fwd {tf:7.1f} us  bwd {tb:7.1f} us  sum {tf + tb:7.1f}", flush=True)
    assert x is not None
    print(f"x.contiguous() of the transposed view: {do_bench(x.contiguous, rep=300) * 1e3:.1f} us")


if __name__ == "__main__":
    main()
