"""Check and time every scan op of every plugin, with causal attention as a comparison row, in one run.

Usage (on a GPU machine, from the repo root)::

    python -m benchmarks.ops                    # all ops: the checks, then the timing table
    python -m benchmarks.ops --quick            # the first check and the target shape of each op only
    python -m benchmarks.ops --ops gla,rwkv --sweep

Set ``LONGHORN_ZOO_BUILD_DIR`` to keep the CUDA extension build (about 2 min) between runs.

Ops (``--ops``): ``longhorn`` and ``mamba`` (the CUDA selective scans), ``conv`` (the selective-scan
block's causal depthwise conv and SiLU, Triton), ``gla``, ``retnet`` and ``rwkv`` (the Triton
linear-attention scan, as each mixer calls it) and ``sdpa`` (causal attention, timed only).

Each :class:`OpCase` names an op, how to draw its inputs and the bytes it must move at least. First
the fast backend of each op is checked against the op's reference run in float64 (forward outputs,
all gradients, final state) on fresh random inputs at a reduced width; a relative error above
:data:`TOLERANCE` is flagged FAIL. Then, at the full shapes, the script times forward and forward
plus backward (medians of CUDA-event timings via ``triton.testing.do_bench``) of the fast backend,
of the reference (through the op, as ``op_backend = "reference"`` runs it; only up to
``reference_max_t``, it is slow) and of the op's peer (fla's chunk op when fla imports, PyTorch's
conv1d for the conv), and prints one table with
the memory floor (bytes / 4.24 TB/s) and the peak memory a forward plus backward allocates beyond
its inputs. The exit status is 1 when a check failed or our backend could not be timed.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial

import torch
from torch import Tensor

from longhorn_zoo.ops import REFERENCE, ScanOp, set_backend_preference

HBM_BYTES_PER_S = 4.24e12
TOLERANCE = {torch.float32: 1e-2, torch.float16: 2e-2, torch.bfloat16: 5e-2}
"""Largest relative error a check passes: it catches wrong results; tests/ hold the tight bounds."""
SLOW_MS = 50.0
"""A call slower than this is timed once after one warm-up call, not by ``do_bench``."""


@dataclass
class OpCase:
    """One op to check and time.

    Attributes:
        name: ``--ops`` name and row label.
        op: The op: a :class:`~longhorn_zoo.ops.ScanOp`, or a plain function for a comparison row (not checked).
        inputs: ``inputs(B, T, dtype, generator, width) -> list`` of the op's arguments, on the generator's device.
        floor_bytes: ``floor_bytes(args) -> (forward, forward + backward)`` bytes the op moves at least.
        width: The width timed: channels (selective scans) or heads (attention).
        dims: The other dimensions, for the table.
        shapes: (B, T) timed; the first is the target shape, the only one under ``--quick``.
        checks: (B, T, width, dtype or None for ``--dtype``) of the float64 checks; the first one under ``--quick``.
        backend: The fast backend (``set_backend_preference`` name).
        reference_max_t: Time the reference up to this T (0: never).
        peer: Returns a peer implementation with the op's signature (fla's chunk op; raises ImportError
            when it is not installed), or None.
        peer_name: The peer's name in the table.
        target_us: Forward plus backward target at the first shape, µs.
        sweep: ``sweep(B, T)`` applies each launch setting of ``--sweep`` in turn, yielding its label.
    """

    name: str
    op: Callable[..., tuple[Tensor, ...]]
    inputs: Callable[[int, int, torch.dtype, torch.Generator, int], list]
    floor_bytes: Callable[[list], tuple[float, float]]
    width: int
    dims: str
    shapes: list[tuple[int, int]]
    checks: list[tuple[int, int, int, torch.dtype | None]] = field(default_factory=list)
    backend: str = "cuda"
    reference_max_t: int = 0
    peer: Callable[[], Callable[..., tuple[Tensor, ...]]] | None = None
    peer_name: str = "fla"
    target_us: float | None = None
    sweep: Callable[[int, int], Iterator[str]] | None = None


def build_cases() -> list[OpCase]:
    """Every op: the selective scans, the block's conv, the three linear-attention mixers, causal SDPA."""
    from benchmarks import conv
    from benchmarks import linear_attention as la
    from benchmarks import selective_scan as ss
    from longhorn_zoo.plugins.linear_attention.ops import linear_attn_scan
    from longhorn_zoo.plugins.longhorn.ops import longhorn_scan
    from longhorn_zoo.plugins.mamba.ops import mamba_scan
    from longhorn_zoo.plugins.selective_scan.conv import causal_conv1d

    scan = dict(
        width=ss.CHANNELS,
        dims=f"C={ss.CHANNELS} N={ss.STATE}",
        shapes=ss.SHAPES,
        reference_max_t=2048,
        checks=[(2, 2049, 256, None), (1, 300, 96, torch.float32)],
        sweep=ss.sweep,
    )
    cases = [
        OpCase("longhorn", longhorn_scan, ss.longhorn_inputs, ss.floor_bytes, target_us=800.0, **scan),
        OpCase("mamba", mamba_scan, ss.mamba_inputs, ss.floor_bytes, target_us=1000.0, **scan),
        OpCase("conv", causal_conv1d, conv.inputs, conv.floor_bytes, width=conv.CHANNELS,
               dims=f"E={conv.CHANNELS} K={conv.KERNEL}", shapes=conv.SHAPES, backend="triton", reference_max_t=2048,
               checks=[(2, 2049, 520, None), (1, 300, 96, torch.float32)], peer=conv.conv1d_peer,
               peer_name="F.conv1d", target_us=conv.TARGET_US, sweep=conv.sweep),
    ]
    cases += [
        OpCase(v.name, linear_attn_scan, partial(la.inputs, v), la.floor_bytes, width=v.heads,
               dims=f"H={v.heads} K=V={v.head_dim}", shapes=la.SHAPES, backend="triton", reference_max_t=2048,
               checks=[(2, 2049, 2, None), (1, 300, 1, torch.float32)], peer=partial(la.fla_op, v),
               target_us=v.target_us, sweep=partial(la.sweep, v))
        for v in la.VARIANTS.values()
    ]  # fmt: skip
    sdpa_dims = f"H={la.SDPA_HEADS} D={la.SDPA_HEAD_DIM}"
    cases.append(OpCase("sdpa", la.causal_sdpa, la.sdpa_inputs, la.sdpa_floor, width=la.SDPA_HEADS, dims=sdpa_dims,
                        shapes=la.SHAPES, backend="torch"))  # fmt: skip
    return cases


# ---- checking ------------------------------------------------------------------------------------


def _rel(a: Tensor | None, b: Tensor) -> float:
    """Relative L2 error of a against b; a missing gradient (None) counts as zeros."""
    a = torch.zeros_like(b) if a is None else a
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def compare(
    fn: Callable[..., tuple[Tensor, ...]],
    reference: Callable[..., tuple[Tensor, ...]],
    args: list,
    gen: torch.Generator,
) -> dict[str, float]:
    """Relative errors of ``fn``'s outputs and gradients against ``reference`` run in float64 on the same args.

    Every floating-point tensor argument is differentiated; the cotangent of the first output is
    drawn in the first argument's dtype, the others in float32. Keys: ``out0``, ``out1``, ... and
    ``d<argument name>``.
    """
    names = list(inspect.signature(reference).parameters)
    diff = [i for i, a in enumerate(args) if isinstance(a, Tensor) and a.is_floating_point()]
    ref_args = [a.detach().double().requires_grad_() if i in diff else a for i, a in enumerate(args)]
    outs_ref = reference(*ref_args)
    cots = [torch.randn(o.shape, generator=gen, device=gen.device) for o in outs_ref]
    cots[0] = cots[0].to(args[0].dtype)
    grads_ref = torch.autograd.grad(
        outs_ref, [ref_args[i] for i in diff], [c.double() for c in cots], allow_unused=True
    )
    leaves = [a.detach().clone().requires_grad_() if i in diff else a for i, a in enumerate(args)]
    outs = fn(*leaves)
    grads = torch.autograd.grad(outs, [leaves[i] for i in diff], cots, allow_unused=True)
    errs = {f"out{j}": _rel(o, r) for j, (o, r) in enumerate(zip(outs, outs_ref))}
    errs.update({f"d{names[i]}": _rel(g, r) for i, g, r in zip(diff, grads, grads_ref) if r is not None})
    return errs


def failures(errs: dict[str, float], dtype: torch.dtype) -> list[str]:
    """Names whose error is NaN or above the tolerance for inputs of ``dtype``."""
    tol = TOLERANCE.get(dtype, 1e-6)
    return [name for name, e in errs.items() if not e <= tol]


def check(
    case: OpCase, b: int, t: int, width: int, dtype: torch.dtype, seed: int, device: str = "cuda"
) -> dict[str, float]:
    """Errors of the case's fast backend against its float64 reference, on fresh random inputs."""
    gen = torch.Generator(device=device).manual_seed(seed)
    args = case.inputs(b, t, dtype, gen, width)
    set_backend_preference(case.backend)
    try:
        return compare(case.op, case.op.reference, args, gen)
    finally:
        set_backend_preference("auto")


# ---- timing --------------------------------------------------------------------------------------


def _median_us(fn: Callable[[], None], rep_ms: int) -> float:
    """Median µs of CUDA-event timings (``do_bench``); a call slower than SLOW_MS is timed once."""
    from triton.testing import do_bench

    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    if start.elapsed_time(end) > SLOW_MS:
        return start.elapsed_time(end) * 1e3
    return do_bench(fn, warmup=25, rep=rep_ms, return_mode="median") * 1e3


def time_case(case: OpCase, impl: str, args: list) -> dict[str, float]:
    """Median µs of forward and of forward plus backward, and the peak extra MiB, of one implementation.

    The backward returns the gradients of every floating-point argument (``torch.autograd.grad``)
    rather than accumulating them into ``.grad``: accumulating into a leaf that is a strided view
    (the block's z, a slice of in_proj's output) would add a copy that the block itself never makes.

    Args:
        case: The op.
        impl: ``case.backend``, ``"reference"`` (the op under that preference) or ``"peer"``.
        args: The op's arguments; their floating-point tensors are made leaves that require grad.
    """
    fn = case.peer() if impl == "peer" else case.op
    diff = [i for i, a in enumerate(args) if isinstance(a, Tensor) and a.is_floating_point()]
    leaves = [a.requires_grad_() if i in diff else a for i, a in enumerate(args)]
    wrt = [leaves[i] for i in diff]
    set_backend_preference("auto" if impl == "peer" else impl)
    try:
        with torch.no_grad():
            cots = [torch.randn_like(o) for o in fn(*args)]

        def fwd() -> None:
            with torch.no_grad():
                fn(*args)

        def fwd_bwd() -> None:
            torch.autograd.grad(fn(*leaves), wrt, cots, allow_unused=True)

        fwd_bwd()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fwd_bwd()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        t_fwd = _median_us(fwd, 200)
        t_all = _median_us(fwd_bwd, 300)
    finally:
        set_backend_preference("auto")
    return {"fwd": t_fwd, "fwd+bwd": t_all, "peak_mib": peak}


def sweep(case: OpCase, b: int, t: int, dtype: torch.dtype) -> None:
    """Times the fast backend under each launch setting of the case's sweep."""
    gen = torch.Generator(device="cuda").manual_seed(b * 7919 + t)
    args = case.inputs(b, t, dtype, gen, case.width)
    print(f"\n{case.name} sweep, B={b} T={t}: setting -> fwd, fwd+bwd µs", flush=True)
    settings = case.sweep(b, t)
    try:
        for label in settings:
            try:
                r = time_case(case, case.backend, args)
            except Exception as e:  # e.g. a setting the kernels cannot run: go on with the next
                print(f"  {label}: {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
            print(f"  {label}: {r['fwd']:8.1f} {r['fwd+bwd']:8.1f}", flush=True)
    finally:
        settings.close()


# ---- the run -------------------------------------------------------------------------------------


def _versions() -> str:
    import triton

    parts = [torch.cuda.get_device_name(), f"torch {torch.__version__}", f"triton {triton.__version__}"]
    try:
        import fla

        parts.append(f"fla {fla.__version__}")
    except Exception as e:  # fla is optional; say why it is absent
        parts.append(f"no fla ({type(e).__name__})")
    return ", ".join(parts)


def run_checks(cases: list[OpCase], dtype: torch.dtype, quick: bool) -> bool:
    """Prints the float64 checks of every case's fast backend; False if one failed."""
    print("## correctness vs float64 (relative L2 error; out0 = output, out1 = final state, dX = grad of X)")
    ok = True
    for case in cases:
        for b, t, width, check_dtype in case.checks[:1] if quick else case.checks:
            check_dtype = check_dtype or dtype
            head = f"{case.name:8s} {case.backend:6s} B={b} T={t} W={width} {str(check_dtype)[6:]:8s}"
            try:
                errs = check(case, b, t, width, check_dtype, seed=t)
            except Exception as e:  # a compile or kernel failure: report it, check the next
                ok = False
                print(f"{head} FAIL {type(e).__name__}: {str(e)[:300]}", flush=True)
                continue
            bad = failures(errs, check_dtype)
            ok &= not bad
            worst = max(errs, key=errs.get)
            status = f"FAIL {','.join(bad)}" if bad else "ok"
            detail = " ".join(f"{k}={v:.1e}" for k, v in errs.items())
            print(f"{head} worst {worst}={errs[worst]:.2e} {status}  {detail}", flush=True)
    return ok


def time_shape(case: OpCase, b: int, t: int, dtype: torch.dtype, peer: bool, notes: list[str]) -> dict:
    """Times each implementation of the case at (B, T) on one set of inputs.

    Returns:
        ``{"floor": (fwd µs, fwd+bwd µs), impl: result}`` for our backend, ``"reference"`` and
        ``"peer"``; a result is :func:`time_case`'s dict, or a word saying why there is none.
        A failure is added to ``notes``.
    """
    gen = torch.Generator(device="cuda").manual_seed(b * 7919 + t)
    args = case.inputs(b, t, dtype, gen, case.width)
    out: dict = {"floor": tuple(x / HBM_BYTES_PER_S * 1e6 for x in case.floor_bytes(args)), REFERENCE: "—", "peer": "—"}
    impls = [case.backend]
    if isinstance(case.op, ScanOp) and case.reference_max_t:
        impls += [REFERENCE] if t <= case.reference_max_t else []
        out[REFERENCE] = f"skip (T > {case.reference_max_t})"
    if case.peer is not None:
        impls += ["peer"] if peer else []
        out["peer"] = "n/a"
    for impl in impls:
        try:
            out[impl] = time_case(case, impl, args)
        except Exception as e:  # an OOM or a kernel failure: note it and go on with the next
            out[impl] = "error"
            notes.append(f"{case.name} {impl} B={b} T={t}: {type(e).__name__}: {str(e)[:300]}")
        torch.cuda.empty_cache()
    return out


def _cells(r: dict[str, float] | str, keys: tuple[str, ...]) -> list[str]:
    if isinstance(r, str):
        return [r] + ["" for _ in keys[1:]]
    return [f"{r[k]:.0f}" if k == "peak_mib" else f"{r[k]:.1f}" for k in keys]


def run_timings(cases: list[OpCase], dtype: torch.dtype, quick: bool) -> bool:
    """Times every case at its shapes and prints the table; False if our backend raised."""
    title = (
        f"## timings, {str(dtype)[6:]} (median µs; peak = MiB a fwd+bwd allocates beyond its inputs; "
        f"floor = bytes / {HBM_BYTES_PER_S / 1e12:.2f} TB/s; ref = the op's reference backend)"
    )
    head = (
        "| op | backend | B | T | dims | fwd | fwd+bwd | peak MiB | ref fwd | ref fwd+bwd | peer | peer fwd "
        "| peer fwd+bwd | peer peak MiB | floor fwd | floor fwd+bwd | target fwd+bwd |"
    )
    rows, notes, ok = [head, "|" + "---|" * head.count(" | ") + "---|"], [], True
    print(f"\n{title}, as they come\n" + "\n".join(rows), flush=True)
    for case in cases:
        peer = case.peer is not None
        if peer:
            try:
                case.peer()
            except Exception as e:  # not installed, or an fla that does not import here
                peer = False
                notes.append(f"{case.name}: {case.peer_name} not timed ({type(e).__name__}: {e})")
        for i, (b, t) in enumerate(case.shapes[:1] if quick else case.shapes):
            r = time_shape(case, b, t, dtype, peer, notes)
            ok &= isinstance(r[case.backend], dict)
            target = f"≤ {case.target_us:.0f}" if case.target_us and i == 0 else ""
            ours = _cells(r[case.backend], ("fwd", "fwd+bwd", "peak_mib"))
            ref = _cells(r[REFERENCE], ("fwd", "fwd+bwd"))
            peer_cells = [case.peer_name if case.peer is not None else "—",
                          *_cells(r["peer"], ("fwd", "fwd+bwd", "peak_mib"))]  # fmt: skip
            floor = [f"{x:.1f}" for x in r["floor"]]
            row = [case.name, case.backend, str(b), str(t), case.dims, *ours, *ref, *peer_cells, *floor, target]
            rows.append("| " + " | ".join(row) + " |")
            print(rows[-1], flush=True)
    print("\n".join(["", title, *rows, "", *notes]))
    return ok


def main(argv: list[str] | None = None) -> int:
    """Parses the arguments, runs the checks, the sweeps and the timings; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", default="", help="comma-separated op names (default: all): "
                        "longhorn, mamba, conv, gla, retnet, rwkv, sdpa")  # fmt: skip
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--quick", action="store_true", help="only the first shape and the first check of each op")
    parser.add_argument("--sweep", action="store_true", help="also time each launch setting of the fast backends")
    args = parser.parse_args(argv)
    cases = build_cases()
    wanted = [n for n in args.ops.split(",") if n]
    unknown = sorted(set(wanted) - {c.name for c in cases})
    if unknown:
        parser.error(f"unknown op(s) {', '.join(unknown)}; choose from {', '.join(c.name for c in cases)}")
    cases = [c for c in cases if not wanted or c.name in wanted]
    if not torch.cuda.is_available():
        sys.exit("benchmarks.ops times GPU kernels and needs a CUDA GPU; torch.cuda.is_available() is False here.")
    dtype = getattr(torch, args.dtype)

    print(f"# {_versions()}, dtype {args.dtype}", flush=True)
    ok = True
    for case in [c for c in cases if isinstance(c.op, ScanOp)]:
        if case.backend not in case.op.available_backends():  # the CUDA build happens here
            ok = False
            print(f"{case.name}: backend {case.backend!r} unavailable here (see the warning above); skipped")
            cases.remove(case)
    ok &= run_checks([c for c in cases if isinstance(c.op, ScanOp)], dtype, args.quick)
    if args.sweep:
        for case in [c for c in cases if c.sweep is not None]:
            for b, t in case.shapes[:1] if args.quick else case.shapes:
                sweep(case, b, t, dtype)
    ok &= run_timings(cases, dtype, args.quick)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
