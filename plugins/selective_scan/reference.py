"""Reference diagonal scan shared by Longhorn and Mamba.

Both recurrences are, per batch b, channel c and state n,

    h_t[c, n] = a_t[c, n] * h_{t-1}[c, n] + u_t[c, n]
    y_t[c]    = sum_n q_t[n] * h_t[c, n]

with 0 <= a_t <= 1. Only how a and u are made from the inputs differs:

    Longhorn: a = 1 - delta * k^2,  u = delta * x * k,  delta = sigmoid(dt) / (1 + sigmoid(dt) |k|^2)
    Mamba:    a = exp(delta * A),   u = delta * x * B,  delta = softplus(dt)

``diag_scan`` runs the recurrence step by step over time, vectorised over batch,
channels and states, and reads all outputs out with one contraction at the end.
A ``reset`` at step t zeroes h_{t-1} before step t (document boundaries in packed
batches).
"""

from __future__ import annotations

import torch
from torch import Tensor

def compute_dtype(x: Tensor) -> torch.dtype:
    """Float64 inputs are scanned in float64 (for tests); everything else in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def diag_scan(
    a: Tensor,
    u: Tensor,
    q: Tensor,
    initial_state: Tensor | None = None,
    reset: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Scan h_t = a_t h_{t-1} + u_t with readout y_t = h_t q_t.

    Args:
        a: (B, T, C, N) decay in (0, 1].
        u: (B, T, C, N) input to the state.
        q: (B, T, N) readout vector, shared by all channels.
        initial_state: (B, C, N) or None for zeros.
        reset: (B, T) bool; True at t zeroes the state before step t.

    Returns:
        y of shape (B, T, C) and the final state (B, C, N), in ``u``'s dtype.
    """
    bsz, seqlen, chans, nstate = u.shape
    if reset is not None:
        a = a * (~reset).to(a.dtype)[:, :, None, None]
    h = u.new_zeros(bsz, chans, nstate) if initial_state is None else initial_state.to(u.dtype)
    hs = []
    for a_t, u_t in zip(a.unbind(1), u.unbind(1)):  # unbind: one gradient buffer, not one per step
        h = a_t * h + u_t
        hs.append(h)
    y = torch.einsum("btcn,btn->btc", torch.stack(hs, dim=1), q)
    return y, h.clone(memory_format=torch.contiguous_format)


def diag_step(a: Tensor, u: Tensor, q: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
    """One step of the recurrence: a, u and state are (B, C, N), q is (B, N)."""
    state = a * state + u
    return torch.einsum("bcn,bn->bc", state, q), state


def gate_and_skip(y: Tensor, x: Tensor, D: Tensor, z: Tensor | None) -> Tensor:
    """y + D x, then times SiLU(z) when a gate is given."""
    y = y + D * x
    if z is not None:
        y = y * torch.nn.functional.silu(z)
    return y
