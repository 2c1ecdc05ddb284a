"""Reference diagonal scan shared by Longhorn and Mamba.

Both recurrences are, per batch b, channel c and state n,

    h_t[c, n] = a_t[c, n] * h_{t-1}[c, n] + u_t[c, n]
    y_t[c]    = sum_n q_t[n] * h_t[c, n]

with 0 <= a_t <= 1. Only how a and u are made from the inputs differs:

    Longhorn: a = 1 - delta * k^2,  u = delta * x * k,  delta = sigmoid(dt) / (1 + sigmoid(dt) |k|^2)
    Mamba:    a = exp(delta * A),   u = delta * x * B,  delta = softplus(dt)

``diag_scan`` runs the recurrence step by step over time, vectorised over batch,
channels and states. It builds a_t and u_t one step at a time from per-step slices
of the inputs, so no (B, T, C, N) tensor is ever made and each step's work stays in
cache. A ``reset`` at step t zeroes h_{t-1} before step t (document boundaries in
packed batches).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def compute_dtype(x: Tensor) -> torch.dtype:
    """Float64 inputs are scanned in float64 (for tests); everything else in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def diag_scan(
    make_step: Callable[..., tuple[Tensor, Tensor]],
    inputs: Sequence[Tensor],
    q: Tensor,
    initial_state: Tensor | None = None,
    reset: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Scan h_t = a_t h_{t-1} + u_t with readout y_t = h_t q_t.

    Args:
        make_step: ``make_step(*slices) -> (a_t, u_t)``, each (B, C, N), from the
            step-t slices (B, ...) of ``inputs``; a_t in [0, 1].
        inputs: (B, T, ...) tensors that ``make_step`` reads, sliced along time.
        q: (B, T, N) readout vector, shared by all channels.
        initial_state: (B, C, N) or None for zeros.
        reset: (B, T) bool; True at t zeroes the state before step t.

    Returns:
        y of shape (B, T, C) and the final state (B, C, N), in ``q``'s dtype.
    """
    steps = zip(*(t.unbind(1) for t in inputs))  # unbind: one gradient buffer per input, not one per step
    keep = None if reset is None else (~reset).to(q.dtype).unbind(1)
    h = initial_state
    ys = []
    for t, (slices, q_t) in enumerate(zip(steps, q.unbind(1))):
        a, u = make_step(*slices)
        if keep is not None:
            a = a * keep[t][:, None, None]
        h = u if h is None else a * h.to(u.dtype) + u
        ys.append(torch.einsum("bcn,bn->bc", h, q_t))
    return torch.stack(ys, dim=1), h.clone(memory_format=torch.contiguous_format)


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
