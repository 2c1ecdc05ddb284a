"""Triton kernels of the causal depthwise conv (see :mod:`.conv` for the formula).

Imported only by :mod:`.conv_triton`, when the Triton backend runs, so the trainer runs without Triton.

Every program works on a tile of BT steps and BE channels (x's last, unit-stride dimension) of one
batch row. The input at position p reaches the outputs p..p+K-1; it reaches q = p + s when no
document starts at p+1..q, so both passes build their masks from K shifted loads of ``reset``.
Positions -(K-1)..-1 read the initial state.

    forward   a_q = bias + sum_s w[K-1-s] x_{q-s},  y_q = SiLU(a_q); the last tile writes the final state.
    backward  g_q = dy_q SiLU'(a_q) with a_q recomputed,  dx_p = sum_s w[K-1-s] g_{p+s} (+ d final state),
              dw[K-1-s] = sum_p x_p g_{p+s},  dbias = sum_q g_q.

The backward recomputes a at the K shifts p..p+K-1 of its tile (loads of x it made a moment before,
served from L1/L2), so it reads x and dy once from memory and stores nothing but dx, the initial
state's gradient and one (K+1, BE) tile of fp32 partial sums per program (rows 0..K-1 dw, row K
dbias); each program loops over the tiles of a chunk of CT steps, and a ``sum`` over the programs
finishes the reduction (deterministic, no atomics). The loops over taps are runtime loops, so the
K x K recomputed taps are never all live at once: it keeps the registers (and spills) down.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _no_reset(r, pos, T):
    """True where no document starts at pos (r: this row of the reset mask); outside [0, T) none does."""
    return tl.load(r + pos, mask=(pos >= 0) & (pos < T), other=0) == 0


@triton.jit
def _x_at(x, s0, pos, e, T, E, sxt, sxe, sse, ssk, K: tl.constexpr, HAS_STATE: tl.constexpr):
    """x at positions pos (N,) and channels e (BE,) as (N, BE) fp32 (x, s0: this row's input and initial
    state): positions -(K-1)..-1 read the initial state, the others outside [0, T) are zero."""
    em = (e < E)[None, :]
    p = pos[:, None]
    v = tl.load(x + p.to(tl.int64) * sxt + e[None, :] * sxe, mask=em & (p >= 0) & (p < T), other=0.0).to(tl.float32)
    if HAS_STATE:
        ps = p + (K - 1)
        v += tl.load(s0 + e[None, :] * sse + ps * ssk, mask=em & (p < 0) & (ps >= 0), other=0.0).to(tl.float32)
    return v


@triton.jit
def _kept(r, pos, T, N: tl.constexpr, K: tl.constexpr):
    """True where no document starts after pos up to T-1: the final state keeps that input."""
    kept = tl.full([N], 1, tl.int1)
    for m in tl.static_range(1, K - 1):
        kept = kept & _no_reset(r, pos + m, T)
    return kept


@triton.jit
def _preact(x, w, bias, s0, r, q, e, T, E, sxt, sxe, sse, ssk, swe, swk,
            N: tl.constexpr, BE: tl.constexpr, K: tl.constexpr,
            HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, HAS_RESET: tl.constexpr):  # fmt: skip
    """The conv before the activation at positions q (N,) and channels e (BE,), (N, BE) fp32."""
    em = e < E
    acc = tl.zeros([N, BE], tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias + e, mask=em, other=0.0).to(tl.float32)[None, :]
    seen = tl.full([N], 1, tl.int1)  # no document starts at q-s+1..q
    for s in tl.range(0, K, loop_unroll_factor=1):  # a loop, not unrolled: few registers, many programs
        xs = _x_at(x, s0, q - s, e, T, E, sxt, sxe, sse, ssk, K, HAS_STATE)
        if HAS_RESET:
            xs = tl.where(seen[:, None], xs, 0.0)
            seen = seen & _no_reset(r, q - s, T)
        tap = tl.load(w + e * swe + (K - 1 - s) * swk, mask=em, other=0.0).to(tl.float32)
        acc += tap[None, :] * xs
    return acc


@triton.jit
def conv_fwd_kernel(x, w, bias, s0, r, y, sT, T, E, sxb, sxt, sxe, ssb, sse, ssk, swe, swk,
                    K: tl.constexpr, KP: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr, SILU: tl.constexpr,
                    HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, HAS_RESET: tl.constexpr):  # fmt: skip
    """y (B, T, E) contiguous; the program with the last tile of steps also writes sT (B, E, K-1)."""
    i_t, i_e, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    x, s0, r = x + b * sxb, s0 + b * ssb, r + b * T  # this batch row
    t = i_t * BT + tl.arange(0, BT)
    e = i_e * BE + tl.arange(0, BE)
    em = (e < E)[None, :]
    a = _preact(x, w, bias, s0, r, t, e, T, E, sxt, sxe, sse, ssk, swe, swk, BT, BE, K, HAS_BIAS, HAS_STATE, HAS_RESET)
    if SILU:
        a = a * tl.sigmoid(a)
    tl.store(y + (b * T + t[:, None]) * E + e[None, :], a.to(y.dtype.element_ty), mask=(t < T)[:, None] & em)
    if i_t == tl.num_programs(0) - 1:
        i = tl.arange(0, KP)
        p = T - (K - 1) + i
        v = _x_at(x, s0, p, e, T, E, sxt, sxe, sse, ssk, K, HAS_STATE)
        if HAS_RESET:
            v = tl.where(_kept(r, p, T, KP, K)[:, None], v, 0.0)
        tl.store(sT + (b * E + e[None, :]) * (K - 1) + i[:, None], v.to(sT.dtype.element_ty),
                 mask=(i < K - 1)[:, None] & em)  # fmt: skip


@triton.jit
def _grad_at(x, w, bias, s0, r, dy, dsT, p, own, e, T, E, sxt, sxe, sse, ssk, swe, swk, sdt, sde, sfe, sfk,
             N: tl.constexpr, BE: tl.constexpr, K: tl.constexpr, KP2: tl.constexpr, SILU: tl.constexpr,
             HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, HAS_RESET: tl.constexpr,
             HAS_DST: tl.constexpr):  # fmt: skip
    """For the inputs at positions p (N,) of one batch row: their gradient (N, BE), and (KP2, BE) sums over
    those marked ``own``: rows 0..K-1 their weight-gradient terms (row j: tap j), row K their bias terms."""
    em = e < E
    xp = tl.where(own[:, None], _x_at(x, s0, p, e, T, E, sxt, sxe, sse, ssk, K, HAS_STATE), 0.0)
    dxp = tl.zeros([N, BE], tl.float32)
    sums = tl.zeros([KP2, BE], tl.float32)
    rows = tl.arange(0, KP2)[:, None]
    seen = tl.full([N], 1, tl.int1)  # no document starts at p+1..p+s
    for s in tl.range(0, K, loop_unroll_factor=1):
        q = p + s
        g = tl.load(dy + q[:, None].to(tl.int64) * sdt + e[None, :] * sde,
                    mask=((q >= 0) & (q < T))[:, None] & em[None, :], other=0.0).to(tl.float32)  # fmt: skip
        if SILU:
            a = _preact(x, w, bias, s0, r, q, e, T, E, sxt, sxe, sse, ssk, swe, swk,
                        N, BE, K, HAS_BIAS, HAS_STATE, HAS_RESET)  # fmt: skip
            sg = tl.sigmoid(a)
            g = g * sg * (1.0 + a * (1.0 - sg))
        if HAS_RESET:
            g = tl.where(seen[:, None], g, 0.0)
            seen = seen & _no_reset(r, q + 1, T)
        if s == 0:
            sums = tl.where(rows == K, sums + tl.sum(tl.where(own[:, None], g, 0.0), 0)[None, :], sums)
        tap = tl.load(w + e * swe + (K - 1 - s) * swk, mask=em, other=0.0).to(tl.float32)
        dxp += tap[None, :] * g
        sums = tl.where(rows == K - 1 - s, sums + tl.sum(xp * g, 0)[None, :], sums)
    if HAS_DST:
        idx = p - (T - (K - 1))
        hit = (idx >= 0) & (idx < K - 1)
        if HAS_RESET:
            hit = hit & _kept(r, p, T, N, K)
        dxp += tl.load(dsT + e[None, :] * sfe + idx[:, None] * sfk, mask=hit[:, None] & em[None, :],
                       other=0.0).to(tl.float32)  # fmt: skip
    return dxp, sums


@triton.jit
def conv_bwd_kernel(x, w, bias, s0, r, dy, dsT, dx, ds0, part, T, E, CT, sxb, sxt, sxe, ssb, sse, ssk, swe, swk,
                    sdb, sdt, sde, sfb, sfe, sfk, K: tl.constexpr, KP: tl.constexpr, KP2: tl.constexpr,
                    BT: tl.constexpr, BE: tl.constexpr, SILU: tl.constexpr, HAS_BIAS: tl.constexpr,
                    HAS_STATE: tl.constexpr, HAS_RESET: tl.constexpr, HAS_DST: tl.constexpr):  # fmt: skip
    """dx (B, T, E) and ds0 (B, E, K-1), contiguous; part (B * chunks, K+1, E) gets this program's
    sums of the weight gradient (rows 0..K-1, one per tap) and the bias gradient (row K)."""
    i_e, i_c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    x, s0, r, dy, dsT = x + b * sxb, s0 + b * ssb, r + b * T, dy + b * sdb, dsT + b * sfb  # this batch row
    e = i_e * BE + tl.arange(0, BE)
    em = (e < E)[None, :]
    acc = tl.zeros([KP2, BE], tl.float32)
    for t0 in range(i_c * CT, tl.minimum(i_c * CT + CT, T), BT):
        p = t0 + tl.arange(0, BT)
        dxp, sums = _grad_at(x, w, bias, s0, r, dy, dsT, p, p < T, e, T, E, sxt, sxe, sse, ssk, swe, swk,
                               sdt, sde, sfe, sfk, BT, BE, K, KP2, SILU, HAS_BIAS, HAS_STATE, HAS_RESET,
                               HAS_DST)  # fmt: skip
        tl.store(dx + (b * T + p[:, None]) * E + e[None, :], dxp.to(dx.dtype.element_ty), mask=(p < T)[:, None] & em)
        acc += sums
    if HAS_STATE:
        if i_c == 0:
            i = tl.arange(0, KP)  # names of their own: a runtime if may not retype the loop's p, dxp
            ps = i - (K - 1)
            ds, sums = _grad_at(x, w, bias, s0, r, dy, dsT, ps, ps < 0, e, T, E, sxt, sxe, sse, ssk, swe, swk,
                                  sdt, sde, sfe, sfk, KP, BE, K, KP2, SILU, HAS_BIAS, HAS_STATE, HAS_RESET,
                                  HAS_DST)  # fmt: skip
            tl.store(ds0 + (b * E + e[None, :]) * (K - 1) + i[:, None], ds, mask=(i < K - 1)[:, None] & em)
            acc += sums
    rows = tl.arange(0, KP2)[:, None]
    tl.store(part + ((b * tl.num_programs(1) + i_c) * (K + 1) + rows) * E + e[None, :], acc, mask=(rows <= K) & em)
