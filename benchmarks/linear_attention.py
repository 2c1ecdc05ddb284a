"""Benchmark of the linear-attention scans (GLA, RetNet, RWKV-6): Triton backend, reference, fla.

    python benchmarks/linear_attention.py                 # the table (H200 shapes, bf16)
    python benchmarks/linear_attention.py --sweep         # also the other chunk size / warps
    python benchmarks/linear_attention.py --warm 3/8      # compile only the 3rd of 8 slices (parallel warm-up)

Times are medians of CUDA-event timings (``triton.testing.do_bench``) in microseconds;
fwd+bwd runs the forward op and then the backward op. The floor is the fewest bytes
(each input read once, each output written once) over the measured copy bandwidth.
fla (flash-linear-attention) is timed only when it is installed.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from plugins.linear_attention import triton_chunk_ops as ops  # noqa: E402

# name, per-key decay, bonus, H, K=V; shapes at 8192 tokens a batch (B = 8192 // T, at least 1)
VARIANTS = {"gla": (True, False, 16, 128), "retnet": (False, False, 16, 128), "rwkv6": (True, True, 32, 64)}
LENGTHS = (2048, 8192, 16384)
# (chunk, warps of the per-chunk kernels): the default first
CONFIGS = {"gla": [(32, 4), (64, 8)], "rwkv6": [(32, 4), (64, 8)], "retnet": [(64, 4), (32, 4)]}


def inputs(variant: str, T: int, dtype=torch.bfloat16):
    per_key, bonus, H, D = VARIANTS[variant]
    B = max(1, 8192 // T)
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=dtype)  # noqa: E731
    q, k, v = mk(B, T, H, D), mk(B, T, H, D), mk(B, T, H, D)
    if per_key:
        g = F.logsigmoid(torch.randn(B, T, H, D, device="cuda") + 3.0).to(dtype)
    else:
        g = torch.log(1 - 2.0 ** (-5.0 - torch.arange(H, device="cuda", dtype=torch.float32)))
    u = mk(H, D) if bonus else None
    return q, k, v, g, u, D**-0.5


def floor_bytes(q, k, v, g, u) -> tuple[int, int]:
    """Bytes of the forward (read q, k, v, g; write o, final state) and of forward + backward."""
    n = lambda x: x.numel() * x.element_size()  # noqa: E731
    B, T, H, K = q.shape
    state = B * H * K * v.shape[-1] * 4
    fwd = n(q) + n(k) + n(v) + n(g) + n(v) + state
    bwd = 2 * (n(q) + n(k) + n(v) + n(g)) + n(v)  # read q k v g do, write dq dk dv dg
    return fwd, fwd + bwd


def bench(fn, rep_ms: int = 200) -> float:
    """Median microseconds; a function slower than 50 ms (a slow reference) is timed once after one warm-up."""
    import triton

    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    if start.elapsed_time(end) > 50:
        return 1e3 * start.elapsed_time(end)
    return 1e3 * triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")


def ours(q, k, v, g, u, scale):
    fwd = lambda: ops.chunk_fwd(q, k, v, g, u, scale, None, None)  # noqa: E731

    def fwd_bwd():
        o, ht = fwd()
        ops.chunk_bwd(q, k, v, g, u, scale, None, None, o, None)

    return fwd, fwd_bwd


def reference_fns(q, k, v, g, u, scale):
    """The reference op's function (plugins/linear_attention/ops.py), if that module exists."""
    try:
        mod = importlib.import_module("plugins.linear_attention.ops")
    except Exception:
        return None
    from trainer.ops import ScanOp

    scan = next((x for x in vars(mod).values() if isinstance(x, ScanOp)), None)
    if scan is None:
        return None
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]

    def fwd_bwd():
        o, _ = scan.reference(*leaves, g, u, scale, None, None)
        torch.autograd.grad(o, leaves, o)

    return (lambda: scan.reference(q, k, v, g, u, scale, None, None)), fwd_bwd


def fla_fns(variant, q, k, v, g, u, scale):
    """fla 0.6's chunk ops, if fla is installed."""
    if importlib.util.find_spec("fla") is None:
        return None
    try:
        if variant == "gla":
            from fla.ops.gla import chunk_gla as f

            call = lambda q, k, v: f(q, k, v, g.float(), scale=scale)  # noqa: E731
        elif variant == "retnet":
            from fla.ops.retention import chunk_retention as f

            call = lambda q, k, v: f(q, k, v, scale=scale)  # noqa: E731
        else:
            from fla.ops.rwkv6 import chunk_rwkv6 as f

            call = lambda q, k, v: f(q, k, v, g.float(), u, scale=scale)  # noqa: E731
    except Exception:
        return None
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]

    def fwd_bwd():
        o = call(*leaves)[0]
        torch.autograd.grad(o, leaves, o)

    return (lambda: call(q, k, v)), fwd_bwd


def copy_bandwidth() -> float:
    """Bytes/s of a large device-to-device copy (read + write)."""
    x = torch.empty(1 << 29, device="cuda", dtype=torch.float32)
    y = torch.empty_like(x)
    us = bench(lambda: y.copy_(x), 100)
    return 2 * x.numel() * 4 / (us * 1e-6)


def sdpa_row(T: int) -> tuple[float, float]:
    B = max(1, 8192 // T)
    q, k, v = (torch.randn(B, 16, T, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    fwd = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    return bench(fwd), bench(lambda: torch.autograd.grad(fwd(), (q, k, v), torch.ones_like(q)))


def cases(sweep: bool):
    for variant in VARIANTS:
        for cfg in CONFIGS[variant] if sweep else CONFIGS[variant][:1]:
            for T in LENGTHS:
                yield variant, T, cfg


def configure(variant, cfg):
    chunk, warps = cfg
    if VARIANTS[variant][0]:
        ops.CHUNK_PER_KEY = chunk
    else:
        ops.CHUNK_PER_HEAD = chunk
    ops.NUM_WARPS_CHUNK = warps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--warm", default=None, help="i/n: only compile slice i of n")
    args = ap.parse_args()
    todo = list(cases(args.sweep))
    if args.warm:
        i, n = map(int, args.warm.split("/"))
        for variant, T, cfg in todo[i::n]:
            configure(variant, cfg)
            fwd, fwd_bwd = ours(*inputs(variant, T))
            fwd_bwd()
        torch.cuda.synchronize()
        return
    bw = copy_bandwidth()
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, copy bandwidth {bw / 1e12:.2f} TB/s")
    head = f"{'op':<8}{'B':>3}{'T':>7}{'H':>4}{'K=V':>5} {'cfg':<8}{'ours fwd':>10}{'ours f+b':>10}"
    head += f"{'ref fwd':>10}{'ref f+b':>10}{'fla fwd':>10}{'fla f+b':>10}{'floor fwd':>11}{'floor f+b':>11}"
    rows = [head]
    fmt = lambda x: f"{x:10.0f}" if x is not None else f"{'n/a':>10}"  # noqa: E731
    for variant, T, cfg in todo:
        configure(variant, cfg)
        q, k, v, g, u, scale = inputs(variant, T)
        fwd, fwd_bwd = ours(q, k, v, g, u, scale)
        t = [bench(fwd), bench(fwd_bwd)]
        for fns in (
            (reference_fns(q, k, v, g, u, scale) if T == 2048 and cfg == CONFIGS[variant][0] else None),
            fla_fns(variant, q, k, v, g, u, scale),
        ):
            t += [bench(fns[0], 50), bench(fns[1], 50)] if fns else [None, None]
        fb, fbb = floor_bytes(q, k, v, g, u)
        chunk = ops.CHUNK_PER_KEY if VARIANTS[variant][0] else ops.CHUNK_PER_HEAD
        name = f"c{chunk}w{ops.NUM_WARPS_CHUNK}"
        row = f"{variant:<8}{q.shape[0]:>3}{T:>7}{q.shape[2]:>4}{q.shape[3]:>5} {name:<8}" + "".join(fmt(x) for x in t)
        rows.append(row + f"{fb / bw * 1e6:11.0f}{fbb / bw * 1e6:11.0f}")
        print(rows[-1], flush=True)
    for T in LENGTHS:
        f, fb = sdpa_row(T)
        rows.append(f"{'sdpa':<8}{max(1, 8192 // T):>3}{T:>7}{16:>4}{128:>5} {'causal':<8}{f:10.0f}{fb:10.0f}")
        print(rows[-1], flush=True)
    print("\n".join(["", "# all times in microseconds (median)"] + rows))


if __name__ == "__main__":
    main()
