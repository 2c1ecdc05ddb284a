"""Triton kernels of the chunked linear-attention scan (GLA, RetNet, RWKV-6).

Imported only by :mod:`longhorn_zoo.plugins.linear_attention.triton_chunk`, and only when Triton
is used, so that the trainer runs without Triton.

Split the sequence into chunks of BT steps. Inside a chunk let b_t be the running
sum of the log decay g (per key, or per head when the decay is one number a head),
bC = b_{BT-1} its total, and h the state entering the chunk. Then

    o_t  = scale * ( (q_t * exp(bq_t)) h + sum_{s<t} (q_t . k_s exp(bq_t - b_s)) v_s + (q_t . w k_t) v_t )
    h'   = exp(bC) h + sum_s (k_s exp(bC - b_s)) v_s^T

with bq = b, w = 1 for GLA and RetNet, and bq_t = b_{t-1}, w = u (the bonus) for
RWKV-6. The pair weights exp(bq_t - b_s) are split around a reference row r in the
middle of the chunk, (q exp(bq - r)) (k exp(r - b))^T, so one matrix product gives
them all (a per-head decay is a (BT, 1) column that broadcasts over the keys); both
factors stay finite while a key's log decay summed over half a chunk stays above
about -80. A reset at t kills every pair (s, t') with s < t <= t' and
the state entering the chunk for t' >= t: the kernels mask by segment ids, the
running count of resets inside the chunk.

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
def _decays(
    g, i_b, i_h, i_t, i_k, T, H, K, BT: tl.constexpr, BK: tl.constexpr, PER_KEY: tl.constexpr, EXCL: tl.constexpr
):
    """Chunk i_t's running log decay b, its query-side version bq and its total bC.

    Per key: b, bq are (BT, BK) and bC is (BK,). Per head: b, bq are (BT, 1) and bC is (1,),
    which broadcast the same way, so the kernels need no second code path. Steps past T
    decay by nothing.
    """
    if PER_KEY:
        p = tl.make_block_ptr(
            g + (i_b * T * H + i_h).to(tl.int64) * K, (T, K), (H * K, 1), (i_t * BT, i_k * BK), (BT, BK), (1, 0)
        )
        gt = tl.load(p, boundary_check=(0, 1)).to(tl.float32)
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
def _ref_row(b, BT: tl.constexpr):
    """Row BT // 2 of b (BT, BK): the reference point of the pair weights."""
    return tl.sum(tl.where((tl.arange(0, BT) == BT // 2)[:, None], b, 0.0), axis=0)


@triton.jit
def _tile(x, i_b, i_h, i_t, i_c, T, H, C, BT: tl.constexpr, BC: tl.constexpr):
    """Block pointer to x[i_b, chunk i_t, i_h, block i_c] of a (B, T, H, C) tensor."""
    return tl.make_block_ptr(
        x + (i_b * T * H + i_h).to(tl.int64) * C, (T, C), (H * C, 1), (i_t * BT, i_c * BC), (BT, BC), (1, 0)
    )


@triton.jit
def _state_tile(h, i_bh, n, NC, K, V, i_k, i_v, BK: tl.constexpr, BV: tl.constexpr):
    """Block pointer to state block (i_k, i_v) of chunk n in a (B*H, NC, K, V) tensor."""
    return tl.make_block_ptr(
        h + (i_bh * NC + n).to(tl.int64) * K * V, (K, V), (V, 1), (i_k * BK, i_v * BV), (BK, BV), (1, 0)
    )


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
    p0 = tl.make_block_ptr(h0 + i_bh.to(tl.int64) * K * V, (K, V), (V, 1), (i_k * BK, i_v * BV), (BK, BV), (1, 0))
    if HAS_H0:
        state = tl.load(p0, boundary_check=(0, 1)).to(tl.float32)
    else:
        state = tl.zeros([BK, BV], dtype=tl.float32)
    for n in range(NC):
        tl.store(
            _state_tile(h, i_bh, n, NC, K, V, i_k, i_v, BK, BV), state.to(h.dtype.element_ty), boundary_check=(0, 1)
        )
        kt = tl.load(_tile(k, i_b, i_h, n, i_k, T, H, K, BT, BK), boundary_check=(0, 1))
        vt = tl.load(_tile(v, i_b, i_h, n, i_v, T, H, V, BT, BV), boundary_check=(0, 1))
        b, bq, bC = _decays(g, i_b, i_h, n, i_k, T, H, K, BT, BK, PER_KEY, False)
        seg, last = _segments(reset, i_b, n, T, BT, HAS_RESET)
        kd = tl.where((seg == last)[:, None], kt * tl.exp(bC[None, :] - b), 0.0)
        dec = tl.where(last == 0, tl.exp(bC)[:, None], 0.0)
        state = state * dec + tl.dot(tl.trans(kd.to(vt.dtype)), vt, input_precision=PREC)
    pt = tl.make_block_ptr(ht + i_bh.to(tl.int64) * K * V, (K, V), (V, 1), (i_k * BK, i_v * BV), (BK, BV), (1, 0))
    tl.store(pt, state, boundary_check=(0, 1))


@triton.jit
def _intra_factors(q, k, b, bq, BT: tl.constexpr):
    """Per-key decay: q exp(bq - r) and k exp(r - b), whose product is exp(bq_t - b_s) q_t k_s."""
    r = _ref_row(b, BT)[None, :]
    return q * tl.exp(bq - r), k * tl.exp(r - b)


@triton.jit
def _pair_mask(seg, BT: tl.constexpr):
    """Pairs (t, s) with s < t in the same segment."""
    t = tl.arange(0, BT)
    return (t[None, :] < t[:, None]) & (seg[:, None] == seg[None, :])


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
):
    """o for value block i_v of chunk i_t."""
    scale = tl.full([], scale, tl.float32)  # fp32 even where Inductor passes the Python float as fp64
    i_v, i_t, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    seg, last = _segments(reset, i_b, i_t, T, BT, HAS_RESET)
    mask = _pair_mask(seg, BT)
    A = tl.zeros([BT, BT], dtype=tl.float32)
    oi = tl.zeros([BT, BV], dtype=tl.float32)
    d = tl.zeros([BT], dtype=tl.float32)
    for i_k in range(tl.cdiv(K, BK)):
        qt = tl.load(_tile(q, i_b, i_h, i_t, i_k, T, H, K, BT, BK), boundary_check=(0, 1))
        kt = tl.load(_tile(k, i_b, i_h, i_t, i_k, T, H, K, BT, BK), boundary_check=(0, 1))
        ht = tl.load(_state_tile(h, i_bh, i_t, NC, K, V, i_k, i_v, BK, BV), boundary_check=(0, 1))
        b, bq, bC = _decays(g, i_b, i_h, i_t, i_k, T, H, K, BT, BK, PER_KEY, BONUS)
        qf, kf = qt.to(tl.float32), kt.to(tl.float32)
        qi, ki = _intra_factors(qf, kf, b, bq, BT)
        A += tl.dot(qi.to(qt.dtype), tl.trans(ki.to(kt.dtype)), input_precision=PREC)
        oi += tl.dot((qf * tl.exp(bq)).to(qt.dtype), ht.to(qt.dtype), input_precision=PREC)
        if BONUS:
            offs = i_k * BK + tl.arange(0, BK)
            w = tl.load(u + i_h * K + offs, mask=offs < K, other=0.0).to(tl.float32)
            d += tl.sum(qf * kf * w[None, :], axis=1)
        else:
            d += tl.sum(qf * kf, axis=1)
    A = tl.where(mask, A, 0.0)
    oi = tl.where((seg == 0)[:, None], oi, 0.0)
    vt = tl.load(_tile(v, i_b, i_h, i_t, i_v, T, H, V, BT, BV), boundary_check=(0, 1))
    out = oi + tl.dot(A.to(vt.dtype), vt, input_precision=PREC) + d[:, None] * vt.to(tl.float32)
    tl.store(_tile(o, i_b, i_h, i_t, i_v, T, H, V, BT, BV), (scale * out).to(o.dtype.element_ty), boundary_check=(0, 1))


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
    pt = tl.make_block_ptr(dht + i_bh.to(tl.int64) * K * V, (K, V), (V, 1), (i_k * BK, i_v * BV), (BK, BV), (1, 0))
    if HAS_DHT:
        dstate = tl.load(pt, boundary_check=(0, 1)).to(tl.float32)
    else:
        dstate = tl.zeros([BK, BV], dtype=tl.float32)
    for j in range(NC):
        n = NC - 1 - j
        tl.store(
            _state_tile(dh, i_bh, n, NC, K, V, i_k, i_v, BK, BV), dstate.to(dh.dtype.element_ty), boundary_check=(0, 1)
        )
        qt = tl.load(_tile(q, i_b, i_h, n, i_k, T, H, K, BT, BK), boundary_check=(0, 1))
        dot_ = tl.load(_tile(do, i_b, i_h, n, i_v, T, H, V, BT, BV), boundary_check=(0, 1))
        b, bq, bC = _decays(g, i_b, i_h, n, i_k, T, H, K, BT, BK, PER_KEY, EXCL)
        seg, last = _segments(reset, i_b, n, T, BT, HAS_RESET)
        qd = tl.where((seg == 0)[:, None], qt * tl.exp(bq), 0.0)
        dec = tl.where(last == 0, tl.exp(bC)[:, None], 0.0)
        dstate = dstate * dec + scale * tl.dot(tl.trans(qd.to(dot_.dtype)), dot_, input_precision=PREC)
    p0 = tl.make_block_ptr(dh0 + i_bh.to(tl.int64) * K * V, (K, V), (V, 1), (i_k * BK, i_v * BV), (BK, BV), (1, 0))
    tl.store(p0, dstate, boundary_check=(0, 1))


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
):
    """dq, dk, dv, dg of chunk i_t; du[i_b, i_t, i_h] (bonus) or dg[i_b, i_t, i_h] (per-head decay) as partial sums.

    With P = scale * do, dA = P v^T and the decayed parts dq~, dk~ of dq, dk (everything
    but the w-diagonal), the log decay gets db_s = -k_s dk~_s from the key side, dbq_t =
    q_t dq~_t from the query side and dbC = sum_v h' dh' from the chunk total; dg is
    their reverse running sum (bq_t = b_{t-1} shifts the query side by one step).
    """
    scale = tl.full([], scale, tl.float32)  # fp32 even where Inductor passes the Python float as fp64
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    seg, last = _segments(reset, i_b, i_t, T, BT, HAS_RESET)
    mask = _pair_mask(seg, BT)
    live = seg == last
    rows = tl.arange(0, BT)
    eye = rows[:, None] == rows[None, :]
    NK, NV = tl.cdiv(K, BK), tl.cdiv(V, BV)
    # the pair weights A and the w-diagonal d
    A = tl.zeros([BT, BT], dtype=tl.float32)
    d = tl.zeros([BT], dtype=tl.float32)
    for i_k in range(NK):
        qt = tl.load(_tile(q, i_b, i_h, i_t, i_k, T, H, K, BT, BK), boundary_check=(0, 1))
        kt = tl.load(_tile(k, i_b, i_h, i_t, i_k, T, H, K, BT, BK), boundary_check=(0, 1))
        qf, kf = qt.to(tl.float32), kt.to(tl.float32)
        b, bq, bC = _decays(g, i_b, i_h, i_t, i_k, T, H, K, BT, BK, PER_KEY, BONUS)
        qi, ki = _intra_factors(qf, kf, b, bq, BT)
        A += tl.dot(qi.to(qt.dtype), tl.trans(ki.to(kt.dtype)), input_precision=PREC)
        if BONUS:
            offs = i_k * BK + tl.arange(0, BK)
            w = tl.load(u + i_h * K + offs, mask=offs < K, other=0.0).to(tl.float32)
            d += tl.sum(qf * kf * w[None, :], axis=1)
        else:
            d += tl.sum(qf * kf, axis=1)
    A = tl.where(mask, A, 0.0)
    # dA and dv
    dA = tl.zeros([BT, BT], dtype=tl.float32)
    for i_v in range(NV):
        vt = tl.load(_tile(v, i_b, i_h, i_t, i_v, T, H, V, BT, BV), boundary_check=(0, 1))
        pt = tl.load(_tile(do, i_b, i_h, i_t, i_v, T, H, V, BT, BV), boundary_check=(0, 1)).to(tl.float32) * scale
        dA += tl.dot(pt.to(vt.dtype), tl.trans(vt), input_precision=PREC)
        dvt = tl.dot(tl.trans(A.to(vt.dtype)), pt.to(vt.dtype), input_precision=PREC) + d[:, None] * pt
        for i_k in range(NK):
            kt = tl.load(_tile(k, i_b, i_h, i_t, i_k, T, H, K, BT, BK), boundary_check=(0, 1))
            dht = tl.load(_state_tile(dh, i_bh, i_t, NC, K, V, i_k, i_v, BK, BV), boundary_check=(0, 1))
            b, bq, bC = _decays(g, i_b, i_h, i_t, i_k, T, H, K, BT, BK, PER_KEY, BONUS)
            kd = tl.where(live[:, None], kt * tl.exp(bC[None, :] - b), 0.0)
            dvt += tl.dot(kd.to(kt.dtype), dht.to(kt.dtype), input_precision=PREC)
        tl.store(_tile(dv, i_b, i_h, i_t, i_v, T, H, V, BT, BV), dvt.to(dv.dtype.element_ty), boundary_check=(0, 1))
    dA_diag = tl.sum(tl.where(eye, dA, 0.0), axis=1)
    dA = tl.where(mask, dA, 0.0)
    valid = (i_t * BT + rows) < T
    dg_total = tl.zeros([BK], dtype=tl.float32)
    # dq, dk, dg per key block
    for i_k in range(NK):
        qt = tl.load(_tile(q, i_b, i_h, i_t, i_k, T, H, K, BT, BK), boundary_check=(0, 1))
        kt = tl.load(_tile(k, i_b, i_h, i_t, i_k, T, H, K, BT, BK), boundary_check=(0, 1))
        qf, kf = qt.to(tl.float32), kt.to(tl.float32)
        b, bq, bC = _decays(g, i_b, i_h, i_t, i_k, T, H, K, BT, BK, PER_KEY, BONUS)
        dqt = tl.zeros([BT, BK], dtype=tl.float32)
        dkt = tl.zeros([BT, BK], dtype=tl.float32)
        hdh = tl.zeros([BK], dtype=tl.float32)
        for i_v in range(NV):
            vt = tl.load(_tile(v, i_b, i_h, i_t, i_v, T, H, V, BT, BV), boundary_check=(0, 1))
            pt = (
                tl.load(_tile(do, i_b, i_h, i_t, i_v, T, H, V, BT, BV), boundary_check=(0, 1)).to(tl.float32) * scale
            ).to(vt.dtype)
            ht = tl.load(_state_tile(h, i_bh, i_t, NC, K, V, i_k, i_v, BK, BV), boundary_check=(0, 1))
            dht = tl.load(_state_tile(dh, i_bh, i_t, NC, K, V, i_k, i_v, BK, BV), boundary_check=(0, 1))
            dqt += tl.dot(pt, tl.trans(ht.to(vt.dtype)), input_precision=PREC)
            dkt += tl.dot(vt, tl.trans(dht.to(vt.dtype)), input_precision=PREC)
            hdh += tl.sum(ht.to(tl.float32) * dht.to(tl.float32), axis=1)
        dqt = tl.where((seg == 0)[:, None], dqt * tl.exp(bq), 0.0)
        dks = tl.where(live[:, None], dkt * tl.exp(bC[None, :] - b), 0.0)
        qi, ki = _intra_factors(qf, kf, b, bq, BT)
        r = _ref_row(b, BT)[None, :]
        dqt += tl.dot(dA.to(kt.dtype), ki.to(kt.dtype), input_precision=PREC) * tl.exp(bq - r)
        dkt = dks + tl.dot(tl.trans(dA.to(qt.dtype)), qi.to(qt.dtype), input_precision=PREC) * tl.exp(r - b)
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
        tl.store(_tile(dq, i_b, i_h, i_t, i_k, T, H, K, BT, BK), dqt.to(dq.dtype.element_ty), boundary_check=(0, 1))
        tl.store(_tile(dk, i_b, i_h, i_t, i_k, T, H, K, BT, BK), dkt.to(dk.dtype.element_ty), boundary_check=(0, 1))
        if PER_KEY:
            tl.store(_tile(dg, i_b, i_h, i_t, i_k, T, H, K, BT, BK), dgt.to(dg.dtype.element_ty), boundary_check=(0, 1))
        else:
            dg_total += tl.sum(tl.where(valid[:, None] & (offs < K)[None, :], dgt, 0.0), axis=0)
    if not PER_KEY:
        tl.store(dg + (i_b * NC + i_t) * H + i_h, tl.sum(dg_total, axis=0))
