"""Triton kernels of the causal depthwise conv (see :mod:`.conv` for the formula).

Imported only by :mod:`.conv_triton`, when the Triton backend runs, so the trainer runs without Triton.

With w_s the tap that multiplies x_{t-s} (``w[K-1-s]``):

    forward   a_t = bias + sum_s w_s x_{t-s},  y_t = SiLU(a_t); the last chunk writes the final state.
    backward  g_t = dy_t SiLU'(a_t) with a_t recomputed,  dx_p = sum_s w_s g_{p+s} (+ d final state),
              dw_s = sum_t x_{t-s} g_t,  dbias = sum_t g_t.

A shift s reaches across no document start when none starts at t-s+1..t; with ``since``, the steps
from the latest start at or before t to t, that is since >= s. Positions -(K-1)..-1 read the initial
state.

Both kernels walk time in order. A program owns BE channels (x's last, unit-stride dimension) of one
batch row and a chunk of CT steps, and steps through it one row of channels at a time, loading
GROUP rows ahead so that their loads overlap. It keeps in registers the window of the last K-1
inputs (x_{t-1}..x_{t-K+1}) and, in the backward, the open sums of the last K-1 dx: at step t,
g_t adds w_s g_t to dx_{t-s}, and dx_{t-K+1} is then complete. So each step reads x_t and dy_t
once, computes a_t and SiLU' once, and writes one row; a program reads K-1 steps before its chunk
(the window) and, in the backward, K-1 steps after it (the last sums). The weight and bias
gradients are per-channel sums over the chunk's steps, kept in registers (one per tap: the taps are
unrolled up to MAX_K) and written once per program to a (K+1, BE) tile of partial sums (rows 0..K-1
dw by tap, row K dbias); a ``sum`` over the programs finishes them (deterministic, no atomics).
"""

from __future__ import annotations

import triton
import triton.language as tl

MAX_K = 4
"""Kernel sizes up to this have kernels (each tap's terms are a register variable of their own; the
block's conv has K = 4, and causal-conv1d's kernels also stop at 4); larger ones use the reference."""
GROUP = tl.constexpr(4)
"""Steps whose rows a program loads before it works through them."""


@triton.jit
def _wide(t):
    """The step t as int64, for offsets (the interpreter runs loops over Python ints)."""
    return t + tl.zeros([], tl.int64)


@triton.jit
def _bcast(t, e):
    """The scalar t as a vector like e, for masks: Triton's interpreter makes (vector & scalar) int32."""
    return t + tl.zeros_like(e)


@triton.jit
def _row(x, s0, t, e, em, T, sxt, sxe, sse, ssk, K: tl.constexpr, HAS_STATE: tl.constexpr):
    """x at the one position t and channels e (BE,), fp32 (x, s0: this batch row's input and initial
    state): positions -(K-1)..-1 read the initial state, the others outside [0, T) are zero."""
    tv = _bcast(t, e)
    v = tl.load(x + _wide(t) * sxt + e * sxe, mask=em & (tv >= 0) & (tv < T), other=0.0).to(tl.float32)
    if HAS_STATE:
        v += tl.load(s0 + e * sse + (t + K - 1) * ssk, mask=em & (tv < 0) & (tv >= 1 - K), other=0.0).to(tl.float32)
    return v


@triton.jit
def _dy_row(dy, t, e, em, sdt, sde):
    """dy at the step t (in [0, T)) and channels e, fp32."""
    return tl.load(dy + _wide(t) * sdt + e * sde, mask=em, other=0.0).to(tl.float32)


@triton.jit
def _since(r, t, T, since, HAS_RESET: tl.constexpr):
    """``since`` at step t from its value at t-1 (r: this batch row's reset mask)."""
    if HAS_RESET:
        start = tl.load(r + t, mask=(t >= 0) & (t < T), other=0) != 0
        since = tl.where(start, 0, since + 1)
    return since


@triton.jit
def _tap(w, e, em, swe, swk, K: tl.constexpr, s: tl.constexpr):
    """w_s at channels e, fp32 (zero when s >= K)."""
    v = tl.zeros_like(e).to(tl.float32)
    if s < K:
        v = tl.load(w + e * swe + (K - 1 - s) * swk, mask=em, other=0.0).to(tl.float32)
    return v


@triton.jit
def _start(x, w, bias, s0, r, t0, e, em, T, sxt, sxe, sse, ssk, swe, swk,
           K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, HAS_RESET: tl.constexpr):  # fmt: skip
    """A program's start at step t0: the taps w0..w3 and bias at its channels, and the window and
    ``since`` after the steps t0-K+1..t0-1."""
    w0, w1, w2, w3 = (_tap(w, e, em, swe, swk, K, 0), _tap(w, e, em, swe, swk, K, 1),
                      _tap(w, e, em, swe, swk, K, 2), _tap(w, e, em, swe, swk, K, 3))  # fmt: skip
    zero = tl.zeros_like(w0)
    bias_e = zero
    if HAS_BIAS:
        bias_e = tl.load(bias + e, mask=em, other=0.0).to(tl.float32)
    x1, x2, x3 = zero, zero, zero
    since = tl.zeros([], tl.int32) + K  # no document start within reach
    for i in tl.static_range(K - 1):
        t = t0 - (K - 1) + i
        since = _since(r, t, T, since, HAS_RESET)
        x3, x2, x1 = x2, x1, _row(x, s0, t, e, em, T, sxt, sxe, sse, ssk, K, HAS_STATE)
    return w0, w1, w2, w3, bias_e, x1, x2, x3, since


@triton.jit
def _ahead(x, s0, r, tb, since, e, em, T, sxt, sxe, sse, ssk, K: tl.constexpr,
           HAS_STATE: tl.constexpr, HAS_RESET: tl.constexpr):  # fmt: skip
    """The GROUP (4) rows of x at tb..tb+3, and ``since`` at each of them."""
    xa = _row(x, s0, tb, e, em, T, sxt, sxe, sse, ssk, K, HAS_STATE)
    xb = _row(x, s0, tb + 1, e, em, T, sxt, sxe, sse, ssk, K, HAS_STATE)
    xc = _row(x, s0, tb + 2, e, em, T, sxt, sxe, sse, ssk, K, HAS_STATE)
    xd = _row(x, s0, tb + 3, e, em, T, sxt, sxe, sse, ssk, K, HAS_STATE)
    sa = _since(r, tb, T, since, HAS_RESET)
    sb = _since(r, tb + 1, T, sa, HAS_RESET)
    sc = _since(r, tb + 2, T, sb, HAS_RESET)
    sd = _since(r, tb + 3, T, sc, HAS_RESET)
    return xa, xb, xc, xd, sa, sb, sc, sd


@triton.jit
def _windowed(xt, since, w0, w1, w2, w3, bias, x1, x2, x3, K: tl.constexpr, HAS_RESET: tl.constexpr):
    """a_t from x_t and the window x1..x3 = x_{t-1}..x_{t-3}; and h1..h3, the window's inputs that
    reach a_t (zero across a document start)."""
    h1, h2, h3 = x1, x2, x3
    if HAS_RESET:
        h1 = tl.where(since >= 1, x1, 0.0)
        h2 = tl.where(since >= 2, x2, 0.0)
        h3 = tl.where(since >= 3, x3, 0.0)
    a = bias + w0 * xt
    if K > 1:
        a += w1 * h1
    if K > 2:
        a += w2 * h2
    if K > 3:
        a += w3 * h3
    return a, h1, h2, h3


# ---- forward ----------------------------------------------------------------------------------------


@triton.jit
def _fwd_step(xt, since, w0, w1, w2, w3, bias, x1, x2, x3, y, e, em,
              K: tl.constexpr, SILU: tl.constexpr, HAS_RESET: tl.constexpr):  # fmt: skip
    """One forward step: y_t to its row y; returns the window shifted by one step."""
    a, h1, h2, h3 = _windowed(xt, since, w0, w1, w2, w3, bias, x1, x2, x3, K, HAS_RESET)
    if SILU:
        a = a * tl.sigmoid(a)
    tl.store(y + e, a.to(y.dtype.element_ty), mask=em)
    return xt, x1, x2


@triton.jit
def _final(sT, v, j: tl.constexpr, since, e, em, K: tl.constexpr, HAS_RESET: tl.constexpr):
    """x_{T-j} (v) to slot K-1-j of the final state, zeroed unless kept (no document starts at
    T-j+1..T-1: since >= j-1 at T-1)."""
    if j < K:
        if HAS_RESET:
            v = tl.where(since >= j - 1, v, 0.0)
        tl.store(sT + e * (K - 1) + (K - 1 - j), v.to(sT.dtype.element_ty), mask=em)


@triton.jit
def conv_fwd_kernel(x, w, bias, s0, r, y, sT, T, E, CT, sxb, sxt, sxe, ssb, sse, ssk, swe, swk,
                    K: tl.constexpr, BE: tl.constexpr, SILU: tl.constexpr, HAS_BIAS: tl.constexpr,
                    HAS_STATE: tl.constexpr, HAS_RESET: tl.constexpr):  # fmt: skip
    """y (B, T, E) contiguous; the programs of the last chunk also write sT (B, E, K-1)."""
    i_e, i_c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    x, s0, r = x + b * sxb, s0 + b * ssb, r + b * T  # this batch row
    y, sT = y + b * T * E, sT + b * E * (K - 1)
    e = i_e * BE + tl.arange(0, BE)
    em = e < E
    t0 = i_c * CT
    t1 = tl.minimum(t0 + CT, T)
    w0, w1, w2, w3, bias_e, x1, x2, x3, since = _start(
        x, w, bias, s0, r, t0, e, em, T, sxt, sxe, sse, ssk, swe, swk, K, HAS_BIAS, HAS_STATE, HAS_RESET)
    grouped = t0 + (t1 - t0) // GROUP * GROUP
    for tb in range(t0, grouped, GROUP):
        xa, xb, xc, xd, sa, sb, sc, sd = _ahead(x, s0, r, tb, since, e, em, T, sxt, sxe, sse, ssk, K,
                                                HAS_STATE, HAS_RESET)  # fmt: skip
        x1, x2, x3 = _fwd_step(xa, sa, w0, w1, w2, w3, bias_e, x1, x2, x3, y + _wide(tb) * E, e, em,
                               K, SILU, HAS_RESET)  # fmt: skip
        x1, x2, x3 = _fwd_step(xb, sb, w0, w1, w2, w3, bias_e, x1, x2, x3, y + _wide(tb + 1) * E, e, em,
                               K, SILU, HAS_RESET)  # fmt: skip
        x1, x2, x3 = _fwd_step(xc, sc, w0, w1, w2, w3, bias_e, x1, x2, x3, y + _wide(tb + 2) * E, e, em,
                               K, SILU, HAS_RESET)  # fmt: skip
        x1, x2, x3 = _fwd_step(xd, sd, w0, w1, w2, w3, bias_e, x1, x2, x3, y + _wide(tb + 3) * E, e, em,
                               K, SILU, HAS_RESET)  # fmt: skip
        since = sd
    for t in range(grouped, t1):  # the steps left over from the groups
        xa = _row(x, s0, t, e, em, T, sxt, sxe, sse, ssk, K, HAS_STATE)
        since = _since(r, t, T, since, HAS_RESET)
        x1, x2, x3 = _fwd_step(xa, since, w0, w1, w2, w3, bias_e, x1, x2, x3, y + _wide(t) * E, e, em,
                               K, SILU, HAS_RESET)  # fmt: skip
    if t1 == T:  # the window is now x_{T-1}..x_{T-3}
        _final(sT, x1, 1, since, e, em, K, HAS_RESET)
        _final(sT, x2, 2, since, e, em, K, HAS_RESET)
        _final(sT, x3, 3, since, e, em, K, HAS_RESET)


# ---- backward ---------------------------------------------------------------------------------------


@triton.jit
def _store_dx(dx, ds0, v, p, t0, t1, e, em, E, K: tl.constexpr, HAS_STATE: tl.constexpr):
    """dx_p (BE,) to this batch row's dx when p is this program's (in [t0, t1)), to its initial
    state's gradient when p < 0 (only the first chunk's programs reach there)."""
    pv = _bcast(p, e)
    tl.store(dx + _wide(p) * E + e, v.to(dx.dtype.element_ty), mask=em & (pv >= t0) & (pv < t1))
    if HAS_STATE:
        tl.store(ds0 + e * (K - 1) + (p + K - 1), v, mask=em & (pv < 0) & (pv >= 1 - K))


@triton.jit
def _bwd_step(xt, dyt, t, t0, t1, since, w0, w1, w2, w3, bias, x1, x2, x3, p1, p2, p3, a0, a1, a2, a3, ab,
              dx, ds0, e, em, E, K: tl.constexpr, SILU: tl.constexpr, HAS_STATE: tl.constexpr,
              HAS_RESET: tl.constexpr):  # fmt: skip
    """One backward step t, from x_t, dy_t, the window and the open sums p1..p3 of dx_{t-1}..dx_{t-3}:
    g_t once; its terms w_s g_t to dx_{t-s} (where since >= s); for t in [t0, t1), its terms to the
    weight and bias sums a0..a3 (x_{t-s} g_t) and ab. dx_{t-K+1} is then complete and is stored.
    Returns the window and open sums shifted by one step, and the sums."""
    a, h1, h2, h3 = _windowed(xt, since, w0, w1, w2, w3, bias, x1, x2, x3, K, HAS_RESET)
    g = dyt
    if SILU:
        sg = tl.sigmoid(a)
        g = dyt * sg * (1.0 + a * (1.0 - sg))
    go = tl.where(t < t1, g, 0.0)
    a0 += xt * go
    a1 += h1 * go
    a2 += h2 * go
    a3 += h3 * go
    ab += go
    g1, g2, g3 = w1 * g, w2 * g, w3 * g
    if HAS_RESET:
        g1 = tl.where(since >= 1, g1, 0.0)
        g2 = tl.where(since >= 2, g2, 0.0)
        g3 = tl.where(since >= 3, g3, 0.0)
    done = w0 * g  # K == 1: dx_t is complete now
    if K == 2:
        done = p1 + g1
        p1 = w0 * g
    if K == 3:
        done = p2 + g2
        p2 = p1 + g1
        p1 = w0 * g
    if K == 4:
        done = p3 + g3
        p3 = p2 + g2
        p2 = p1 + g1
        p1 = w0 * g
    _store_dx(dx, ds0, done, t - (K - 1), t0, t1, e, em, E, K, HAS_STATE)
    return xt, x1, x2, p1, p2, p3, a0, a1, a2, a3, ab


@triton.jit
def _flush(dsT, v, j: tl.constexpr, since, t0, t1, dx, ds0, e, em, T, E, sfe, sfk,
           K: tl.constexpr, HAS_STATE: tl.constexpr, HAS_RESET: tl.constexpr, HAS_DST: tl.constexpr):  # fmt: skip
    """After step T-1, the open sum v of dx_p, p = T-j, is complete but for the final state's
    gradient, which joins it where the final state kept x_p (since >= j-1 at T-1); then it is stored."""
    if j < K:
        p = T - j + tl.zeros([], tl.int32)
        if HAS_DST:
            kept = em & (_bcast(p, e) >= 1 - K)
            if HAS_RESET:
                kept = kept & (_bcast(since, e) >= j - 1)
            v += tl.load(dsT + e * sfe + (K - 1 - j) * sfk, mask=kept, other=0.0).to(tl.float32)
        _store_dx(dx, ds0, v, p, t0, t1, e, em, E, K, HAS_STATE)


@triton.jit
def _store_sum(rows, e, em, v, E, K: tl.constexpr, s: tl.constexpr):
    """The weight gradient v of w_s to its row (tap K-1-s) of rows (K+1, E), when s < K."""
    if s < K:
        tl.store(rows + (K - 1 - s) * E + e, v, mask=em)


@triton.jit
def conv_bwd_kernel(x, w, bias, s0, r, dy, dsT, dx, ds0, part, T, E, CT, sxb, sxt, sxe, ssb, sse, ssk, swe, swk,
                    sdb, sdt, sde, sfb, sfe, sfk, K: tl.constexpr, BE: tl.constexpr, SILU: tl.constexpr,
                    HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr, HAS_RESET: tl.constexpr,
                    HAS_DST: tl.constexpr):  # fmt: skip
    """dx (B, T, E) and ds0 (B, E, K-1), contiguous; part (B * chunks, K+1, E) gets this program's
    sums of the weight gradient (rows 0..K-1, one per tap) and the bias gradient (row K). The steps
    run to K-1 past the chunk (at most to T-1), for the terms g_{t1}..g_{t1+K-2} add to its last dx."""
    i_e, i_c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    x, s0, r, dy, dsT = x + b * sxb, s0 + b * ssb, r + b * T, dy + b * sdb, dsT + b * sfb  # this batch row
    dx, ds0 = dx + b * T * E, ds0 + b * E * (K - 1)
    e = i_e * BE + tl.arange(0, BE)
    em = e < E
    t0 = i_c * CT
    t1 = tl.minimum(t0 + CT, T)
    t_end = tl.minimum(t1 + K - 1, T)
    w0, w1, w2, w3, bias_e, x1, x2, x3, since = _start(
        x, w, bias, s0, r, t0, e, em, T, sxt, sxe, sse, ssk, swe, swk, K, HAS_BIAS, HAS_STATE, HAS_RESET)
    zero = tl.zeros_like(w0)
    p1, p2, p3, a0, a1, a2, a3, ab = zero, zero, zero, zero, zero, zero, zero, zero
    grouped = t0 + (t_end - t0) // GROUP * GROUP
    for tb in range(t0, grouped, GROUP):
        xa, xb, xc, xd, sa, sb, sc, sd = _ahead(x, s0, r, tb, since, e, em, T, sxt, sxe, sse, ssk, K,
                                                HAS_STATE, HAS_RESET)  # fmt: skip
        ga, gb, gc, gd = (_dy_row(dy, tb, e, em, sdt, sde), _dy_row(dy, tb + 1, e, em, sdt, sde),
                          _dy_row(dy, tb + 2, e, em, sdt, sde), _dy_row(dy, tb + 3, e, em, sdt, sde))  # fmt: skip
        x1, x2, x3, p1, p2, p3, a0, a1, a2, a3, ab = _bwd_step(
            xa, ga, tb, t0, t1, sa, w0, w1, w2, w3, bias_e, x1, x2, x3, p1, p2, p3, a0, a1, a2, a3, ab,
            dx, ds0, e, em, E, K, SILU, HAS_STATE, HAS_RESET)  # fmt: skip
        x1, x2, x3, p1, p2, p3, a0, a1, a2, a3, ab = _bwd_step(
            xb, gb, tb + 1, t0, t1, sb, w0, w1, w2, w3, bias_e, x1, x2, x3, p1, p2, p3, a0, a1, a2, a3, ab,
            dx, ds0, e, em, E, K, SILU, HAS_STATE, HAS_RESET)  # fmt: skip
        x1, x2, x3, p1, p2, p3, a0, a1, a2, a3, ab = _bwd_step(
            xc, gc, tb + 2, t0, t1, sc, w0, w1, w2, w3, bias_e, x1, x2, x3, p1, p2, p3, a0, a1, a2, a3, ab,
            dx, ds0, e, em, E, K, SILU, HAS_STATE, HAS_RESET)  # fmt: skip
        x1, x2, x3, p1, p2, p3, a0, a1, a2, a3, ab = _bwd_step(
            xd, gd, tb + 3, t0, t1, sd, w0, w1, w2, w3, bias_e, x1, x2, x3, p1, p2, p3, a0, a1, a2, a3, ab,
            dx, ds0, e, em, E, K, SILU, HAS_STATE, HAS_RESET)  # fmt: skip
        since = sd
    for t in range(grouped, t_end):  # the steps left over from the groups
        xa = _row(x, s0, t, e, em, T, sxt, sxe, sse, ssk, K, HAS_STATE)
        ga = _dy_row(dy, t, e, em, sdt, sde)
        since = _since(r, t, T, since, HAS_RESET)
        x1, x2, x3, p1, p2, p3, a0, a1, a2, a3, ab = _bwd_step(
            xa, ga, t, t0, t1, since, w0, w1, w2, w3, bias_e, x1, x2, x3, p1, p2, p3, a0, a1, a2, a3, ab,
            dx, ds0, e, em, E, K, SILU, HAS_STATE, HAS_RESET)  # fmt: skip
    if t_end == T:  # the open sums hold dx_{T-1}..dx_{T-3}
        _flush(dsT, p1, 1, since, t0, t1, dx, ds0, e, em, T, E, sfe, sfk, K, HAS_STATE, HAS_RESET, HAS_DST)
        _flush(dsT, p2, 2, since, t0, t1, dx, ds0, e, em, T, E, sfe, sfk, K, HAS_STATE, HAS_RESET, HAS_DST)
        _flush(dsT, p3, 3, since, t0, t1, dx, ds0, e, em, T, E, sfe, sfk, K, HAS_STATE, HAS_RESET, HAS_DST)
    rows = part + (b * tl.num_programs(1) + i_c) * (K + 1) * E  # this program's (K+1, E) rows
    _store_sum(rows, e, em, a0, E, K, 0)
    _store_sum(rows, e, em, a1, E, K, 1)
    _store_sum(rows, e, em, a2, E, K, 2)
    _store_sum(rows, e, em, a3, E, K, 3)
    tl.store(rows + K * E + e, ab, mask=em)
