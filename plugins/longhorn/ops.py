"""The Longhorn scan as a custom op, ``longhorn_zoo::longhorn_scan``.

Per batch, channel i and state n (Longhorn, arXiv 2407.14207, eq. for the
closed-form online associative-recall update):

    beta_t    = sigmoid(dt_t,i)
    delta_t,i = beta_t / (1 + beta_t * |k_t|^2)
    S_t[i,n]  = (1 - delta_t,i * k_t,n^2) * S_{t-1}[i,n] + delta_t,i * x_t,i * k_t,n
    y_t,i     = sum_n S_t[i,n] * q_t,n + D_i * x_t,i,   then  y * SiLU(z)

Layout is (B, T, C) for x, dt and z and (B, T, N) for k and q; the state is
(B, C, N) in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import torch
from torch import Tensor

from longhorn_zoo.ops import define_scan_op
from longhorn_zoo.plugins.selective_scan.cuda import longhorn_backend
from longhorn_zoo.plugins.selective_scan.reference import compute_dtype, diag_scan, diag_step, gate_and_skip


def _decay_and_input(x: Tensor, dt: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    """a and u of the diagonal recurrence, each (..., C, N)."""
    beta = torch.sigmoid(dt)
    delta = beta / (1 + beta * (k * k).sum(-1, keepdim=True))
    kk = k.unsqueeze(-2)
    a = 1 - delta.unsqueeze(-1) * kk * kk
    u = (delta * x).unsqueeze(-1) * kk
    return a, u


def longhorn_scan_reference(
    x: Tensor,
    dt: Tensor,
    k: Tensor,
    q: Tensor,
    D: Tensor,
    z: Tensor | None,
    initial_state: Tensor | None,
    reset: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Longhorn selective scan.

    Args:
        x: (B, T, C) input after the conv and SiLU.
        dt: (B, T, C) step size before the sigmoid (dt_head output, bias included).
        k: (B, T, N) key, shared by all channels.
        q: (B, T, N) query, shared by all channels.
        D: (C,) skip weight.
        z: (B, T, C) gate, or None for no gate.
        initial_state: (B, C, N) or None for zeros.
        reset: (B, T) bool, True where a new document starts, or None.

    Returns:
        y (B, T, C) in x's dtype, and the final state (B, C, N) in the compute dtype.
    """
    cd = compute_dtype(x)
    xf, dtf, kf, qf = x.to(cd), dt.to(cd), k.to(cd), q.to(cd)
    y, h = diag_scan(_decay_and_input, (xf, dtf, kf), qf, initial_state, reset)
    y = gate_and_skip(y, xf, D.to(cd), None if z is None else z.to(cd))
    return y.to(x.dtype), h


def _longhorn_scan_fake(x, dt, k, q, D, z, initial_state, reset):
    cd = compute_dtype(x)
    # contiguous like the reference's outputs (empty_like would copy the strides of a transposed x)
    return x.new_empty(x.shape), x.new_empty(x.shape[0], x.shape[2], k.shape[-1], dtype=cd)


def _longhorn_scan_examples(dtype: torch.dtype, gen: torch.Generator) -> list[tuple]:
    """Tiny inputs for the conformance suite: with gate, initial state and resets, then without."""
    bsz, seqlen, chans, nstate = 2, 4, 3, 2

    def r(*shape: int) -> Tensor:
        return torch.randn(*shape, dtype=dtype, generator=gen)

    x, dt, k, q, D, z = r(bsz, seqlen, chans), r(bsz, seqlen, chans), r(bsz, seqlen, nstate), \
        r(bsz, seqlen, nstate), r(chans), r(bsz, seqlen, chans)
    reset = torch.zeros(bsz, seqlen, dtype=torch.bool)
    reset[:, 2] = True
    return [(x, dt, k, q, D, z, r(bsz, chans, nstate), reset), (x, dt, k, q, D, None, None, None)]


longhorn_scan = define_scan_op("longhorn_zoo::longhorn_scan", longhorn_scan_reference, _longhorn_scan_fake,
                               example_inputs=_longhorn_scan_examples)
longhorn_scan.register_backend(longhorn_backend(longhorn_scan))


def longhorn_step(
    x: Tensor, dt: Tensor, k: Tensor, q: Tensor, D: Tensor, z: Tensor | None, state: Tensor
) -> tuple[Tensor, Tensor]:
    """One recurrent step: x, dt, z are (B, C); k, q are (B, N); state is (B, C, N)."""
    cd = state.dtype
    xf, kf = x.to(cd), k.to(cd)
    a, u = _decay_and_input(xf, dt.to(cd), kf)
    y, state = diag_step(a, u, q.to(cd), state)
    y = gate_and_skip(y, xf, D.to(cd), None if z is None else z.to(cd))
    return y.to(x.dtype), state
