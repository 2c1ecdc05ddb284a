"""Triton kernels of the chunked linear-attention scan (GLA, RetNet, RWKV-6).

Imported only by :mod:`longhorn_zoo.plugins.linear_attention.triton_chunk`, and only when Triton
is used, so that the trainer runs without Triton. Tiles are read and written through plain
pointers with boundary masks (no block pointers, which Triton 3.9 removed), so the kernels run
on every Triton from 3.6 on.

Split the sequence into chunks of BT steps. Inside a chunk let b_t be the running
sum of the log decay g (per key, or per head when the decay is one number a head),
bC = b_{BT-1} its total, and h the state entering the chunk. Then

    o_t  = scale * ( (q_t * exp(bq_t)) h + sum_{s<t} (q_t . k_s exp(bq_t - b_s)) v_s + (q_t . w k_t) v_t )
    h'   = exp(bC) h + sum_s (k_s exp(bC - b_s)) v_s^T

with bq = b, w = 1 for GLA and RetNet, and bq_t = b_{t-1}, w = u (the bonus) for
RWKV-6. Every exponent there but the pair weights' is <= 0. The pair weights
exp(bq_t - b_s) are split around a reference row r in the middle of the chunk,
(q exp(bq - r)) (k exp(r - b))^T, so that one matrix product gives them all (a
per-head decay is a (BT, 1) column that broadcasts over the keys). That is exact
while the factors' exponents stay within +-EXP_LIMIT. So each per-chunk kernel runs
twice: with EXACT=False it factors every chunk and sets flags[batch * head, chunk]
where some exponent passes the bound; with EXACT=True it redoes only the flagged
chunks (the others return at once), forming every pair weight exp(bq_t - b_s) <= 1
directly, one key column s at a time (see _exact_scores). A reset
at t kills every pair (s, t') with s < t <= t' and the state entering the chunk for
t' >= t: the kernels mask by segment ids, the running count of resets inside the chunk.

Kernels, each over (batch * head) and blocks of the key and value dimensions:
    _fwd_state / _bwd_state: the sequential pass over chunks, storing the state
        entering every chunk (forward) or the gradient of the state leaving it;
    _fwd_output: the output of each chunk, in parallel over chunks;
    _bwd_chunk: dq, dk, dv, d log_decay and the bonus gradient of each chunk.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile(x, i_b, i_h, i_t, i_c, T, H, C, BT: tl.constexpr, BC: tl.constexpr):
    """Pointers to x[i_b, chunk i_t, i_h, block i_c] of a (B, T, H, C) tensor, and the mask of those inside it."""
    rows = tl.arange(0, BT)
    cols = i_c * BC + tl.arange(0, BC)
    base = x + ((i_b.to(tl.int64) * T + i_t * BT) * H + i_h) * C
    mask = (i_t * BT + rows < T)[:, None] & (cols < C)[None, :]
    return base + (rows * (H * C))[:, None] + cols[None, :], mask


@triton.jit
def _load_tile(x, i_b, i_h, i_t, i_c, T, H, C, BT: tl.constexpr, BC: tl.constexpr):
    """Tile (BT, BC) of x (see _tile), zero outside the tensor."""
    p, m = _tile(x, i_b, i_h, i_t, i_c, T, H, C, BT, BC)
    return tl.load(p, mask=m, other=0.0)


@triton.jit
def _store_tile(x, value, i_b, i_h, i_t, i_c, T, H, C, BT: tl.constexpr, BC: tl.constexpr):
    """Store the parts of value (BT, BC) that fall inside x (see _tile), in x's dtype."""
    p, m = _tile(x, i_b, i_h, i_t, i_c, T, H, C, BT, BC)
    tl.store(p, value.to(x.dtype.element_ty), mask=m)


@triton.jit
def _state(h, i_s, i_k, i_v, K, V, BK: tl.constexpr, BV: tl.constexpr):
    """Pointers to block (i_k, i_v) of the i_s-th (K, V) state of h, and the mask of those inside it."""
    rk = i_k * BK + tl.arange(0, BK)
    cv = i_v * BV + tl.arange(0, BV)
    return h + i_s.to(tl.int64) * K * V + rk[:, None] * V + cv[None, :], (rk < K)[:, None] & (cv < V)[None, :]


@triton.jit
def _load_state(h, i_s, i_k, i_v, K, V, BK: tl.constexpr, BV: tl.constexpr):
    """State block (BK, BV) (see _state), zero outside the state."""
    p, m = _state(h, i_s, i_k, i_v, K, V, BK, BV)
    return tl.load(p, mask=m, other=0.0)


@triton.jit
def _store_state(h, value, i_s, i_k, i_v, K, V, BK: tl.constexpr, BV: tl.constexpr):
    """Store the parts of value (BK, BV) that fall inside the state (see _state), in h's dtype."""
    p, m = _state(h, i_s, i_k, i_v, K, V, BK, BV)
    tl.store(p, value.to(h.dtype.element_ty), mask=m)


@triton.jit
def _decays(
    g, i_b, i_h, i_t, i_k, T, H, K, BT: tl.constexpr, BK: tl.constexpr, PER_KEY: tl.constexpr, EXCL: tl.constexpr
):
    """Chunk i_t's running log decay b, its query-side version bq and its total bC.

    Per key: b, bq are (BT, BK) and bC is (BK,). Per head: b, bq are (BT, 1) and bC is (1,),
    which broadcast the same way, so the kernels need no second code path. Steps past T
    decay by nothing.
    """
    if PER_KEY:
        gt = _load_tile(g, i_b, i_h, i_t, i_k, T, H, K, BT, BK).to(tl.float32)
        b = tl.cumsum(gt, axis=0)
        bC = tl.sum(gt, axis=0)
        if EXCL:
            bq = b - gt
        else:
            bq = b
    else:
        gam = tl.load(g + i_h).to(tl.float32)
        n = tl.minimum(T - i_t * BT, BT)
        b = (tl.minimum(tl.arange(0, BT) + 1, n).to(tl.float32) * gam)[:, None]
        bC = tl.full([1], 0.0, tl.float32) + n.to(tl.float32) * gam
        if EXCL:
            bq = b - gam
        else:
            bq = b
    return b, bq, bC


@triton.jit
def _segments(reset, i_b, i_t, T, BT: tl.constexpr, HAS_RESET: tl.constexpr):
    """Resets seen so far inside chunk i_t at each step (inclusive), and in the whole chunk."""
    t = i_t * BT + tl.arange(0, BT)
    if HAS_RESET:
        r = tl.load(reset + i_b.to(tl.int64) * T + t, mask=t < T, other=0).to(tl.int32)
    else:
        r = tl.zeros([BT], dtype=tl.int32)
    return tl.cumsum(r, axis=0), tl.sum(r, axis=0)


@triton.jit
def _pair_exponents(b, bq, BT: tl.constexpr):
    """The exponents bq - r and r - b of the factored pair weights (r: row BT // 2 of b), and the
    largest of their magnitudes (the factors are exact while it is at most EXP_LIMIT)."""
    r = tl.sum(tl.where((tl.arange(0, BT) == BT // 2)[:, None], b, 0.0), axis=0)[None, :]
    eq, ek = bq - r, r - b
    return eq, ek, tl.max(tl.max(tl.maximum(tl.abs(eq), tl.abs(ek)), axis=1), axis=0)


@triton.jit
def _pair_scores(qt, kt, b, bq, BT: tl.constexpr, PREC: tl.constexpr):
    """This key block's share of A[t, s] = sum_k q_tk k_sk exp(bq_tk - b_sk) as one matrix product of
    the factors, (BT, BT) fp32, right for s < t; and the largest factor exponent (see _pair_exponents)."""
    eq, ek, top = _pair_exponents(b, bq, BT)
    qi, ki = (qt.to(tl.float32) * tl.exp(eq)).to(qt.dtype), (kt.to(tl.float32) * tl.exp(ek)).to(kt.dtype)
    return tl.dot(qi, tl.trans(ki), input_precision=PREC), top


@triton.jit
def _column(kf, b, bq, rows, s):
    """Key s of kf (BT, BK) as (BK,), and exp(bq_t - b_s) for every t > s (zero for t <= s), (BT, BK)
    or (BT, 1): every exponent is <= 0. ``rows`` is arange(BT)."""
    at_s = (rows == s)[:, None]
    b_s = tl.sum(tl.where(at_s, b, 0.0), axis=0)
    weights = tl.exp(tl.where((rows > s)[:, None], bq - b_s[None, :], float("-inf")))
    return tl.sum(tl.where(at_s, kf, 0.0), axis=0), weights


@triton.jit
def _exact_scores(
    q, k, g, i_b, i_h, i_t, T, H, K, BT: tl.constexpr, BK: tl.constexpr, PER_KEY: tl.constexpr, BONUS: tl.constexpr
):
    """A of chunk i_t over all key blocks, as _pair_scores sums it, but one key column s at a time:
    every pair weight exp(bq_t - b_s) <= 1 is formed directly, whatever the decay."""
    rows = tl.arange(0, BT)
    A = tl.zeros([BT, BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        qf = _load_tile(q, i_b, i_h, i_t, i_k, T, H, K, BT, BK).to(tl.float32)
        kf = _load_tile(k, i_b, i_h, i_t, i_k, T, H, K, BT, BK).to(tl.float32)
        b, bq, bC = _decays(g, i_b, i_h, i_t, i_k, T, H, K, BT, BK, PER_KEY, BONUS)
        for s in range(BT):
            k_s, w = _column(kf, b, bq, rows, s)
            A += tl.where((rows == s)[None, :], tl.sum(qf * k_s[None, :] * w, axis=1)[:, None], 0.0)
    return A


@triton.jit
def _pair_grads(dA, qt, kt, b, bq, BT: tl.constexpr, PREC: tl.constexpr, EXACT: tl.constexpr):
    """Through the pair weights, dq_t = sum_s dA[t, s] k_s exp(bq_t - b_s), dk_s = sum_t dA[t, s] q_t exp(bq_t - b_s).

    dA (BT, BT) is zero outside s < t. Factored as in _pair_scores, or, with EXACT, one
    column s at a time as in _exact_scores.
    """
    qf, kf = qt.to(tl.float32), kt.to(tl.float32)
    if EXACT:
        rows = tl.arange(0, BT)
        dq = tl.zeros(qf.shape, dtype=tl.float32)
        dk = tl.zeros(kf.shape, dtype=tl.float32)
        for s in range(BT):
            k_s, w = _column(kf, b, bq, rows, s)
            da = tl.sum(tl.where((rows == s)[None, :], dA, 0.0), axis=1)[:, None]  # dA[:, s]
            dq += da * k_s[None, :] * w
            dk += tl.where((rows == s)[:, None], tl.sum(da * qf * w, axis=0)[None, :], 0.0)
    else:
        eq, ek, top = _pair_exponents(b, bq, BT)
        qi, ki = (qf * tl.exp(eq)).to(qt.dtype), (kf * tl.exp(ek)).to(kt.dtype)
        dq = tl.dot(dA.to(kt.dtype), ki, input_precision=PREC) * tl.exp(eq)
        dk = tl.dot(tl.trans(dA.to(qt.dtype)), qi, input_precision=PREC) * tl.exp(ek)
    return dq, dk


@triton.jit
def _pair_mask(seg, BT: tl.constexpr):
    """Pairs (t, s) with s < t in the same segment."""
    t = tl.arange(0, BT)
    return (t[None, :] < t[:, None]) & (seg[:, None] == seg[None, :])


@triton.jit
def _fwd_state(
    k,
    v,
    g,
    reset,
    h0,
    h,
    ht,
    T,
    H,
    K,
    V,
    NC,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    PER_KEY: tl.constexpr,
    HAS_H0: tl.constexpr,
    HAS_RESET: tl.constexpr,
    PREC: tl.constexpr,
):
    """h[n] = state entering chunk n; ht = state after the last chunk (fp32)."""
    i_kv, i_bh = tl.program_id(0), tl.program_id(1)
    NV = tl.cdiv(V, BV)
    i_k, i_v = i_kv // NV, i_kv % NV
    i_b, i_h = i_bh // H, i_bh % H
    if HAS_H0:
        state = _load_state(h0, i_bh, i_k, i_v, K, V, BK, BV).to(tl.float32)
    else:
        state = tl.zeros([BK, BV], dtype=tl.float32)
    for n in range(NC):
        _store_state(h, state, i_bh * NC + n, i_k, i_v, K, V, BK, BV)
        kt = _load_tile(k, i_b, i_h, n, i_k, T, H, K, BT, BK)
        vt = _load_tile(v, i_b, i_h, n, i_v, T, H, V, BT, BV)
        b, bq, bC = _decays(g, i_b, i_h, n, i_k, T, H, K, BT, BK, PER_KEY, False)
        seg, last = _segments(reset, i_b, n, T, BT, HAS_RESET)
        kd = tl.where((seg == last)[:, None], kt * tl.exp(bC[None, :] - b), 0.0)
        dec = tl.where(last == 0, tl.exp(bC)[:, None], 0.0)
        state = state * dec + tl.dot(tl.trans(kd.to(vt.dtype)), vt, input_precision=PREC)
    _store_state(ht, state, i_bh, i_k, i_v, K, V, BK, BV)


@triton.jit
def _fwd_output(
    q,
    k,
    v,
    g,
    u,
    reset,
    h,
    o,
    flags,
    scale,
    T,
    H,
    K,
    V,
    NC,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    PER_KEY: tl.constexpr,
    BONUS: tl.constexpr,
    HAS_RESET: tl.constexpr,
    PREC: tl.constexpr,
    EXP_LIMIT: tl.constexpr,
    EXACT: tl.constexpr,
):
    """o for value block i_v of chunk i_t (flags and EXACT: see the module docstring)."""
    scale = tl.full([], scale, tl.float32)  # fp32 even where Inductor passes the Python float as fp64
    i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    if EXACT:
        if tl.load(flags + i_bh * NC + i_t) == 0:
            return
    seg, last = _segments(reset, i_b, i_t, T, BT, HAS_RESET)
    mask = _pair_mask(seg, BT)
    A = tl.zeros([BT, BT], dtype=tl.float32)
    top = tl.full([], 0.0, tl.float32)  # the largest factor exponent of the chunk
    oi = tl.zeros([BT, BV], dtype=tl.float32)
    d = tl.zeros([BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        qt = _load_tile(q, i_b, i_h, i_t, i_k, T, H, K, BT, BK)
        kt = _load_tile(k, i_b, i_h, i_t, i_k, T, H, K, BT, BK)
        ht = _load_state(h, i_bh * NC + i_t, i_k, i_v, K, V, BK, BV)
        b, bq, bC = _decays(g, i_b, i_h, i_t, i_k, T, H, K, BT, BK, PER_KEY, BONUS)
        qf, kf = qt.to(tl.float32), kt.to(tl.float32)
        if not EXACT:
            a, top_k = _pair_scores(qt, kt, b, bq, BT, PREC)
            A, top = A + a, tl.maximum(top, top_k)
        oi += tl.dot((qf * tl.exp(bq)).to(qt.dtype), ht.to(qt.dtype), input_precision=PREC)
        if BONUS:
            offs = i_k * BK + tl.arange(0, BK)
            w = tl.load(u + i_h * K + offs, mask=offs < K, other=0.0).to(tl.float32)
            d += tl.sum(qf * kf * w[None, :], axis=1)
        else:
            d += tl.sum(qf * kf, axis=1)
    if EXACT:
        A = _exact_scores(q, k, g, i_b, i_h, i_t, T, H, K, BT, BK, PER_KEY, BONUS)
    else:
        tl.store(flags + i_bh * NC + i_t, (top > EXP_LIMIT).to(tl.uint8))
    A = tl.where(mask, A, 0.0)
    oi = tl.where((seg == 0)[:, None], oi, 0.0)
    vt = _load_tile(v, i_b, i_h, i_t, i_v, T, H, V, BT, BV)
    out = oi + tl.dot(A.to(vt.dtype), vt, input_precision=PREC) + d[:, None] * vt.to(tl.float32)
    _store_tile(o, scale * out, i_b, i_h, i_t, i_v, T, H, V, BT, BV)


@triton.jit
def _bwd_state(
    q,
    g,
    reset,
    do,
    dht,
    dh,
    dh0,
    scale,
    T,
    H,
    K,
    V,
    NC,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    PER_KEY: tl.constexpr,
    EXCL: tl.constexpr,
    HAS_DHT: tl.constexpr,
    PREC: tl.constexpr,
    HAS_RESET: tl.constexpr,
):
    """dh[n] = gradient of the state leaving chunk n; dh0 = gradient of the initial state (fp32)."""
    scale = tl.full([], scale, tl.float32)  # fp32 even where Inductor passes the Python float as fp64
    i_kv, i_bh = tl.program_id(0), tl.program_id(1)
    NV = tl.cdiv(V, BV)
    i_k, i_v = i_kv // NV, i_kv % NV
    i_b, i_h = i_bh // H, i_bh % H
    if HAS_DHT:
        dstate = _load_state(dht, i_bh, i_k, i_v, K, V, BK, BV).to(tl.float32)
    else:
        dstate = tl.zeros([BK, BV], dtype=tl.float32)
    for j in range(NC):
        n = NC - 1 - j
        _store_state(dh, dstate, i_bh * NC + n, i_k, i_v, K, V, BK, BV)
        qt = _load_tile(q, i_b, i_h, n, i_k, T, H, K, BT, BK)
        dot_ = _load_tile(do, i_b, i_h, n, i_v, T, H, V, BT, BV)
        b, bq, bC = _decays(g, i_b, i_h, n, i_k, T, H, K, BT, BK, PER_KEY, EXCL)
        seg, last = _segments(reset, i_b, n, T, BT, HAS_RESET)
        qd = tl.where((seg == 0)[:, None], qt * tl.exp(bq), 0.0)
        dec = tl.where(last == 0, tl.exp(bC)[:, None], 0.0)
        dstate = dstate * dec + scale * tl.dot(tl.trans(qd.to(dot_.dtype)), dot_, input_precision=PREC)
    _store_state(dh0, dstate, i_bh, i_k, i_v, K, V, BK, BV)


@triton.jit
def _bwd_chunk(
    q,
    k,
    v,
    g,
    u,
    reset,
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
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    PER_KEY: tl.constexpr,
    BONUS: tl.constexpr,
    HAS_RESET: tl.constexpr,
    PREC: tl.constexpr,
    EXP_LIMIT: tl.constexpr,
    EXACT: tl.constexpr,
):
    """dq, dk, dv, dg of chunk i_t; du[i_b, i_t, i_h] (bonus) or dg[i_b, i_t, i_h] (per-head decay) as partial sums
    (flags and EXACT: see the module docstring).

    With P = scale * do, dA = P v^T and the decayed parts dq~, dk~ of dq, dk (everything
    but the w-diagonal), the log decay gets db_s = -k_s dk~_s from the key side, dbq_t =
    q_t dq~_t from the query side and dbC = sum_v h' dh' from the chunk total; dg is
    their reverse running sum (bq_t = b_{t-1} shifts the query side by one step).
    """
    scale = tl.full([], scale, tl.float32)  # fp32 even where Inductor passes the Python float as fp64
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    i_s = i_bh * NC + i_t
    if EXACT:
        if tl.load(flags + i_s) == 0:
            return
    seg, last = _segments(reset, i_b, i_t, T, BT, HAS_RESET)
    mask = _pair_mask(seg, BT)
    live = seg == last
    rows = tl.arange(0, BT)
    eye = rows[:, None] == rows[None, :]
    NK, NV = tl.cdiv(K, BK), tl.cdiv(V, BV)
    # the pair weights A and the w-diagonal d
    A = tl.zeros([BT, BT], dtype=tl.float32)
    top = tl.full([], 0.0, tl.float32)  # the largest factor exponent of the chunk
    d = tl.zeros([BT], dtype=tl.float32)
    for i_k in range(NK):
        qt = _load_tile(q, i_b, i_h, i_t, i_k, T, H, K, BT, BK)
        kt = _load_tile(k, i_b, i_h, i_t, i_k, T, H, K, BT, BK)
        qf, kf = qt.to(tl.float32), kt.to(tl.float32)
        b, bq, bC = _decays(g, i_b, i_h, i_t, i_k, T, H, K, BT, BK, PER_KEY, BONUS)
        if not EXACT:
            a, top_k = _pair_scores(qt, kt, b, bq, BT, PREC)
            A, top = A + a, tl.maximum(top, top_k)
        if BONUS:
            offs = i_k * BK + tl.arange(0, BK)
            w = tl.load(u + i_h * K + offs, mask=offs < K, other=0.0).to(tl.float32)
            d += tl.sum(qf * kf * w[None, :], axis=1)
        else:
            d += tl.sum(qf * kf, axis=1)
    if EXACT:
        A = _exact_scores(q, k, g, i_b, i_h, i_t, T, H, K, BT, BK, PER_KEY, BONUS)
    else:
        tl.store(flags + i_s, (top > EXP_LIMIT).to(tl.uint8))
    A = tl.where(mask, A, 0.0)
    # dA and dv
    dA = tl.zeros([BT, BT], dtype=tl.float32)
    for i_v in range(NV):
        vt = _load_tile(v, i_b, i_h, i_t, i_v, T, H, V, BT, BV)
        pt = _load_tile(do, i_b, i_h, i_t, i_v, T, H, V, BT, BV).to(tl.float32) * scale
        dA += tl.dot(pt.to(vt.dtype), tl.trans(vt), input_precision=PREC)
        dvt = tl.dot(tl.trans(A.to(vt.dtype)), pt.to(vt.dtype), input_precision=PREC) + d[:, None] * pt
        for i_k in range(NK):
            kt = _load_tile(k, i_b, i_h, i_t, i_k, T, H, K, BT, BK)
            dht = _load_state(dh, i_s, i_k, i_v, K, V, BK, BV)
            b, bq, bC = _decays(g, i_b, i_h, i_t, i_k, T, H, K, BT, BK, PER_KEY, BONUS)
            kd = tl.where(live[:, None], kt * tl.exp(bC[None, :] - b), 0.0)
            dvt += tl.dot(kd.to(kt.dtype), dht.to(kt.dtype), input_precision=PREC)
        _store_tile(dv, dvt, i_b, i_h, i_t, i_v, T, H, V, BT, BV)
    dA_diag = tl.sum(tl.where(eye, dA, 0.0), axis=1)
    dA = tl.where(mask, dA, 0.0)
    valid = (i_t * BT + rows) < T
    dg_total = tl.zeros([BK], dtype=tl.float32)
    for i_k in range(NK):
        qt = _load_tile(q, i_b, i_h, i_t, i_k, T, H, K, BT, BK)
        kt = _load_tile(k, i_b, i_h, i_t, i_k, T, H, K, BT, BK)
        qf, kf = qt.to(tl.float32), kt.to(tl.float32)
        b, bq, bC = _decays(g, i_b, i_h, i_t, i_k, T, H, K, BT, BK, PER_KEY, BONUS)
        dqt = tl.zeros([BT, BK], dtype=tl.float32)
        dkt = tl.zeros([BT, BK], dtype=tl.float32)
        hdh = tl.zeros([BK], dtype=tl.float32)
        for i_v in range(NV):
            vt = _load_tile(v, i_b, i_h, i_t, i_v, T, H, V, BT, BV)
            pt = (_load_tile(do, i_b, i_h, i_t, i_v, T, H, V, BT, BV).to(tl.float32) * scale).to(vt.dtype)
            ht = _load_state(h, i_s, i_k, i_v, K, V, BK, BV)
            dht = _load_state(dh, i_s, i_k, i_v, K, V, BK, BV)
            dqt += tl.dot(pt, tl.trans(ht.to(vt.dtype)), input_precision=PREC)
            dkt += tl.dot(vt, tl.trans(dht.to(vt.dtype)), input_precision=PREC)
            hdh += tl.sum(ht.to(tl.float32) * dht.to(tl.float32), axis=1)
        dqt = tl.where((seg == 0)[:, None], dqt * tl.exp(bq), 0.0)
        dks = tl.where(live[:, None], dkt * tl.exp(bC[None, :] - b), 0.0)
        dqi, dki = _pair_grads(dA, qt, kt, b, bq, BT, PREC, EXACT)
        dqt += dqi
        dkt = dks + dki
        dbC = tl.where(last == 0, tl.exp(bC), 0.0) * hdh + tl.sum(kf * dks, axis=0)
        dbq = qf * dqt
        dgt = tl.cumsum(dbq - kf * dkt, axis=0, reverse=True) + dbC[None, :]
        if BONUS:
            dgt -= dbq
        offs = i_k * BK + tl.arange(0, BK)
        if BONUS:
            w = tl.load(u + i_h * K + offs, mask=offs < K, other=0.0).to(tl.float32)
            dqt += dA_diag[:, None] * kf * w[None, :]
            dkt += dA_diag[:, None] * qf * w[None, :]
            tl.store(
                du + ((i_b * NC + i_t) * H + i_h).to(tl.int64) * K + offs,
                tl.sum(dA_diag[:, None] * qf * kf, axis=0),
                mask=offs < K,
            )
        else:
            dqt += dA_diag[:, None] * kf
            dkt += dA_diag[:, None] * qf
        _store_tile(dq, dqt, i_b, i_h, i_t, i_k, T, H, K, BT, BK)
        _store_tile(dk, dkt, i_b, i_h, i_t, i_k, T, H, K, BT, BK)
        if PER_KEY:
            _store_tile(dg, dgt, i_b, i_h, i_t, i_k, T, H, K, BT, BK)
        else:
            dg_total += tl.sum(tl.where(valid[:, None] & (offs < K)[None, :], dgt, 0.0), axis=0)
    if not PER_KEY:
        tl.store(dg + (i_b * NC + i_t) * H + i_h, tl.sum(dg_total, axis=0))
