"""The Triton linear-attention kernels against a float64 token-by-token loop.

Without CUDA the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``) on tiny
shapes with 16-step chunks (the strong-decay cases: the real chunk sizes), so that every case
crosses chunk boundaries and ends in a partial chunk. With CUDA the same checks run at real
sizes in bf16 and fp32, plus ``torch.compile(fullgraph=True)`` through a scan op with the
backend registered.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from triton_interpreter import import_interpreted, is_interpreted, use_interpreter

from longhorn_zoo.ops import define_scan_op

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

CUDA = torch.cuda.is_available()
KERNELS = "longhorn_zoo.plugins.linear_attention.triton_chunk_kernels"
import_interpreted(KERNELS)


@pytest.fixture
def interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernels in the interpreter, with tiny chunks."""
    if not is_interpreted(KERNELS, "_fwd_state"):
        pytest.skip("the Triton kernels were compiled for a GPU in this process")
    from longhorn_zoo.plugins.linear_attention import triton_chunk_ops

    use_interpreter(monkeypatch)
    monkeypatch.setattr(triton_chunk_ops, "CHUNK_PER_KEY", 16)
    monkeypatch.setattr(triton_chunk_ops, "CHUNK_PER_HEAD", 16)


@pytest.fixture
def real_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default chunk sizes, whose pair-weight exponents are the largest (the strong-decay tests)."""
    from longhorn_zoo.plugins.linear_attention import triton_chunk_ops

    monkeypatch.setattr(triton_chunk_ops, "CHUNK_PER_KEY", 32)
    monkeypatch.setattr(triton_chunk_ops, "CHUNK_PER_HEAD", 64)


def naive_scan(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_decay: Tensor,
    bonus: Tensor | None,
    scale: float,
    initial_state: Tensor | None,
    reset: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Token-by-token linear attention: S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T, o_t = scale q_t^T S_t
    (with a bonus u: o_t = scale q_t^T (S_{t-1} + diag(u) k_t v_t^T))."""
    B, T, H, K = q.shape
    out_dtype = q.dtype  # what _naive_fake declares; a compiled graph reads the output as this dtype
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v, g = q.to(cd), k.to(cd), v.to(cd), log_decay.to(cd)
    S = q.new_zeros(B, H, K, v.shape[-1]) if initial_state is None else initial_state.to(cd)
    if g.dim() == 1:
        g = g.view(1, 1, H, 1).expand(B, T, H, K)
    outs = []
    for t in range(T):
        if reset is not None:
            S = S * (~reset[:, t]).to(cd).view(B, 1, 1, 1)
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]
        if bonus is None:
            S = S * g[:, t].exp()[..., None] + kv
            outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
        else:
            outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S + bonus.to(cd)[None, :, :, None] * kv))
            S = S * g[:, t].exp()[..., None] + kv
    return (scale * torch.stack(outs, 1)).to(out_dtype), S


def _naive_fake(q, k, v, log_decay, bonus, scale, initial_state, reset):
    cd = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty(*q.shape[:3], v.shape[-1]), q.new_empty(
        q.shape[0], q.shape[2], q.shape[3], v.shape[-1], dtype=cd
    )


def make_inputs(variant, B, T, H, K, V, dtype, device, h0=True, reset=True, min_log_decay=None):
    """Random inputs of one variant: "gla", "retnet" (per-head decay) or "rwkv" (bonus).

    With ``min_log_decay``, per-key decays are uniform in [min_log_decay, 0) on every other key
    over the first half of the steps (so that chunks and key blocks of both kinds, strong and
    mild, meet in one call), and per-head decays are spread from min_log_decay to -2.5.
    """
    mk = lambda *s: torch.randn(*s, device=device, dtype=torch.float32)  # noqa: E731
    q, k, v = mk(B, T, H, K), mk(B, T, H, K), mk(B, T, H, V)
    if variant == "retnet" and min_log_decay is not None:
        g = torch.linspace(min_log_decay, -2.5, H, device=device)
    elif variant == "retnet":
        g = torch.log(1 - 2.0 ** (-5.0 - torch.arange(H, device=device, dtype=torch.float32)))
    else:
        g = F.logsigmoid(mk(B, T, H, K) + 2.0)
        if min_log_decay is not None:
            first_half, odd_key = torch.arange(T, device=device) < T // 2, torch.arange(K, device=device) % 2 == 1
            strong = first_half[:, None, None] & odd_key
            g = torch.where(strong, min_log_decay * torch.rand(B, T, H, K, device=device), g)
    u = mk(H, K) if variant == "rwkv" else None
    s0 = mk(B, H, K, V) if h0 else None
    rs = (torch.rand(B, T, device=device) < 0.08) if reset else None
    if rs is not None:
        rs[0, T // 2] = True
    cast = lambda x: None if x is None else x.to(dtype)  # noqa: E731
    return cast(q), cast(k), cast(v), cast(g), cast(u), K**-0.5, s0 if s0 is None else s0.to(torch.float32), rs


def check(inputs, tol_out, tol_grad, final_grad=True):
    """Compare the Triton forward and backward against the float64 naive loop; return the errors."""
    from longhorn_zoo.plugins.linear_attention.triton_chunk import TRITON_BACKEND

    q, k, v, g, u, scale, s0, rs = inputs
    ref_in = [None if x is None else x.detach().double().requires_grad_() for x in (q, k, v, g, u, s0)]
    o_ref, ht_ref = naive_scan(*ref_in[:5], scale, ref_in[5], rs)
    do = torch.randn_like(o_ref)
    dht = torch.randn_like(ht_ref) if final_grad else None
    loss = (o_ref * do).sum() + ((ht_ref * dht).sum() if final_grad else 0)
    wanted = [x for x in ref_in if x is not None]
    grads_ref = dict(
        zip([n for n, x in zip("q k v g u s0".split(), ref_in) if x is not None], torch.autograd.grad(loss, wanted))
    )

    o, ht = TRITON_BACKEND.forward(q, k, v, g, u, scale, s0, rs)
    assert o.dtype == q.dtype and o.shape == o_ref.shape and ht.shape == ht_ref.shape
    err = lambda a, b: ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()  # noqa: E731 (b = 0 after a reset at t = 0)
    errors = {"o": err(o, o_ref), "final_state": err(ht, ht_ref)}
    grads = TRITON_BACKEND.backward(
        (q, k, v, g, u, scale, s0, rs), (o, ht), (do.to(q.dtype), None if dht is None else dht.float())
    )
    assert grads[5] is None and grads[7] is None
    for name, gr in zip("q k v g u - s0 -".split(), grads):
        if name in grads_ref:
            assert gr is not None and gr.shape == grads_ref[name].shape, name
            errors["d" + name] = err(gr, grads_ref[name])
        else:
            assert gr is None, name
    for name, e in errors.items():
        tol = tol_out if name in ("o", "final_state") else tol_grad
        assert e < tol, f"{name}: relative error {e:.2e} >= {tol:.0e} (all: {errors})"
    return errors


VARIANTS = ["gla", "retnet", "rwkv"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_interpreter_matches_naive_with_state_and_resets(interpreter, variant):
    check(make_inputs(variant, 2, 37, 2, 16, 16, torch.float64, "cpu"), 1e-5, 1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_interpreter_no_state_no_reset_one_partial_chunk(interpreter, variant):
    check(
        make_inputs(variant, 1, 11, 2, 16, 16, torch.float64, "cpu", h0=False, reset=False),
        1e-5,
        1e-5,
        final_grad=False,
    )


def test_interpreter_uneven_key_and_value_sizes(interpreter):
    check(make_inputs("rwkv", 1, 33, 1, 24, 40, torch.float64, "cpu"), 1e-5, 1e-5)


# numpy's warnings from the factored launch's overflowing factors, in the chunks the exact launch then redoes
@pytest.mark.filterwarnings("ignore:(overflow|invalid value) encountered:RuntimeWarning")
@pytest.mark.parametrize("variant", VARIANTS)
def test_interpreter_decays_down_to_minus_20(interpreter, real_chunks, variant):
    """Log decays down to -20 a step at the real chunk sizes, where factoring a chunk's pair weights
    around one step would overflow float32 (e^(16 * 20)): those chunks are redone with each pair weight
    formed on its own, next to chunks that stay factored; their mild keys (heads) keep pairs far apart
    significant, so that the exact path is checked on more than its diagonal. (A per-head decay's
    gradient sums a whole row's terms in float32, which can cancel: up to 7e-5 seen over 8 seeds,
    6e-4 for the float32 reference; hence a fixed seed.)"""
    torch.manual_seed(0)
    check(make_inputs(variant, 1, 75, 2, 16, 16, torch.float64, "cpu", min_log_decay=-20.0), 1e-5, 1e-4)


def test_interpreter_float32_inputs(interpreter):
    check(make_inputs("gla", 1, 24, 2, 16, 16, torch.float32, "cpu"), 1e-5, 1e-5)


def test_register_triton_backend_adds_a_cuda_backend():
    from longhorn_zoo.plugins.linear_attention.triton_chunk import register_triton_backend

    op = define_scan_op("longhorn_zoo_test::linear_attn_register", naive_scan, _naive_fake)
    register_triton_backend(op)
    assert [(b.name, b.device_type) for b in op.backends] == [("triton", "cuda")]


_COMPILE_FOR_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from longhorn_zoo.plugins.linear_attention import triton_chunk_kernels as kern, triton_chunk_ops as ops
pointers = {"g": "*fp32", "u": "*fp32", "reset": "*u8", "h0": "*fp32", "ht": "*fp32", "dht": "*fp32", "dh0": "*fp32",
            "dg": "*fp32", "du": "*fp32", "flags": "*u8", "scale": "fp32"}
flags = dict(BT=ops.CHUNK_PER_KEY, BK=64, BV=64, PER_KEY=True, BONUS=True, EXCL=True, HAS_H0=True, HAS_DHT=True,
             HAS_RESET=True, PREC="tf32", EXP_LIMIT=ops.EXP_LIMIT)
for fn in (kern._fwd_state, kern._fwd_output, kern._bwd_state, kern._bwd_chunk):
    for exact in (False, True) if "EXACT" in fn.arg_names else (None,):
        consts = {k: v for k, v in dict(flags, EXACT=exact).items() if k in fn.arg_names}
        sig = {n: "constexpr" if n in consts else pointers.get(n, "i32" if n[0].isupper() else "*bf16")
               for n in fn.arg_names}
        src = triton.compiler.ASTSource(fn, sig, constexprs=consts)
        triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
"""


@pytest.mark.skipif(CUDA, reason="on a GPU the GPU tests below compile the kernels")
def test_kernels_compile_for_sm90_without_a_gpu():
    """Triton's compiler, which the interpreter skips (types across runtime branches, lowering to sm_90 code): every
    kernel with a per-key decay, a bonus, state and resets, both launches of the chunk kernels (the GPU tests compile
    the rest); in a fresh process, as this one imported the kernels for the interpreter."""
    done = subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90], capture_output=True, text=True, timeout=900,
                          env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]


# ---- on a GPU, at real sizes ----

gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA")
REAL = {"gla": (2, 1000, 4, 128, 128), "retnet": (2, 1000, 4, 128, 128), "rwkv": (2, 1000, 8, 64, 64)}


@gpu
@pytest.mark.parametrize("chunk", [32, 64])
@pytest.mark.parametrize("variant", VARIANTS)
def test_gpu_bf16_matches_naive(variant, chunk, monkeypatch):
    from longhorn_zoo.plugins.linear_attention import triton_chunk_ops

    monkeypatch.setattr(triton_chunk_ops, "CHUNK_PER_KEY", chunk)
    monkeypatch.setattr(triton_chunk_ops, "CHUNK_PER_HEAD", chunk)
    torch.manual_seed(0)
    print(variant, chunk, check(make_inputs(variant, *REAL[variant], torch.bfloat16, "cuda"), 1e-2, 2e-2))


@gpu
@pytest.mark.parametrize("variant", VARIANTS)
def test_gpu_float32_matches_naive(variant):
    torch.manual_seed(1)
    print(variant, "fp32", check(make_inputs(variant, *REAL[variant], torch.float32, "cuda"), 3e-3, 5e-3))


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("variant", VARIANTS)
def test_gpu_decays_down_to_minus_20(variant, dtype):
    """The compiled column path (strong key blocks) next to the factored one, at real sizes."""
    torch.manual_seed(3)
    tol = (1e-2, 2e-2) if dtype == torch.bfloat16 else (3e-3, 5e-3)
    inputs = make_inputs(variant, *REAL[variant], dtype, "cuda", min_log_decay=-20.0)
    print(variant, dtype, check(inputs, *tol))


@gpu
def test_gpu_compiled_scan_op_fullgraph():
    """Through a scan op with the backend registered, compiled with fullgraph=True, fwd and bwd."""
    from longhorn_zoo.plugins.linear_attention.triton_chunk import register_triton_backend

    op = define_scan_op("longhorn_zoo_test::linear_attn_compiled", naive_scan, _naive_fake)
    register_triton_backend(op)
    backend = op.select_backend("cuda")
    assert backend is not None and backend.name == "triton", f"the op would run {backend} on CUDA, not triton"
    torch.manual_seed(2)
    q, k, v, g, u, scale, s0, rs = make_inputs("rwkv", 2, 300, 4, 64, 64, torch.bfloat16, "cuda")
    rs[1] = False  # with resets in every row the initial state's gradient would be exactly zero
    leaves = [x.requires_grad_() for x in (q, k, v, g, u, s0)]

    def loss(scan, q, k, v, g, u, s0):
        o, ht = scan(q, k, v, g, u, scale, s0, rs)
        return o.float().square().sum() + ht.sum()

    compiled = torch.compile(lambda *x: loss(op, *x), fullgraph=True)
    grads = torch.autograd.grad(compiled(*leaves), leaves)
    ref_in = [x.detach().double().requires_grad_() for x in leaves]
    grads_ref = torch.autograd.grad(loss(naive_scan, *ref_in), ref_in)
    for name, gr, gref in zip(("q", "k", "v", "log_decay", "bonus", "initial_state"), grads, grads_ref):
        assert torch.isfinite(gr).all(), f"compiled d{name} is not finite"
        assert torch.isfinite(gref).all(), f"float64 reference d{name} is not finite"
        assert gref.norm() > 0, f"float64 reference d{name} is zero: the error ratio below would be 0/0"
        err = ((gr.double() - gref).norm() / gref.norm()).item()
        assert err < 3e-2, f"d{name}: relative error {err:.2e}"
