"""GPU time of the causal conv's Triton kernels per call, without the host's launch cost.

Usage (on a GPU machine, from the repo root)::

    python -m benchmarks.conv_kernels [--sweep]

At the 1.3B training shape (B = 8, T = 2048, E = 4096, K = 4, bf16, x a slice of in_proj's output
as ``benchmarks.conv.inputs`` builds it, no state or resets, as in training) it times ``conv_fwd``
and ``conv_bwd`` (the two Triton ops the block's compiled graph calls) by replaying a CUDA graph of
each (``triton.testing.do_bench_cudagraph``), so the number is the kernels' time, which is what a
compiled training step pays; ``python -m benchmarks.ops --ops conv`` times the eager op path, whose
host launches take longer than the kernels (``benchmarks.conv_overhead``). The backward's time
includes the sum over its programs' partial weight gradients.

It prints, per kernel, µs per call, the floor (the bytes at 4.24 TB/s: x read and y written forward;
x and dy read and dx written backward) and the 48 layers' ms per step against issue 20's 20 ms for
forward plus backward. ``--sweep`` also times every config (channels and warps a program), and the
backward at several time chunkings (``MIN_PROGRAMS``); the default run uses the autotuner's pick.
"""

from __future__ import annotations

import argparse
import sys

LAYERS = 48
"""Selective-scan blocks in the 1.3B configs."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.conv_kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweep", action="store_true",
                        help="also time each config (channels and warps a program) and chunking")
    parser.add_argument("--batch", type=int, default=8, help="B (default 8, the 1.3B step's micro-batch)")
    parser.add_argument("--seq-len", type=int, default=2048, help="T (default 2048)")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        sys.exit("benchmarks.conv_kernels needs a CUDA GPU (the Triton conv kernels run on CUDA only)")
    from triton.testing import do_bench_cudagraph

    from benchmarks import conv as bc
    from benchmarks.ops import HBM_BYTES_PER_S
    from longhorn_zoo.plugins.selective_scan import conv_triton as ct

    bsz, seqlen, chans = args.batch, args.seq_len, bc.CHANNELS
    gen = torch.Generator(device="cuda").manual_seed(0)
    x, w, b, s0, rs, act = bc.inputs(bsz, seqlen, torch.bfloat16, gen, chans)
    dy, d_final = torch.randn(bsz, seqlen, chans, device="cuda", dtype=x.dtype), None
    fwd_bytes, total_bytes = bc.floor_bytes([x])
    floors = {"fwd": fwd_bytes / HBM_BYTES_PER_S * 1e6, "bwd": (total_bytes - fwd_bytes) / HBM_BYTES_PER_S * 1e6}
    calls = {"fwd": lambda: ct.conv_fwd(x, w, b, s0, rs, act),
             "bwd": lambda: ct.conv_bwd(x, w, b, s0, rs, act, dy, d_final)}  # fmt: skip

    def time_us(name: str) -> float:
        calls[name]()  # autotunes outside the graph
        torch.cuda.synchronize()
        return do_bench_cudagraph(calls[name], rep=200, return_mode="median") * 1e3

    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}; B={bsz} T={seqlen} E={chans} "
          f"K={bc.KERNEL} bf16", flush=True)  # fmt: skip
    if args.sweep:
        for fwd in ct.FWD_CONFIGS:
            with ct.use_configs([fwd], ct.BWD_CONFIGS[:1]):
                print(f"fwd (BE, warps) {fwd}: {time_us('fwd'):.1f} us", flush=True)
        saved = ct.MIN_PROGRAMS
        for programs in (1024, 2048, 4096, 8192):
            ct.MIN_PROGRAMS = programs
            chunk = ct._chunk(bsz, seqlen, chans)
            for bwd in ct.BWD_CONFIGS:
                with ct.use_configs(ct.FWD_CONFIGS[:1], [bwd]):
                    print(f"bwd (BE, warps) {bwd}, chunk {chunk} steps: {time_us('bwd'):.1f} us", flush=True)
        ct.MIN_PROGRAMS = saved
    got = {name: time_us(name) for name in calls}
    print("| kernel | us per call | floor us | x floor | ms per step (48 layers) |")
    print("|---|---|---|---|---|")
    for name, us in got.items():
        print(f"| {name} | {us:.1f} | {floors[name]:.1f} | {us / floors[name]:.2f} | {us * LAYERS / 1e3:.2f} |")
    step_ms = sum(got.values()) * LAYERS / 1e3
    print(f"forward + backward: {step_ms:.2f} ms per step for {LAYERS} layers (issue 20's target: <= 20 ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
