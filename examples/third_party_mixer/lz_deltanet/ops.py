"""The delta rule as a scan op, ``lz_deltanet::delta_rule``.

Per batch and head, with k_t of unit length and 0 < beta_t < 1 (Schlag et al. 2021;
Yang et al., arXiv 2406.06484):

    S_t = S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T
        = S_{t-1} + beta_t (v_t - S_{t-1} k_t) k_t^T      (write v_t where k_t points)
    o_t = S_t q_t

Layout is (B, T, H, d) for q, k, v and (B, T, H) for beta; the state S is
(B, H, d_v, d_k) in float32 (float64 for float64 inputs). A ``reset`` at t (a
document start in a packed batch) zeroes S_{t-1} before step t.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from longhorn_zoo import define_scan_op


def compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def delta_rule_step(S: Tensor, q: Tensor, k: Tensor, v: Tensor, beta: Tensor) -> tuple[Tensor, Tensor]:
    """One token: S (B, H, d_v, d_k); q, k (B, H, d_k); v (B, H, d_v); beta (B, H). Returns o_t and S_t."""
    error = v - (S @ k.unsqueeze(-1)).squeeze(-1)  # what the state recalls for k_t, against v_t
    S = S + (beta.unsqueeze(-1) * error).unsqueeze(-1) * k.unsqueeze(-2)
    return (S @ q.unsqueeze(-1)).squeeze(-1), S


def delta_rule_reference(
    q: Tensor, k: Tensor, v: Tensor, beta: Tensor, initial_state: Tensor | None, reset: Tensor | None
) -> tuple[Tensor, Tensor]:
    """The delta-rule scan, one token at a time.

    Args:
        q: (B, T, H, d_k) queries.
        k: (B, T, H, d_k) keys, L2-normalised.
        v: (B, T, H, d_v) values.
        beta: (B, T, H) write strengths in (0, 1).
        initial_state: (B, H, d_v, d_k), or None for zeros.
        reset: (B, T) bool, True where a new document starts (zeroes the state before that step), or None.

    Returns:
        o (B, T, H, d_v) in q's dtype, and the final state in the compute dtype.
    """
    cd = compute_dtype(q)
    bsz, _, heads, d_k = k.shape
    S = q.new_zeros(bsz, heads, v.shape[-1], d_k, dtype=cd) if initial_state is None else initial_state.to(cd)
    outs = []
    for t, (q_t, k_t, v_t, b_t) in enumerate(zip(*(a.to(cd).unbind(1) for a in (q, k, v, beta)))):
        if reset is not None:
            S = S.masked_fill(reset[:, t, None, None, None], 0.0)
        o_t, S = delta_rule_step(S, q_t, k_t, v_t, b_t)
        outs.append(o_t)
    return torch.stack(outs, dim=1).to(q.dtype), S.clone(memory_format=torch.contiguous_format)


def _delta_rule_fake(q, k, v, beta, initial_state, reset):
    bsz, seqlen, heads, d_k = k.shape
    d_v = v.shape[-1]
    return q.new_empty(bsz, seqlen, heads, d_v), q.new_empty(bsz, heads, d_v, d_k, dtype=compute_dtype(q))


def _delta_rule_examples(dtype: torch.dtype, gen: torch.Generator) -> list[tuple]:
    """Tiny inputs for the conformance suite: with an initial state and a reset, then without."""
    bsz, seqlen, heads, d = 2, 4, 2, 3

    def r(*shape: int) -> Tensor:
        return torch.randn(*shape, dtype=dtype, generator=gen)

    q, k, v = r(bsz, seqlen, heads, d), F.normalize(r(bsz, seqlen, heads, d), dim=-1), r(bsz, seqlen, heads, d)
    beta = torch.sigmoid(r(bsz, seqlen, heads))
    reset = torch.zeros(bsz, seqlen, dtype=torch.bool)
    reset[0, 2] = True
    return [(q, k, v, beta, r(bsz, heads, d, d), reset), (q, k, v, beta, None, None)]


delta_rule = define_scan_op("lz_deltanet::delta_rule", delta_rule_reference, _delta_rule_fake,
                            example_inputs=_delta_rule_examples)
