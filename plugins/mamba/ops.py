"""The Mamba-1 selective scan as a custom op, ``longhorn_zoo::mamba_scan``.

Per batch, channel i and state n (Gu and Dao, arXiv 2312.00752, Algorithm 2):

    delta_t,i = softplus(dt_t,i)
    h_t[i,n]  = exp(delta_t,i * A[i,n]) * h_{t-1}[i,n] + delta_t,i * B_t,n * x_t,i
    y_t,i     = sum_n C_t,n * h_t[i,n] + D_i * x_t,i,   then  y * SiLU(z)

Layout is (B, T, C) for x, dt and z and (B, T, N) for B and C (shared by all
channels); A is (C, N) with negative entries; the state is (B, C, N) in float32
(float64 for float64 inputs). The recurrence itself is the shared diagonal scan of
:mod:`longhorn_zoo.plugins.selective_scan.reference`; this module only makes its decay and input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from longhorn_zoo.ops import define_scan_op
from longhorn_zoo.plugins.selective_scan.cuda import mamba_backend
from longhorn_zoo.plugins.selective_scan.reference import compute_dtype, diag_scan, diag_step, gate_and_skip


def _decay_and_input(x: Tensor, dt: Tensor, A: Tensor, B: Tensor) -> tuple[Tensor, Tensor]:
    """a = exp(delta A) and u = delta x B of the diagonal recurrence, each (..., C, N)."""
    delta = F.softplus(dt)
    a = torch.exp(delta.unsqueeze(-1) * A)
    u = (delta * x).unsqueeze(-1) * B.unsqueeze(-2)
    return a, u


def mamba_scan_reference(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor,
    z: Tensor | None,
    initial_state: Tensor | None,
    reset: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Mamba-1 selective scan.

    Args:
        x: (B, T, C) input after the conv and SiLU.
        dt: (B, T, C) step size before the softplus (dt_proj output, bias included).
        A: (C, N) state matrix diagonal, negative (``-exp(A_log)``), float32.
        B: (B, T, N) input projection, shared by all channels.
        C: (B, T, N) output projection, shared by all channels.
        D: (C,) skip weight.
        z: (B, T, C) gate, or None for no gate.
        initial_state: (B, C, N) or None for zeros.
        reset: (B, T) bool, True where a new document starts (zeroes the state before that step), or None.

    Returns:
        y (B, T, C) in x's dtype, and the final state (B, C, N) in the compute dtype.
    """
    cd = compute_dtype(x)
    xf = x.to(cd)
    Af = A.to(cd)
    y, h = diag_scan(lambda x_t, dt_t, B_t: _decay_and_input(x_t, dt_t, Af, B_t), (xf, dt.to(cd), B.to(cd)),
                     C.to(cd), initial_state, reset)
    y = gate_and_skip(y, xf, D.to(cd), None if z is None else z.to(cd))
    return y.to(x.dtype), h


def _mamba_scan_fake(x, dt, A, B, C, D, z, initial_state, reset):
    # contiguous like the reference's outputs (empty_like would copy the strides of a transposed x)
    return x.new_empty(x.shape), x.new_empty(x.shape[0], x.shape[2], A.shape[-1], dtype=compute_dtype(x))


def _mamba_scan_examples(dtype: torch.dtype, gen: torch.Generator) -> list[tuple]:
    """Tiny inputs for the conformance suite: with gate, initial state and resets, then without."""
    bsz, seqlen, chans, nstate = 2, 4, 3, 2

    def r(*shape: int) -> Tensor:
        return torch.randn(*shape, dtype=dtype, generator=gen)

    x, dt, B, C, D, z = r(bsz, seqlen, chans), r(bsz, seqlen, chans), r(bsz, seqlen, nstate), r(bsz, seqlen, nstate), \
        r(chans), r(bsz, seqlen, chans)  # fmt: skip
    A = -torch.exp(r(chans, nstate))
    reset = torch.zeros(bsz, seqlen, dtype=torch.bool)
    reset[:, 2] = True
    return [(x, dt, A, B, C, D, z, r(bsz, chans, nstate), reset), (x, dt, A, B, C, D, None, None, None)]


mamba_scan = define_scan_op(
    "longhorn_zoo::mamba_scan", mamba_scan_reference, _mamba_scan_fake, example_inputs=_mamba_scan_examples
)
mamba_scan.register_backend(mamba_backend(mamba_scan))


def mamba_step(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, z: Tensor | None, state: Tensor
) -> tuple[Tensor, Tensor]:
    """One recurrent step: x, dt, z are (B, C); A is (C, N); B, C are (B, N); state is (B, C, N)."""
    cd = state.dtype
    xf = x.to(cd)
    a, u = _decay_and_input(xf, dt.to(cd), A.to(cd), B.to(cd))
    y, state = diag_step(a, u, C.to(cd), state)
    y = gate_and_skip(y, xf, D.to(cd), None if z is None else z.to(cd))
    return y.to(x.dtype), state
