"""Triton kernels of the causal depthwise conv (see :mod:`.conv` for the formula).

Imported only by :mod:`.conv_triton`, when the Triton backend runs, so the trainer runs without Triton.

Every program works on tiles of BT steps and BE channels (x's last, unit-stride dimension) of one
batch row. The input at position p reaches the outputs p..p+K-1; it reaches q = p + s when no
document starts at p+1..q, so both passes build their masks from K shifted loads of ``reset``.
Positions -(K-1)..-1 read the initial state.

    forward   a_q = bias + sum_s w[K-1-s] x_{q-s},  y_q = SiLU(a_q); the last tile writes the final state.
    backward  g_q = dy_q SiLU'(a_q) with a_q recomputed,  dx_p = sum_s w[K-1-s] g_{p+s} (+ d final state),
              dw[K-1-s] = sum_p x_p g_{p+s},  dbias = sum_q g_q.

The backward recomputes a at the K shifts p..p+K-1 of its tile from the 2K-1 shifted loads of x
(each loaded once; the shifts overlap the neighbouring tiles, so L1 serves them), so it reads x and
dy once from memory. Each program walks the tiles of a chunk of CT steps and keeps the weight and
bias terms in one (BT, BE) fp32 accumulator per tap, elementwise: the sums over steps, which cross
warps, run once per program at its end, into one (K+1, BE) tile of partial sums (rows 0..K-1 dw, row
K dbias); a ``sum`` over the programs finishes the reduction (deterministic, no atomics). The taps
are unrolled, with one accumulator each, up to MAX_K; :mod:`.conv_triton` sends larger kernels to
the reference.
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
    for s in tl.static_range(K):
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


MAX_K = 6
"""Kernel sizes up to this have kernels (one accumulator per tap, unrolled); larger ones use the reference."""


@triton.jit
def _no_reset_in(r, p, lo: tl.constexpr, hi: tl.constexpr, T, N: tl.constexpr):
    """True where no document starts at p+lo..p+hi (none when lo > hi)."""
    ok = tl.full([N], 1, tl.int1)
    for m in tl.static_range(lo, hi + 1):
        ok = ok & _no_reset(r, p + m, T)
    return ok


@triton.jit
def _add_to(c0, c1, c2, c3, c4, c5, s: tl.constexpr, v):
    """(c0..c5) with v added to c<s>."""
    if s == 0:
        c0 += v
    if s == 1:
        c1 += v
    if s == 2:
        c2 += v
    if s == 3:
        c3 += v
    if s == 4:
        c4 += v
    if s == 5:
        c5 += v
    return c0, c1, c2, c3, c4, c5


@triton.jit
def _pick(c0, c1, c2, c3, c4, c5, s: tl.constexpr):
    """c<s>."""
    c = c0
    if s == 1:
        c = c1
    if s == 2:
        c = c2
    if s == 3:
        c = c3
    if s == 4:
        c = c4
    if s == 5:
        c = c5
    return c


@triton.jit
def _grads(x, w, bias, s0, r, dy, dsT, p, own, e, T, E, sxt, sxe, sse, ssk, swe, swk, sdt, sde, sfe, sfk,
           a0, a1, a2, a3, a4, a5, ab,
           N: tl.constexpr, BE: tl.constexpr, K: tl.constexpr, SILU: tl.constexpr, HAS_BIAS: tl.constexpr,
           HAS_STATE: tl.constexpr, HAS_RESET: tl.constexpr, HAS_DST: tl.constexpr):  # fmt: skip
    """For the inputs at positions p (N,) of one batch row: their gradient (N, BE), and the accumulators
    (N, BE) fp32 updated with the terms of the inputs marked ``own``: a<s> += x_p g_{p+s} (the gradient of
    tap K-1-s), ab += g_p (the bias). Elementwise only: the sums over steps are left to the caller.

    The pre-activations c<s> at the K shifts p+s come from the 2K-1 shifted inputs x_{p+d}, each loaded
    once: x_{p+d} reaches c<s> through tap K-1-(s-d) when 0 <= s-d < K and no document starts at p+d+1..p+s."""
    em = e < E
    c0 = tl.zeros([N, BE], tl.float32)
    if HAS_BIAS:
        c0 += tl.load(bias + e, mask=em, other=0.0).to(tl.float32)[None, :]
    c1, c2, c3, c4, c5 = c0, c0, c0, c0, c0
    xp = c0
    for d in tl.static_range(1 - K, K):
        xd = _x_at(x, s0, p + d, e, T, E, sxt, sxe, sse, ssk, K, HAS_STATE)
        if d == 0:
            xp = tl.where(own[:, None], xd, 0.0)
        if SILU:
            for s in tl.static_range(K):
                if s - d >= 0:
                    if s - d < K:
                        tap = tl.load(w + e * swe + (K - 1 - s + d) * swk, mask=em, other=0.0).to(tl.float32)
                        v = tap[None, :] * xd
                        if HAS_RESET:
                            v = tl.where(_no_reset_in(r, p, d + 1, s, T, N)[:, None], v, 0.0)
                        c0, c1, c2, c3, c4, c5 = _add_to(c0, c1, c2, c3, c4, c5, s, v)
    dxp = tl.zeros([N, BE], tl.float32)
    seen = tl.full([N], 1, tl.int1)  # no document starts at p+1..p+s
    for s in tl.static_range(K):
        q = p + s
        g = tl.load(dy + q[:, None].to(tl.int64) * sdt + e[None, :] * sde,
                    mask=((q >= 0) & (q < T))[:, None] & em[None, :], other=0.0).to(tl.float32)  # fmt: skip
        if SILU:
            c = _pick(c0, c1, c2, c3, c4, c5, s)
            sg = tl.sigmoid(c)
            g = g * sg * (1.0 + c * (1.0 - sg))
        if HAS_RESET:
            g = tl.where(seen[:, None], g, 0.0)
            seen = seen & _no_reset(r, q + 1, T)
        tap = tl.load(w + e * swe + (K - 1 - s) * swk, mask=em, other=0.0).to(tl.float32)
        dxp += tap[None, :] * g
        term = xp * g
        a0, a1, a2, a3, a4, a5 = _add_to(a0, a1, a2, a3, a4, a5, s, term)
        if s == 0:
            ab += tl.where(own[:, None], g, 0.0)
    if HAS_DST:
        idx = p - (T - (K - 1))
        hit = (idx >= 0) & (idx < K - 1)
        if HAS_RESET:
            hit = hit & _kept(r, p, T, N, K)
        dxp += tl.load(dsT + e[None, :] * sfe + idx[:, None] * sfk, mask=hit[:, None] & em[None, :],
                       other=0.0).to(tl.float32)  # fmt: skip
    return dxp, a0, a1, a2, a3, a4, a5, ab


@triton.jit
def _store_tap(rows, e, em, d, E, K: tl.constexpr, s: tl.constexpr):
    """The gradient d (BE,) of tap K-1-s to its row of rows (K+1, E), when there is such a tap (s < K)."""
    if s < K:
        tl.store(rows + (K - 1 - s) * E + e, d, mask=em)


@triton.jit
def conv_bwd_kernel(x, w, bias, s0, r, dy, dsT, dx, ds0, part, T, E, CT, sxb, sxt, sxe, ssb, sse, ssk, swe, swk,
                    sdb, sdt, sde, sfb, sfe, sfk, K: tl.constexpr, KP: tl.constexpr,
                    BT: tl.constexpr, BE: tl.constexpr, SILU: tl.constexpr, HAS_BIAS: tl.constexpr,
                    HAS_STATE: tl.constexpr, HAS_RESET: tl.constexpr, HAS_DST: tl.constexpr):  # fmt: skip
    """dx (B, T, E) and ds0 (B, E, K-1), contiguous; part (B * chunks, K+1, E) gets this program's
    sums of the weight gradient (rows 0..K-1, one per tap) and the bias gradient (row K)."""
    i_e, i_c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    x, s0, r, dy, dsT = x + b * sxb, s0 + b * ssb, r + b * T, dy + b * sdb, dsT + b * sfb  # this batch row
    e = i_e * BE + tl.arange(0, BE)
    em = e < E
    a0 = tl.zeros([BT, BE], tl.float32)
    a1, a2, a3, a4, a5, ab = a0, a0, a0, a0, a0, a0
    for t0 in range(i_c * CT, tl.minimum(i_c * CT + CT, T), BT):
        p = t0 + tl.arange(0, BT)
        dxp, a0, a1, a2, a3, a4, a5, ab = _grads(
            x, w, bias, s0, r, dy, dsT, p, p < T, e, T, E, sxt, sxe, sse, ssk, swe, swk, sdt, sde, sfe, sfk,
            a0, a1, a2, a3, a4, a5, ab, BT, BE, K, SILU, HAS_BIAS, HAS_STATE, HAS_RESET, HAS_DST)  # fmt: skip
        tl.store(dx + (b * T + p[:, None]) * E + e[None, :], dxp.to(dx.dtype.element_ty),
                 mask=(p < T)[:, None] & em[None, :])  # fmt: skip
    d0, d1, d2, d3, d4, d5, db = (tl.sum(a0, 0), tl.sum(a1, 0), tl.sum(a2, 0), tl.sum(a3, 0), tl.sum(a4, 0),
                                  tl.sum(a5, 0), tl.sum(ab, 0))  # fmt: skip
    if HAS_STATE:
        if i_c == 0:  # the initial state's inputs, positions -(K-1)..-1; names of their own (a runtime if)
            i = tl.arange(0, KP)
            ps = i - (K - 1)
            z = tl.zeros([KP, BE], tl.float32)
            ds, z0, z1, z2, z3, z4, z5, zb = _grads(
                x, w, bias, s0, r, dy, dsT, ps, ps < 0, e, T, E, sxt, sxe, sse, ssk, swe, swk, sdt, sde, sfe, sfk,
                z, z, z, z, z, z, z, KP, BE, K, SILU, HAS_BIAS, HAS_STATE, HAS_RESET, HAS_DST)  # fmt: skip
            tl.store(ds0 + (b * E + e[None, :]) * (K - 1) + i[:, None], ds, mask=(i < K - 1)[:, None] & em[None, :])
            d0 += tl.sum(z0, 0)
            d1 += tl.sum(z1, 0)
            d2 += tl.sum(z2, 0)
            d3 += tl.sum(z3, 0)
            d4 += tl.sum(z4, 0)
            d5 += tl.sum(z5, 0)
            db += tl.sum(zb, 0)
    rows = part + (b * tl.num_programs(1) + i_c) * (K + 1) * E  # this program's (K+1, E) rows
    _store_tap(rows, e, em, d0, E, K, 0)
    _store_tap(rows, e, em, d1, E, K, 1)
    _store_tap(rows, e, em, d2, E, K, 2)
    _store_tap(rows, e, em, d3, E, K, 3)
    _store_tap(rows, e, em, d4, E, K, 4)
    _store_tap(rows, e, em, d5, E, K, 5)
    tl.store(rows + K * E + e, db, mask=em)
