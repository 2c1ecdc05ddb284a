"""The linear-attention scan shared by GLA, RetNet and RWKV-6: ``longhorn_zoo::linear_attn_scan``.

Per batch and head, with a (K, V) state S, decay g_t <= 0 in log space and scale c:

    no bonus (GLA, RetNet):  S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,   o_t = c q_t^T S_t
    bonus u  (RWKV-6):       o_t = c q_t^T (S_{t-1} + diag(u) k_t v_t^T),  S_t as above

g_t is per token and per key (GLA, RWKV-6: ``log_decay`` (B, T, H, K)) or one fixed
value per head (RetNet: ``log_decay`` (H,)). A ``reset`` at t zeroes S_{t-1} before
step t (document boundaries in packed batches).

The reference runs the chunked form. Inside a chunk of C steps, with G the
cumulative sum of g from the chunk start (inclusive) and Gq = G (no bonus) or
G - g (bonus: o_t does not see g_t):

    o_t = c q_t^T [ diag(exp(Gq_t)) S_0 + sum_{s in chunk, s <= t} diag(exp(Gq_t - G_s)) k_s v_s^T ]
    S_C = diag(exp(G_C)) S_0 + sum_s diag(exp(G_C - G_s)) k_s v_s^T

(with s < t plus the diag(u) term under a bonus). Every exponent is a difference
"later minus earlier" of a non-increasing sum, so it is <= 0: the pair weights
exp(Gq_t - G_s) are formed for each causal (t, s) pair and key inside the chunk,
never as a product exp(Gq_t) exp(-G_s) that can overflow, so any decay, however
strong, is exact. A Python loop runs only across chunks, on the (B, H, K, V) state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from longhorn_zoo.ops import define_scan_op
from longhorn_zoo.plugins.linear_attention.triton_chunk import register_triton_backend

__all__ = ["linear_attn_scan", "linear_attn_scan_reference", "linear_attn_step"]

CHUNK_PER_KEY = 8  # pair weights are (C (C + 1) / 2, K) per chunk: keep C small
CHUNK_PER_HEAD = 64  # pair weights are (C, C): longer chunks, fewer loop steps


def _compute_dtype(x: Tensor) -> torch.dtype:
    """Float64 inputs run in float64 (tests); everything else in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _to_chunks(x: Tensor, n: int, c: int) -> Tensor:
    """(B, T, H, X) zero-padded to n * c steps, as (B, H, n, c, X)."""
    x = F.pad(x, (0, 0, 0, 0, 0, n * c - x.shape[1]))
    return x.unflatten(1, (n, c)).permute(0, 3, 1, 2, 4)


def linear_attn_scan_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_decay: Tensor,
    bonus: Tensor | None,
    scale: float,
    initial_state: Tensor | None,
    reset: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Chunked linear attention with a diagonal decay (see the module docstring).

    Args:
        q: (B, T, H, K) queries (RWKV: receptance).
        k: (B, T, H, K) keys.
        v: (B, T, H, V) values.
        log_decay: (B, T, H, K) per-token, per-key log decay g_t <= 0, or (H,) one per head.
        bonus: (H, K) bonus u for the current token (RWKV-6), or None.
        scale: Multiplies every output (e.g. K ** -0.5).
        initial_state: (B, H, K, V) state before the first step, or None for zeros.
        reset: (B, T) bool, True at t zeroes S_{t-1} before step t, or None.

    Returns:
        o (B, T, H, V) in q's dtype, and the final state (B, H, K, V) in float32
        (float64 for float64 inputs).
    """
    cd = _compute_dtype(q)
    bsz, seqlen, nh, dk = q.shape
    per_key = log_decay.dim() == 4
    c = CHUNK_PER_KEY if per_key else CHUNK_PER_HEAD
    n = -(-seqlen // c)
    qc = _to_chunks(q.to(cd) * scale, n, c)  # (B, H, n, C, K)
    kc = _to_chunks(k.to(cd), n, c)
    vc = _to_chunks(v.to(cd), n, c)  # (B, H, n, C, V)
    if per_key:
        g = _to_chunks(log_decay.to(cd), n, c)  # padding decays by exp(0) = 1
    else:  # (H,) -> (1, H, n, C, 1), zero on the padding
        valid = (torch.arange(n * c, device=q.device) < seqlen).to(cd).view(1, 1, n, c, 1)
        g = log_decay.to(cd).view(1, nh, 1, 1, 1) * valid
    big_g = g.cumsum(3)
    gq = big_g - g if bonus is not None else big_g
    g_last = big_g[:, :, :, -1:]  # (., H, n, 1, Kd)

    # Inside each chunk: pair weights exp(Gq_t - G_s) <= 1 for s <= t (s < t under a bonus) in the same segment.
    # seg counts the resets in the chunk so far; masked pairs get exp(-inf) = 0.
    ti, si = torch.tril_indices(c, c, offset=-1 if bonus is not None else 0, device=q.device)
    if reset is None:
        q_sees_s0 = k_reaches_end = carry = None
    else:
        seg = _to_chunks(reset[..., None, None].to(torch.int32), n, c)[..., 0].cumsum(3)  # (B, 1, n, C)
        q_sees_s0 = (seg == 0).to(cd)[..., None]
        k_reaches_end = (seg == seg[..., -1:]).to(cd)[..., None]
        carry = (seg[..., -1:] == 0).to(cd)[..., None]
    if per_key:  # only the lower-triangle pairs, gathered: (., H, n, P, K) with P = C (C + 1) / 2
        diff = gq[..., ti, :] - big_g[..., si, :]
        if reset is not None:
            diff = torch.where((seg[..., ti] == seg[..., si])[..., None], diff, float("-inf"))
        pairs = (qc[..., ti, :] * kc[..., si, :] * torch.exp(diff)).sum(-1)
        scores = pairs.new_zeros(*pairs.shape[:-1], c * c).index_copy(-1, ti * c + si, pairs).unflatten(-1, (c, c))
    else:  # one decay per head: a dense (C, C) weight per chunk
        pair = torch.ones(c, c, dtype=torch.bool, device=q.device).tril(-1 if bonus is not None else 0)
        if reset is not None:
            pair = pair & (seg[..., :, None] == seg[..., None, :])
        diff = gq[..., 0].unsqueeze(-1) - big_g[..., 0].unsqueeze(-2)  # (., H, n, C, C)
        scores = (qc @ kc.transpose(-1, -2)) * torch.exp(torch.where(pair, diff, float("-inf")))
    o = scores @ vc
    if bonus is not None:
        o = o + (qc * bonus.to(cd).view(1, nh, 1, 1, dk) * kc).sum(-1, keepdim=True) * vc

    # Across chunks: each chunk's state increment and decay, then one loop over chunks.
    k_out = kc * torch.exp(g_last - big_g)
    q_in = qc * torch.exp(gq)
    decay = torch.exp(g_last).transpose(-1, -2)  # (., H, n, Kd, 1)
    if reset is not None:
        k_out, q_in, decay = k_out * k_reaches_end, q_in * q_sees_s0, decay * carry
    increments = k_out.transpose(-1, -2) @ vc  # (B, H, n, K, V)
    if initial_state is None:
        state = vc.new_zeros(bsz, nh, dk, vc.shape[-1])
    else:
        state = initial_state.to(cd)
    starts = []
    for a, inc in zip(decay.unbind(2), increments.unbind(2)):  # unbind: one gradient buffer, not one per chunk
        starts.append(state)
        state = a * state + inc
    o = o + q_in @ torch.stack(starts, dim=2)
    o = o.permute(0, 2, 3, 1, 4).flatten(1, 2)[:, :seqlen]  # (B, T, H, V)
    return (o.to(q.dtype).clone(memory_format=torch.contiguous_format),
            state.clone(memory_format=torch.contiguous_format))


def _linear_attn_scan_fake(q, k, v, log_decay, bonus, scale, initial_state, reset):
    bsz, seqlen, nh, dk = q.shape
    return (q.new_empty(bsz, seqlen, nh, v.shape[-1]),
            q.new_empty(bsz, nh, dk, v.shape[-1], dtype=_compute_dtype(q)))


def _linear_attn_scan_examples(dtype: torch.dtype, gen: torch.Generator) -> list[tuple]:
    """Tiny inputs for the conformance suite: GLA-like with initial state and resets (crossing a chunk),
    RetNet-like (per-head decay), RWKV-like (bonus) with state and resets."""
    bsz, seqlen, nh, dk, dv = 2, CHUNK_PER_KEY + 3, 2, 3, 2

    def r(*shape: int) -> Tensor:
        return torch.randn(*shape, dtype=dtype, generator=gen)

    q, k, v = r(bsz, seqlen, nh, dk), r(bsz, seqlen, nh, dk), r(bsz, seqlen, nh, dv)
    reset = torch.zeros(bsz, seqlen, dtype=torch.bool)
    reset[0, 4] = reset[1, CHUNK_PER_KEY + 1] = True
    per_key = -torch.exp(r(bsz, seqlen, nh, dk) - 1)
    per_head = -torch.exp(r(nh) - 3)
    return [
        (q, k, v, per_key, None, dk**-0.5, r(bsz, nh, dk, dv), reset),
        (q, k, v, per_head, None, dk**-0.5, None, None),
        (q, k, v, per_key, r(nh, dk), 1.0, r(bsz, nh, dk, dv), reset),
    ]


linear_attn_scan = define_scan_op("longhorn_zoo::linear_attn_scan", linear_attn_scan_reference, _linear_attn_scan_fake,
                                  example_inputs=_linear_attn_scan_examples)
register_triton_backend(linear_attn_scan)


def linear_attn_step(
    q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor, bonus: Tensor | None, scale: float, state: Tensor
) -> tuple[Tensor, Tensor]:
    """One recurrent step (generation) of :func:`linear_attn_scan_reference`.

    Args:
        q, k: (B, H, K). v: (B, H, V).
        log_decay: (B, H, K) this step's log decay, or (H,) one per head.
        bonus: (H, K) or None. scale: output scale.
        state: (B, H, K, V) state before the step, float32 (float64 in tests).

    Returns:
        o (B, H, V) in q's dtype and the new state in ``state``'s dtype.
    """
    cd = state.dtype
    qf, kf, vf = q.to(cd) * scale, k.to(cd), v.to(cd)
    w = torch.exp(log_decay.to(cd))
    w = w.unsqueeze(-1) if log_decay.dim() == 3 else w.view(1, -1, 1, 1)
    kv = kf.unsqueeze(-1) * vf.unsqueeze(-2)  # (B, H, K, V)
    if bonus is None:
        state = w * state + kv
        o = torch.einsum("bhk,bhkv->bhv", qf, state)
    else:
        o = torch.einsum("bhk,bhkv->bhv", qf, state + bonus.to(cd).unsqueeze(-1) * kv)
        state = w * state + kv
    return o.to(q.dtype), state
