"""Where the causal conv's forward-plus-backward time goes in eager mode: GPU kernels or host launches.

Usage (on a GPU machine, from the repo root)::

    python -m benchmarks.conv_overhead

At the 1.3B training shape (B = 8, T = 2048, E = 4096, K = 4, bf16, x a slice of in_proj's output as
``benchmarks.conv.inputs`` builds it), three calls are timed:

* ``op fwd+bwd``: ``causal_conv1d`` and ``torch.autograd.grad``, as ``python -m benchmarks.ops`` times it;
* ``direct fwd+bwd``: the two Triton ops (``conv_fwd``, ``conv_bwd``) called directly, no autograd;
* ``direct bwd``: ``conv_bwd`` alone.

For each it prints the median of CUDA-event timings (``do_bench``) and the host time of one call
started on an idle GPU (the median of 20): when the two agree, the call is bound by its launches on
the host, not by the kernels. Then a ``torch.profiler`` table of five ``op fwd+bwd`` calls gives the
kernels' own GPU time and the host ops that cost most. In a compiled training step Inductor traces
the Triton ops into the block's graph, so this host cost is an eager-mode cost.
"""

from __future__ import annotations

import sys
import time


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        sys.exit("benchmarks.conv_overhead needs a CUDA GPU (the Triton conv kernels run on CUDA only)")
    from torch.profiler import ProfilerActivity, profile
    from triton.testing import do_bench

    from benchmarks import conv as bc
    from longhorn_zoo.plugins.selective_scan import conv_triton as ct
    from longhorn_zoo.plugins.selective_scan.conv import causal_conv1d

    bsz, seqlen, chans = 8, 2048, 4096
    gen = torch.Generator(device="cuda").manual_seed(0)
    args = bc.inputs(bsz, seqlen, torch.bfloat16, gen, chans)
    x, w, b = args[0].requires_grad_(), args[1].requires_grad_(), args[2].requires_grad_()
    leaves = [x, w, b, None, None, "silu"]
    with torch.no_grad():
        cots = [torch.randn_like(o) for o in causal_conv1d(*args)]

    def op_fb() -> None:
        torch.autograd.grad(causal_conv1d(*leaves), [x, w, b], cots)

    def direct_fb() -> None:
        ct.conv_fwd(x.detach(), w.detach(), b.detach(), None, None, "silu")
        ct.conv_bwd(x.detach(), w.detach(), b.detach(), None, None, "silu", cots[0], cots[1])

    def direct_bwd() -> None:
        ct.conv_bwd(x.detach(), w.detach(), b.detach(), None, None, "silu", cots[0], cots[1])

    for name, fn in [("op fwd+bwd", op_fb), ("direct fwd+bwd", direct_fb), ("direct bwd", direct_bwd)]:
        fn()
        torch.cuda.synchronize()
        median = do_bench(fn, warmup=25, rep=300, return_mode="median") * 1e3
        print(f"{name}: do_bench median {median:.1f} us", flush=True)
        host = []
        for _ in range(20):  # the GPU is idle at each start, so a full launch queue never holds the host back
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            host.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
        host.sort()
        print(f"{name}: CPU time per call (median of 20) {host[10] * 1e6:.0f} us", flush=True)

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            op_fb()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=10, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
