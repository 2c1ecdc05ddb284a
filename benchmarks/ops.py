"""Check and time every backend of every scan op, as the blocks call them.

Usage (on a GPU machine): ``python -m benchmarks.ops [--sweep] [--ops longhorn,mamba]``.

Each :class:`OpCase` names an op, how to draw its inputs, its float64 reference and the bytes
it must move at least. For every case the script checks each fast backend against the
float64 reference (forward, all gradients, final state) on fresh random inputs, then times
forward, and forward plus backward (medians of CUDA-event timings via
``triton.testing.do_bench``), and prints one table with the memory floor at 4.24 TB/s and the
peak memory the call allocates beyond its inputs.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from trainer.ops import ScanOp, set_backend_preference

HBM_BYTES_PER_S = 4.24e12
SHAPES = [(4, 2048), (1, 8192), (1, 16384), (1, 2048)]  # (B, T) at D_inner = 4096, N = 16
CHANNELS, STATE = 4096, 16


@dataclass
class OpCase:
    """One scan op to check and time.

    Attributes:
        name: Row label.
        op: The op, called like its reference.
        inputs: ``inputs(B, T, dtype, generator, channels) -> list`` of the op's arguments on the GPU.
        floor_bytes: ``floor_bytes(B, T, dtype) -> (forward, forward + backward)`` bytes moved at least.
        backends: Backend names to time (``"reference"`` is the op's reference through autograd).
    """

    name: str
    op: ScanOp
    inputs: Callable[[int, int, torch.dtype, torch.Generator, int], list]
    floor_bytes: Callable[[int, int, torch.dtype], tuple[float, float]]
    backends: list[str] = field(default_factory=lambda: ["cuda"])


def _randn(gen: torch.Generator, *shape: int, scale: float = 1.0, shift: float = 0.0) -> Tensor:
    return torch.randn(*shape, generator=gen, device="cuda") * scale + shift


def _longhorn_inputs(b: int, t: int, dtype: torch.dtype, gen: torch.Generator, c: int = CHANNELS) -> list:
    x, dt, z = (_randn(gen, b, t, c).to(dtype) for _ in range(3))
    k, q = (_randn(gen, b, t, STATE, scale=0.3).to(dtype) for _ in range(2))
    return [
        x,
        dt,
        k,
        q,
        _randn(gen, c),
        z,
        _randn(gen, b, c, STATE),
        torch.rand(b, t, generator=gen, device="cuda") < 1e-3,
    ]


def _mamba_inputs(b: int, t: int, dtype: torch.dtype, gen: torch.Generator, c: int = CHANNELS) -> list:
    x, z = (_randn(gen, b, t, c).to(dtype) for _ in range(2))
    dt = _randn(gen, b, t, c, shift=-3.0).to(dtype)
    A = -torch.exp(torch.rand(c, STATE, generator=gen, device="cuda") * 2.8)
    B, C = (_randn(gen, b, t, STATE, scale=0.5).to(dtype) for _ in range(2))
    return [x, dt, A, B, C, _randn(gen, c), z, _randn(gen, b, c, STATE),
            torch.rand(b, t, generator=gen, device="cuda") < 1e-3]  # fmt: skip


def _scan_floor(b: int, t: int, dtype: torch.dtype) -> tuple[float, float]:
    """x, dt, z read and y written forward; x, dt, z, dy read and dx, ddt, dz written backward."""
    e = torch.finfo(dtype).bits // 8
    bt = b * t
    small = bt * STATE * 2 * e  # the two (B, T, N) vectors
    fwd = bt * CHANNELS * 4 * e + small
    return fwd, fwd + bt * CHANNELS * 7 * e + 2 * small


def build_cases() -> list[OpCase]:
    from plugins.longhorn.ops import longhorn_scan
    from plugins.mamba.ops import mamba_scan

    return [
        OpCase("longhorn_scan", longhorn_scan, _longhorn_inputs, _scan_floor),
        OpCase("mamba_scan", mamba_scan, _mamba_inputs, _scan_floor),
    ]


# ---------------------------------------------------------------------------------------------


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def check(case: OpCase, backend: str, b: int, t: int, c: int, dtype: torch.dtype, seed: int) -> dict[str, float]:
    """Relative errors of the backend's outputs and gradients against the float64 reference."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    args = case.inputs(b, t, dtype, gen, c)
    diff = [i for i, a in enumerate(args) if isinstance(a, Tensor) and a.is_floating_point()]
    ref_args = [a.double().requires_grad_() if i in diff else a for i, a in enumerate(args)]
    outs_ref = case.op.reference(*ref_args)
    cots = [torch.randn(o.shape, generator=gen, device="cuda") for o in outs_ref]
    cots[0] = cots[0].to(dtype)  # dy in the input dtype; d final_state in float32
    grads_ref = torch.autograd.grad(outs_ref, [ref_args[i] for i in diff], [cot.double() for cot in cots])
    leaves = [a.detach().clone().requires_grad_() if i in diff else a for i, a in enumerate(args)]
    set_backend_preference(backend)
    try:
        outs = case.op(*leaves)
        grads = torch.autograd.grad(outs, [leaves[i] for i in diff], cots)
    finally:
        set_backend_preference("auto")
    errs = {f"out{j}": _rel(o, r) for j, (o, r) in enumerate(zip(outs, outs_ref))}
    errs.update({f"d{i}": _rel(g, r) for i, g, r in zip(diff, grads, grads_ref)})
    return errs


def time_case(case: OpCase, backend: str, b: int, t: int, dtype: torch.dtype) -> dict[str, float]:
    """Median µs of forward and forward+backward, and the peak extra memory in MiB."""
    from triton.testing import do_bench

    gen = torch.Generator(device="cuda").manual_seed(b * 7919 + t)
    args = case.inputs(b, t, dtype, gen, CHANNELS)
    diff = [i for i, a in enumerate(args) if isinstance(a, Tensor) and a.is_floating_point()]
    leaves = [a.requires_grad_() if i in diff else a for i, a in enumerate(args)]
    set_backend_preference(backend)
    try:
        with torch.no_grad():
            outs = case.op(*args)
        cots = [torch.randn_like(o) for o in outs]

        def fwd() -> None:
            with torch.no_grad():
                case.op(*args)

        def fwd_bwd() -> None:
            torch.autograd.backward(case.op(*leaves), cots)

        fwd_bwd()
        torch.cuda.synchronize()
        grad_to_none = [leaves[i] for i in diff]
        for g in grad_to_none:
            g.grad = None
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fwd_bwd()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        t_fwd = do_bench(fwd, warmup=25, rep=200, return_mode="median") * 1e3
        t_all = do_bench(fwd_bwd, warmup=25, rep=300, grad_to_none=grad_to_none, return_mode="median") * 1e3
    finally:
        set_backend_preference("auto")
    return {"fwd": t_fwd, "bwd": t_all - t_fwd, "fwd+bwd": t_all, "peak_mib": peak}


def sweep(case: OpCase, b: int, t: int, dtype: torch.dtype) -> None:
    """Times the CUDA backend under each launch-shape setting of plugins.selective_scan.cuda.TUNING."""
    from plugins.selective_scan import cuda as ss

    saved = dict(ss.TUNING)
    print(f"\n{case.name} launch-shape sweep, B={b} T={t}: fwd_lanes fwd_blocks/SM bwd_blocks/SM -> fwd, fwd+bwd µs")
    try:
        for lanes in (2, 4):
            for fb in (1.0, 4.0):
                for bb in (3.0,):
                    ss.TUNING.update(fwd_lanes=lanes, fwd_blocks_per_sm=fb, bwd_blocks_per_sm=bb)
                    r = time_case(case, "cuda", b, t, dtype)
                    lens = ss.chunk_lengths(b, t, CHANNELS)
                    print(
                        f"  {lanes} {fb:4.1f} {bb:4.1f} chunks {lens}: {r['fwd']:8.1f} {r['fwd+bwd']:8.1f}", flush=True
                    )
    finally:
        ss.TUNING.clear()
        ss.TUNING.update(saved)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", default="", help="comma-separated case names (default: all)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--sweep", action="store_true", help="also sweep the CUDA launch shape at the first shape")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    cases = [c for c in build_cases() if not args.ops or c.name in args.ops.split(",")]

    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, dtype {args.dtype}")
    print("## correctness vs float64 (relative L2 error; out0 = y, out1 = final state, dI = grad of argument I)")
    for case in cases:
        for backend in case.backends:
            for b, t, c, dt_ in [(2, 2049, 256, dtype), (1, 300, 96, torch.float32)]:
                errs = check(case, backend, b, t, c, dt_, seed=t)
                worst = max(errs, key=errs.get)
                head = f"{case.name:16s} {backend:6s} B={b} T={t} C={c} {str(dt_)[6:]:8s}"
                detail = " ".join(f"{k}={v:.1e}" for k, v in errs.items())
                print(f"{head} worst {worst}={errs[worst]:.2e}  {detail}", flush=True)

    if args.sweep:
        for case in cases:
            sweep(case, *SHAPES[0], dtype)

    rows = []
    for case in cases:
        for b, t in SHAPES:
            floor_f, floor_fb = (x / HBM_BYTES_PER_S * 1e6 for x in case.floor_bytes(b, t, dtype))
            for backend in case.backends:
                r = time_case(case, backend, b, t, dtype)
                rows.append((case.name, backend, b, t, r, floor_f, floor_fb))
                torch.cuda.empty_cache()
    print(f"\n## timings, {args.dtype}, D_inner={CHANNELS}, N={STATE} (median µs; floor = bytes / 4.24 TB/s)")
    print("| op | backend | B | T | fwd | bwd | fwd+bwd | floor fwd | floor fwd+bwd | peak extra MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, backend, b, t, r, ff, ffb in rows:
        print(f"| {name} | {backend} | {b} | {t} | {r['fwd']:.1f} | {r['bwd']:.1f} | {r['fwd+bwd']:.1f} | {ff:.1f} | "
              f"{ffb:.1f} | {r['peak_mib']:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
