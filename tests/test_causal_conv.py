"""The causal depthwise conv op: what its reference computes, the conformance op checks, compile, and
the Triton kernels against the float64 reference.

Without CUDA the kernels run in Triton's interpreter on tiny shapes with 32 channels a program and
chunks of 16 steps, so every case crosses chunk and channel-block boundaries, ends in partial ones, and
runs both the kernels' groups of steps and the steps left over. With CUDA the same checks run at real
sizes in bf16 and fp32.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from triton_interpreter import import_interpreted, is_interpreted, use_interpreter

from longhorn_zoo.conformance.checks import check_ops, check_resets
from longhorn_zoo.conformance.harness import Conformance
from longhorn_zoo.plugins.selective_scan.conv import TRITON_BACKEND, causal_conv1d, causal_conv1d_reference
from longhorn_zoo.registry import get_registry

HAS_TRITON = importlib.util.find_spec("triton") is not None
CUDA = torch.cuda.is_available()
KERNELS = "longhorn_zoo.plugins.selective_scan.conv_triton_kernels"
import_interpreted(KERNELS)


def make_inputs(B: int, T: int, E: int, K: int, dtype: torch.dtype, device: str = "cpu", state: bool = True,
                reset: bool = True, bias: bool = True) -> list:  # fmt: skip
    """x as the block passes it (the first half of in_proj's (B, T, 2E) output), weight, bias, state, reset."""
    x = torch.randn(B, T, 2 * E, device=device).to(dtype)[..., :E]
    w = (torch.randn(E, K, device=device) / K**0.5).to(dtype)
    b = torch.randn(E, device=device).to(dtype) if bias else None
    s0 = torch.randn(B, E, K - 1, device=device).to(dtype) if state else None
    rs = None
    if reset:
        rs = torch.rand(B, T, device=device) < 0.15
        rs[0, T // 2] = True
        if B > 1:
            rs[1] = False  # one row keeps its initial state all the way
    return [x, w, b, s0, rs]


# ---- the reference --------------------------------------------------------------------------------


def conv1d_as_the_block_did(x: Tensor, w: Tensor, b: Tensor | None, s0: Tensor | None) -> tuple[Tensor, Tensor]:
    """torch.cat of the state, F.conv1d(groups=E) and SiLU, as plugins/selective_scan/block.py did."""
    B, T, E = x.shape
    xt = torch.cat([x.new_zeros(B, E, w.shape[1] - 1) if s0 is None else s0, x.transpose(1, 2)], -1)
    y = F.silu(F.conv1d(xt, w.unsqueeze(1), b, groups=E)).transpose(1, 2)
    return y, xt[..., T:]


@pytest.mark.parametrize("T", [1, 2, 17])
@pytest.mark.parametrize("state", [True, False])
def test_reference_is_the_blocks_conv1d_without_resets(T, state):
    x, w, b, s0, _ = make_inputs(2, T, 5, 4, torch.float64, state=state, reset=False)
    y, final = causal_conv1d_reference(x, w, b, s0, None)
    y_want, final_want = conv1d_as_the_block_did(x, w, b, s0)
    assert y.is_contiguous() and final.is_contiguous()
    torch.testing.assert_close(y, y_want)
    torch.testing.assert_close(final, final_want)


@pytest.mark.parametrize("T", [3, 17])
def test_reference_reset_starts_each_document_afresh(T):
    """Each document of a row, convolved on its own from zeros, gives the row's output on that document
    (the first one starts from the initial state), and the last one gives the final state."""
    x, w, b, s0, rs = make_inputs(2, T, 5, 4, torch.float64)
    rs[0, : T // 2] = False
    rs[0, 0] = True  # a reset at step 0 drops the initial state at once
    y, final = causal_conv1d_reference(x, w, b, s0, rs)
    for row in range(2):
        starts = [0, *(int(t) for t in rs[row].nonzero().flatten() if t > 0), T]
        for i, (lo, hi) in enumerate(zip(starts[:-1], starts[1:])):
            state = s0[row : row + 1] if i == 0 and not rs[row, 0] else None
            y_doc, final_doc = causal_conv1d_reference(x[row : row + 1, lo:hi], w, b, state, None)
            torch.testing.assert_close(y[row : row + 1, lo:hi], y_doc)
        torch.testing.assert_close(final[row : row + 1], final_doc)


@pytest.mark.parametrize("split", [1, 2, 9])
def test_reference_split_with_the_state_is_one_call(split):
    x, w, b, s0, rs = make_inputs(2, 12, 5, 4, torch.float64)
    y, final = causal_conv1d_reference(x, w, b, s0, rs)
    y1, mid = causal_conv1d_reference(x[:, :split], w, b, s0, rs[:, :split])
    y2, final2 = causal_conv1d_reference(x[:, split:], w, b, mid, rs[:, split:])
    torch.testing.assert_close(torch.cat([y1, y2], 1), y)
    torch.testing.assert_close(final2, final)


def test_activation_none_keeps_the_linear_conv():
    x, w, b, s0, rs = make_inputs(2, 7, 3, 3, torch.float64)
    lin, _ = causal_conv1d_reference(x, w, b, s0, rs, "none")
    silu, _ = causal_conv1d_reference(x, w, b, s0, rs, "silu")
    torch.testing.assert_close(F.silu(lin), silu)


@pytest.mark.parametrize(("which", "bad", "needle"), [
    ("x", torch.zeros(2, 5), "x must be (B, T, E)"),
    ("weight", torch.zeros(3, 1, 4), "weight.squeeze(1)"),
    ("bias", torch.zeros(4), "bias must be (E,)"),
    ("initial_state", torch.zeros(2, 3, 4), "initial_state must be (B, E, K-1) = (2, 3, 3)"),
    ("reset", torch.zeros(2, 5), "reset must be a bool"),
    ("activation", "gelu", "'gelu'"),
])  # fmt: skip
def test_bad_arguments_are_named(which, bad, needle):
    args = dict(zip(["x", "weight", "bias", "initial_state", "reset"], make_inputs(2, 5, 3, 4, torch.float32)))
    args["activation"] = "silu"
    args[which] = bad
    with pytest.raises(ValueError, match="causal_conv1d") as err:
        causal_conv1d_reference(**args)
    assert needle in str(err.value)


# ---- the op: conformance checks, compile -----------------------------------------------------------


def test_the_selective_block_lists_the_op_so_the_suite_checks_it():
    assert causal_conv1d in get_registry().get("mamba").spec.ops


def test_op_passes_gradcheck_and_opcheck():
    check_ops(Conformance("mamba"))  # the conv and the mamba scan


def test_op_restarts_at_resets_as_the_conformance_suite_checks():
    check_resets(Conformance("mamba"))


def test_op_compiles_with_fullgraph_forward_and_backward():
    x, w, b, s0, rs = make_inputs(2, 9, 6, 4, torch.float32)
    leaves = [t.detach().requires_grad_() for t in (x, w, b, s0)]

    def loss(x, w, b, s0):
        y, final = causal_conv1d(x, w, b, s0, rs)
        return y.square().sum() + final.sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(*leaves), leaves)
    want = torch.autograd.grad(loss(*leaves), leaves)
    for g, w_ in zip(got, want):
        torch.testing.assert_close(g, w_)


# ---- the Triton kernels against the float64 reference ----------------------------------------------


def check_backend(args: list, activation: str, tol_out: float, tol_grad: float, final_grad: bool = True) -> dict:
    """Errors of the Triton forward and backward against the float64 reference, asserted below the tolerances."""
    x, w, b, s0, rs = args
    ref_in = [None if t is None else t.detach().double().requires_grad_() for t in (x, w, b, s0)]
    y_ref, final_ref = causal_conv1d_reference(*ref_in, rs, activation)
    dy = torch.randn_like(y_ref)
    d_final = torch.randn_like(final_ref) if final_grad else None
    loss = (y_ref * dy).sum() + ((final_ref * d_final).sum() if final_grad else 0)
    names = [n for n, t in zip(("x", "w", "b", "s0"), ref_in) if t is not None]
    grads_ref = dict(zip(names, torch.autograd.grad(loss, [t for t in ref_in if t is not None])))

    y, final = TRITON_BACKEND.forward(x, w, b, s0, rs, activation)
    assert y.dtype == x.dtype and y.shape == x.shape and y.is_contiguous()
    assert final.dtype == x.dtype and final.shape == final_ref.shape
    err = lambda a, r: ((a.double() - r).norm() / r.norm().clamp_min(1e-30)).item()  # noqa: E731
    errors = {"y": err(y, y_ref), "final_state": err(final, final_ref)}
    grads = TRITON_BACKEND.backward(
        (x, w, b, s0, rs, activation), (y, final), (dy.to(x.dtype), None if d_final is None else d_final.to(x.dtype))
    )
    assert grads[4] is None and grads[5] is None
    for name, g, t in zip(("x", "w", "b", "s0"), grads, (x, w, b, s0)):
        if t is None:
            assert g is None, name
            continue
        assert g is not None and g.shape == t.shape and g.dtype == t.dtype, name
        errors["d" + name] = err(g, grads_ref[name])
    for name, e in errors.items():
        tol = tol_out if name in ("y", "final_state") else tol_grad
        assert e < tol, f"{name}: relative error {e:.2e} >= {tol:.0e} (all: {errors})"
    return errors


@pytest.fixture
def interpreter(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The kernels in the interpreter with 32 channels a program, one config each (no autotuning), chunks of
    16 steps."""
    if not is_interpreted(KERNELS, "conv_fwd_kernel"):
        pytest.skip("the Triton kernels were compiled for a GPU in this process")
    use_interpreter(monkeypatch)
    from longhorn_zoo.plugins.selective_scan import conv_triton

    monkeypatch.setattr(conv_triton, "CHUNK_MULTIPLE", 16)
    monkeypatch.setattr(conv_triton, "MIN_PROGRAMS", 1 << 20)
    with conv_triton.use_configs([(32, 1)], [(32, 1)]):
        yield


needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")


@needs_triton
@pytest.mark.parametrize(("B", "T", "E", "state", "reset"), [
    (2, 17, 40, True, True),  # two chunks, a partial tile and a partial channel block
    (1, 1, 8, True, True),  # T < K - 1: the final state still holds initial-state inputs
    (1, 45, 8, False, False),  # three chunks
    (1, 20, 8, True, False),
    (1, 18, 8, True, True),  # the last chunk is shorter than the window (K - 1 steps)
    (1, 32, 8, True, True),  # a document starts at the second chunk's first step
])  # fmt: skip
def test_interpreter_matches_reference(interpreter, B, T, E, state, reset):
    torch.manual_seed(T)
    check_backend(make_inputs(B, T, E, 4, torch.float64, state=state, reset=reset), "silu", 1e-5, 1e-5)


@needs_triton
@pytest.mark.parametrize("K", [1, 2, 3])
def test_interpreter_other_kernel_sizes_no_bias_no_activation(interpreter, K):
    torch.manual_seed(K)
    check_backend(make_inputs(1, 19, 8, K, torch.float64, bias=False), "none", 1e-5, 1e-5)


@needs_triton
def test_kernel_sizes_beyond_the_kernels_run_the_reference(interpreter):
    """K > MAX_K has no kernel (one register variable per tap): the backend runs the reference and its autograd."""
    from longhorn_zoo.plugins.selective_scan.conv_triton import MAX_K

    torch.manual_seed(7)
    check_backend(make_inputs(2, 13, 8, MAX_K + 1, torch.float64), "silu", 1e-12, 1e-12)
    check_backend(make_inputs(1, 9, 8, MAX_K + 2, torch.float64, state=False, bias=False), "none", 1e-12, 1e-12,
                  final_grad=False)  # fmt: skip


@needs_triton
def test_interpreter_float32_without_final_state_gradient(interpreter):
    torch.manual_seed(4)
    check_backend(make_inputs(1, 21, 8, 4, torch.float32), "silu", 1e-5, 1e-5, final_grad=False)


_COMPILE_FOR_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from longhorn_zoo.plugins.selective_scan import conv_triton as ct, conv_triton_kernels as kern
flags = dict(K=4, SILU=True, HAS_BIAS=True, HAS_STATE=True, HAS_RESET=True, HAS_DST=True)
pointers = {"x": "*bf16", "w": "*bf16", "bias": "*bf16", "s0": "*bf16", "r": "*u8", "y": "*bf16", "sT": "*bf16",
            "dy": "*bf16", "dsT": "*bf16", "dx": "*bf16", "ds0": "*fp32", "part": "*fp32"}
for fn, (be, warps) in ((kern.conv_fwd_kernel, ct.FWD_CONFIGS[0]), (kern.conv_bwd_kernel, ct.BWD_CONFIGS[0])):
    consts = {k: v for k, v in dict(flags, BE=be).items() if k in fn.arg_names}
    sig = {n: "constexpr" if n in consts else pointers.get(n, "i32") for n in fn.arg_names}
    src = triton.compiler.ASTSource(fn, sig, constexprs=consts)
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
"""


@needs_triton
@pytest.mark.skipif(CUDA, reason="on a GPU the GPU tests below compile the kernels")
def test_kernels_compile_for_sm90_without_a_gpu():
    """Triton's compiler, which the interpreter skips (types across runtime branches, lowering to sm_90 code),
    with state, resets and every gradient; in a fresh process, as this one imported the kernels for the interpreter."""
    done = subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90], capture_output=True, text=True, timeout=600,
                          env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]


# ---- on a GPU, at real sizes ----------------------------------------------------------------------

gpu = pytest.mark.skipif(not (CUDA and HAS_TRITON), reason="needs CUDA and triton")


@gpu
@pytest.mark.parametrize(("T", "E"), [(2048, 4096), (333, 1000), (1, 520), (17, 4096)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("state", "reset"), [(True, True), (False, False)])
def test_gpu_matches_reference(T, E, dtype, state, reset):
    torch.manual_seed(T + E)
    tol = (1e-2, 2e-2) if dtype == torch.bfloat16 else (1e-5, 1e-5)
    print(check_backend(make_inputs(2, T, E, 4, dtype, "cuda", state=state, reset=reset), "silu", *tol))


@gpu
def test_gpu_backward_is_deterministic():
    torch.manual_seed(5)
    x, w, b, s0, rs = make_inputs(4, 2048, 4096, 4, torch.bfloat16, "cuda")
    y, final = TRITON_BACKEND.forward(x, w, b, s0, rs, "silu")
    dy, d_final = torch.randn_like(y), torch.randn_like(final)
    first, second = (TRITON_BACKEND.backward((x, w, b, s0, rs, "silu"), (y, final), (dy, d_final)) for _ in range(2))
    assert all(torch.equal(g, h) for g, h in zip(first, second) if g is not None)


@gpu
def test_gpu_compiled_op_fullgraph_uses_triton():
    """Through the op on CUDA, compiled with fullgraph=True by Inductor, forward and backward."""
    assert causal_conv1d.select_backend("cuda") is TRITON_BACKEND
    torch.manual_seed(6)
    x, w, b, s0, rs = make_inputs(2, 300, 1000, 4, torch.bfloat16, "cuda")
    leaves = [t.detach().requires_grad_() for t in (x, w, b, s0)]

    def loss(conv, x, w, b, s0):
        y, final = conv(x, w, b, s0, rs)
        return y.float().square().sum() + final.float().sum()

    torch._dynamo.reset()
    compiled = torch.compile(lambda *t: loss(causal_conv1d, *t), fullgraph=True)
    grads = torch.autograd.grad(compiled(*leaves), leaves)
    ref_in = [t.detach().double().requires_grad_() for t in leaves]
    grads_ref = torch.autograd.grad(loss(causal_conv1d_reference, *ref_in), ref_in)
    for name, g, r in zip(("x", "weight", "bias", "initial_state"), grads, grads_ref):
        err = ((g.double() - r).norm() / r.norm()).item()
        assert err < 2e-2, f"d{name}: relative error {err:.2e}"
