"""Triton kernels of the causal depthwise conv (see :mod:`.conv` for the formula).

Imported only by :mod:`.conv_triton`, when the Triton backend runs, so the trainer runs without Triton.

Every program works on a tile of BT steps and BE channels (x's last, unit-stride dimension) of one
batch row. The input at position p reaches the outputs p..p+K-1; it reaches q = p + s when no
document starts at p+1..q, so both passes build their masks from K shifted loads of ``reset``.
Positions -(K-1)..-1 read the initial state.

    forward   a_q = bias + sum_s w[K-1-s] x_{q-s},  y_q = SiLU(a_q); the last tile writes the final state.
    backward  pass 1: g_q = dy_q SiLU'(a_q) with a_q recomputed, written in fp32;
                      dw[K-1-s] = sum_q x_{q-s} g_q,  dbias = sum_q g_q;
              pass 2: dx_p = sum_s w[K-1-s] g_{p+s} (+ d final state).

The K shifted loads of x (and of g in pass 2) are served from L1/L2, so each pass reads its inputs
about once from memory. Pass 1 loops over the tiles of a chunk of CT steps and keeps the weight and
bias sums elementwise in registers, reducing over steps once per chunk into one (K+1, BE) row of fp32
partial sums; a ``sum`` over the programs finishes the reduction (deterministic, no atomics). The
fp32 g costs one write and one read of B x T x E floats; it saves recomputing a at K shifts for
every input.
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
        if HAS_RESET and s > 0:
            seen = seen & _no_reset(r, q - s + 1, T)
        xs = _x_at(x, s0, q - s, e, T, E, sxt, sxe, sse, ssk, K, HAS_STATE)
        if HAS_RESET:
            xs = tl.where(seen[:, None], xs, 0.0)
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
        out = sT + (b * E + e[None, :]) * (K - 1) + i[:, None]
        tl.store(out, v.to(sT.dtype.element_ty), mask=(i < K - 1)[:, None] & em)


@triton.jit
def conv_bwd_gate_kernel(x, w, bias, s0, r, dy, g, part, T, E, CT, sxb, sxt, sxe, ssb, sse, ssk, swe, swk,
                         sdb, sdt, sde, K: tl.constexpr, KP: tl.constexpr, KP2: tl.constexpr, BT: tl.constexpr,
                         BE: tl.constexpr, SILU: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_STATE: tl.constexpr,
                         HAS_RESET: tl.constexpr):  # fmt: skip
    """Backward, pass 1, over one chunk of CT steps: g = dy SiLU'(a) (B, T, E) in fp32, and into part
    (B * chunks, K+1, E) this program's sums of the weight gradient (rows 0..K-1, one per tap) and of
    the bias gradient (row K). The sums over steps stay elementwise in registers until the chunk ends."""
    i_e, i_c, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    x, s0, r, dy, g = x + b * sxb, s0 + b * ssb, r + b * T, dy + b * sdb, g + b * T * E  # this batch row
    e = i_e * BE + tl.arange(0, BE)
    em = (e < E)[None, :]
    rows = tl.arange(0, KP2)[:, None, None]
    acc = tl.zeros([KP2, BT, BE], tl.float32)  # acc[j] sums x_{q-(K-1-j)} g_q over the chunk's q
    gsum = tl.zeros([BT, BE], tl.float32)
    for t0 in range(i_c * CT, tl.minimum(i_c * CT + CT, T), BT):
        q = t0 + tl.arange(0, BT)
        qm = (q < T)[:, None] & em
        gq = tl.load(dy + q[:, None].to(tl.int64) * sdt + e[None, :] * sde, mask=qm, other=0.0).to(tl.float32)
        if SILU:
            a = _preact(x, w, bias, s0, r, q, e, T, E, sxt, sxe, sse, ssk, swe, swk,
                        BT, BE, K, HAS_BIAS, HAS_STATE, HAS_RESET)  # fmt: skip
            sg = tl.sigmoid(a)
            gq = gq * sg * (1.0 + a * (1.0 - sg))
        tl.store(g + q[:, None].to(tl.int64) * E + e[None, :], gq, mask=qm)
        gsum += gq
        seen = tl.full([BT], 1, tl.int1)  # no document starts at q-s+1..q
        for s in tl.static_range(K):
            if HAS_RESET and s > 0:
                seen = seen & _no_reset(r, q - s + 1, T)
            xs = _x_at(x, s0, q - s, e, T, E, sxt, sxe, sse, ssk, K, HAS_STATE)
            if HAS_RESET:
                xs = tl.where(seen[:, None], xs, 0.0)
            acc = tl.where(rows == K - 1 - s, acc + (xs * gq)[None, :, :], acc)
    row0 = part + (b * tl.num_programs(1) + i_c) * (K + 1) * E
    tl.store(row0 + tl.arange(0, KP2)[:, None] * E + e[None, :], tl.sum(acc, 1),
             mask=(tl.arange(0, KP2)[:, None] < K) & em)  # fmt: skip
    tl.store(row0 + K * E + e, tl.sum(gsum, 0), mask=e < E)


@triton.jit
def _dx_at(w, r, g, dsT, p, e, T, E, swe, swk, sfe, sfk, N: tl.constexpr, BE: tl.constexpr, K: tl.constexpr,
           HAS_RESET: tl.constexpr, HAS_DST: tl.constexpr):  # fmt: skip
    """The gradient (N, BE) of the inputs at positions p (N,) of one batch row, from g (that row's)
    at p..p+K-1 and the final state's gradient dsT."""
    em = (e < E)[None, :]
    dxp = tl.zeros([N, BE], tl.float32)
    seen = tl.full([N], 1, tl.int1)  # no document starts at p+1..q
    for s in tl.static_range(K):
        q = p + s
        if HAS_RESET and s > 0:
            seen = seen & _no_reset(r, q, T)
        qm = (q >= 0) & (q < T)
        if HAS_RESET:
            qm = qm & seen
        gq = tl.load(g + q[:, None].to(tl.int64) * E + e[None, :], mask=qm[:, None] & em, other=0.0)
        tap = tl.load(w + e * swe + (K - 1 - s) * swk, mask=e < E, other=0.0).to(tl.float32)
        dxp += tap[None, :] * gq
    if HAS_DST:
        idx = p - (T - (K - 1))
        hit = (idx >= 0) & (idx < K - 1)
        if HAS_RESET:
            hit = hit & _kept(r, p, T, N, K)
        dxp += tl.load(dsT + e[None, :] * sfe + idx[:, None] * sfk, mask=hit[:, None] & em,
                       other=0.0).to(tl.float32)  # fmt: skip
    return dxp


@triton.jit
def conv_bwd_input_kernel(w, r, g, dsT, dx, ds0, T, E, swe, swk, sfb, sfe, sfk, K: tl.constexpr,
                          KP: tl.constexpr, BT: tl.constexpr, BE: tl.constexpr, HAS_STATE: tl.constexpr,
                          HAS_RESET: tl.constexpr, HAS_DST: tl.constexpr):  # fmt: skip
    """Backward, pass 2: dx (B, T, E) from g; the program of the first tile also writes ds0 (B, E, K-1)."""
    i_t, i_e, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    r, g, dsT = r + b * T, g + b * T * E, dsT + b * sfb  # this batch row
    e = i_e * BE + tl.arange(0, BE)
    em = (e < E)[None, :]
    p = i_t * BT + tl.arange(0, BT)
    dxp = _dx_at(w, r, g, dsT, p, e, T, E, swe, swk, sfe, sfk, BT, BE, K, HAS_RESET, HAS_DST)
    tl.store(dx + (b * T + p[:, None]) * E + e[None, :], dxp.to(dx.dtype.element_ty), mask=(p < T)[:, None] & em)
    if HAS_STATE:
        if i_t == 0:
            i = tl.arange(0, KP)
            d = _dx_at(w, r, g, dsT, i - (K - 1), e, T, E, swe, swk, sfe, sfk, KP, BE, K, HAS_RESET, HAS_DST)
            tl.store(ds0 + (b * E + e[None, :]) * (K - 1) + i[:, None], d, mask=(i < K - 1)[:, None] & em)
