"""Forward and backward custom ops of the chunked linear-attention scan, on Triton kernels.

``longhorn_zoo::linear_attn_chunk_fwd`` and ``longhorn_zoo::linear_attn_chunk_bwd`` are
``torch.library.triton_op`` ops: their fake implementation is the function itself, and
under ``torch.compile`` Inductor sees the kernels. Importing this module imports Triton;
:mod:`longhorn_zoo.plugins.linear_attention.triton_chunk` does so only when the backend is used.
Float64 inputs (tests) run in float32 with exact (non-tf32) products.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.library import triton_op, wrap_triton

from longhorn_zoo.plugins.linear_attention import triton_chunk_kernels as kern

CHUNK_PER_KEY = 32
"""Steps per chunk for per-key decays (GLA, RWKV-6)."""
CHUNK_PER_HEAD = 64
"""Steps per chunk for a per-head decay (RetNet)."""
MIN_STATE_PROGRAMS = 256
"""The state passes use smaller key/value blocks until they run at least this many programs."""
NUM_WARPS_STATE = 4
"""Warps of the sequential state passes."""
NUM_WARPS_CHUNK = 4
"""Warps of the per-chunk output and gradient kernels."""
EXP_LIMIT = 60.0
"""A chunk's pair weights are one matrix product of factors exp(+-x) while every x is within this
bound; a chunk past it is redone with each weight formed on its own (the kernels' EXACT launch).
e^60 ~ 1e26 leaves the factors, their products with q and k, and the backward's sums over a chunk
~1e12 of headroom below float32's 3e38, and e^-60 keeps them normal."""

_fwd_state, _fwd_output = wrap_triton(kern._fwd_state), wrap_triton(kern._fwd_output)
_bwd_state, _bwd_chunk = wrap_triton(kern._bwd_state), wrap_triton(kern._bwd_chunk)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _block(n: int, cap: int = 64) -> int:
    """Power-of-two block for a dimension of n: at least 16 (the smallest tl.dot), at most cap."""
    return max(16, min(cap, 1 << (n - 1).bit_length()))


def _state_blocks(bh: int, K: int, V: int) -> tuple[int, int]:
    """Key and value blocks of the sequential state passes, small enough to fill the GPU."""
    bk, bv = _block(K), _block(V)
    while bh * _cdiv(K, bk) * _cdiv(V, bv) < MIN_STATE_PROGRAMS and max(bk, bv) > 32:
        if bv >= bk:
            bv //= 2
        else:
            bk //= 2
    return bk, bv


def _prepare(q, k, v, log_decay, bonus, initial_state, reset):
    """Contiguous kernel inputs (float64 as float32), the decay kind, the chunk size and tl.dot's fp32 mode."""
    wd, prec = (torch.float32, "ieee") if q.dtype == torch.float64 else (q.dtype, "tf32")
    q, k, v = (x.to(wd).contiguous() for x in (q, k, v))
    g = log_decay.to(torch.float32 if log_decay.dtype == torch.float64 else log_decay.dtype).contiguous()
    u = None if bonus is None else bonus.to(torch.float32).contiguous()
    h0 = None if initial_state is None else initial_state.to(torch.float32).contiguous()
    r = None if reset is None else reset.to(torch.uint8).contiguous()  # not a view: Inductor cannot bitcast bool
    per_key = g.dim() == 4
    return q, k, v, g, u, h0, r, per_key, CHUNK_PER_KEY if per_key else CHUNK_PER_HEAD, prec


def _states(k, v, g, r, h0, per_key, BT, prec):
    """The state entering each chunk, (B, H, NC, K, V) in k's dtype, and the final state (fp32)."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    NC = _cdiv(T, BT)
    h = k.new_empty(B, H, NC, K, V)
    ht = k.new_empty(B, H, K, V, dtype=torch.float32)
    bk, bv = _state_blocks(B * H, K, V)
    _fwd_state[(_cdiv(K, bk) * _cdiv(V, bv), B * H)](
        k,
        v,
        g,
        k if r is None else r,
        k if h0 is None else h0,
        h,
        ht,
        T,
        H,
        K,
        V,
        NC,
        BT=BT,
        BK=bk,
        BV=bv,
        PER_KEY=per_key,
        HAS_H0=h0 is not None,
        HAS_RESET=r is not None,
        PREC=prec,
        num_warps=NUM_WARPS_STATE,
    )
    return h, ht


@triton_op("longhorn_zoo::linear_attn_chunk_fwd", mutates_args=())
def chunk_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_decay: Tensor,
    bonus: Tensor | None,
    scale: float,
    initial_state: Tensor | None,
    reset: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Output (B, T, H, V) in q's dtype and final state (B, H, K, V) (fp32; fp64 for fp64 inputs)."""
    out_dtype = q.dtype
    state_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v, g, u, h0, r, per_key, BT, prec = _prepare(q, k, v, log_decay, bonus, initial_state, reset)
    B, T, H, K = q.shape
    V = v.shape[-1]
    h, ht = _states(k, v, g, r, h0, per_key, BT, prec)
    o = q.new_empty(B, T, H, V)
    bv = _block(V)
    NC = h.shape[2]
    flags = q.new_empty(B * H, NC, dtype=torch.uint8)
    for exact in (False, True):  # factor every chunk, then redo those flagged as past EXP_LIMIT
        _fwd_output[(_cdiv(V, bv), NC, B * H)](
            q,
            k,
            v,
            g,
            q if u is None else u,
            q if r is None else r,
            h,
            o,
            flags,
            scale,
            T,
            H,
            K,
            V,
            NC,
            BT=BT,
            BK=_block(K),
            BV=bv,
            PER_KEY=per_key,
            BONUS=u is not None,
            HAS_RESET=r is not None,
            PREC=prec,
            EXP_LIMIT=EXP_LIMIT,
            EXACT=exact,
            num_warps=NUM_WARPS_CHUNK,
        )
    return o.to(out_dtype), ht.to(state_dtype)


@triton_op("longhorn_zoo::linear_attn_chunk_bwd", mutates_args=())
def chunk_bwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_decay: Tensor,
    bonus: Tensor | None,
    scale: float,
    initial_state: Tensor | None,
    reset: Tensor | None,
    do: Tensor,
    dht: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """dq, dk, dv, d log_decay, d bonus (empty without one), d initial_state (fp32; empty without one)."""
    dtypes = (q.dtype, k.dtype, v.dtype, log_decay.dtype)
    q, k, v, g, u, h0, r, per_key, BT, prec = _prepare(q, k, v, log_decay, bonus, initial_state, reset)
    B, T, H, K = q.shape
    V = v.shape[-1]
    do = do.to(q.dtype).contiguous()
    dht = None if dht is None else dht.to(torch.float32).contiguous()
    h, _ = _states(k, v, g, r, h0, per_key, BT, prec)
    NC = h.shape[2]
    dh = torch.empty_like(h)
    dh0 = q.new_empty(B, H, K, V, dtype=torch.float32)
    bk, bv = _state_blocks(B * H, K, V)
    _bwd_state[(_cdiv(K, bk) * _cdiv(V, bv), B * H)](
        q,
        g,
        q if r is None else r,
        do,
        q if dht is None else dht,
        dh,
        dh0,
        scale,
        T,
        H,
        K,
        V,
        NC,
        BT=BT,
        BK=bk,
        BV=bv,
        PER_KEY=per_key,
        EXCL=u is not None,
        HAS_DHT=dht is not None,
        PREC=prec,
        HAS_RESET=r is not None,
        num_warps=NUM_WARPS_STATE,
    )
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dg = torch.empty_like(g) if per_key else q.new_empty(B, NC, H, dtype=torch.float32)
    du = q.new_empty(B, NC, H, K if u is not None else 0, dtype=torch.float32)
    flags = q.new_empty(B * H, NC, dtype=torch.uint8)
    for exact in (False, True):  # factor every chunk, then redo those flagged as past EXP_LIMIT
        _bwd_chunk[(NC, B * H)](
            q,
            k,
            v,
            g,
            q if u is None else u,
            q if r is None else r,
            h,
            dh,
            do,
            dq,
            dk,
            dv,
            dg,
            du,
            flags,
            scale,
            T,
            H,
            K,
            V,
            NC,
            BT=BT,
            BK=_block(K),
            BV=_block(V),
            PER_KEY=per_key,
            BONUS=u is not None,
            HAS_RESET=r is not None,
            PREC=prec,
            EXP_LIMIT=EXP_LIMIT,
            EXACT=exact,
            num_warps=NUM_WARPS_CHUNK,
        )
    dg = dg if per_key else dg.sum((0, 1))
    du = du.sum((0, 1)) if u is not None else du.new_empty(0)
    dh0 = dh0 if h0 is not None else dh0.new_empty(0)
    return dq.to(dtypes[0]), dk.to(dtypes[1]), dv.to(dtypes[2]), dg.to(dtypes[3]), du, dh0
