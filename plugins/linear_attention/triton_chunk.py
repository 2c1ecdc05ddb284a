"""Triton backend of the linear-attention scan (GLA, RetNet, RWKV-6).

``register_triton_backend(op)`` adds a ``"triton"`` backend for CUDA to the
linear-attention :class:`~longhorn_zoo.ops.ScanOp`. It runs the chunked form of

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,   o_t = scale q_t^T S_t                  (GLA, RetNet)
    o_t = scale q_t^T (S_{t-1} + diag(u) k_t v_t^T),   S_t as above                     (RWKV-6)

with the kernels of :mod:`~longhorn_zoo.plugins.linear_attention.triton_chunk_kernels` (matrix
products inside a chunk, a recurrence across chunks, fp32 accumulation), wrapped as
``torch.library.triton_op`` custom ops in :mod:`~longhorn_zoo.plugins.linear_attention.triton_chunk_ops`,
so ``torch.compile(fullgraph=True)`` traces forward and backward with no graph break.
Triton is imported when the backend first runs: the trainer runs without it.

Range: any log decay <= 0. The pair weights inside a chunk are one matrix product of
factors around the chunk's middle step while every key's log decay summed over half a
chunk stays above -60 (``triton_chunk_ops.EXP_LIMIT``): about 16 steps for per-key decays
(chunks of 32, an average decay factor above exp(-3.75) a step) and 32 steps for a per-head
decay (chunks of 64, above exp(-1.9); RetNet's strongest is 1 - 2^-5). A chunk with a
stronger decay is recomputed by a second launch of the same kernels that forms each pair
weight on its own, exact but slower. A per-head decay also gets its (H,) gradient.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Any

import torch
from torch import Tensor

from longhorn_zoo.ops import Backend, ScanOp

__all__ = ["TRITON_BACKEND", "register_triton_backend", "triton_available"]


@functools.cache
def triton_available() -> bool:
    """True when Triton is installed and a CUDA GPU of compute capability 8.0 or newer is present."""
    if importlib.util.find_spec("triton") is None or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability()[0] >= 8


def _forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    log_decay: Tensor,
    bonus: Tensor | None,
    scale: float,
    initial_state: Tensor | None,
    reset: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """The backend's forward: the reference's signature and outputs."""
    from longhorn_zoo.plugins.linear_attention.triton_chunk_ops import chunk_fwd

    return chunk_fwd(q, k, v, log_decay, bonus, scale, initial_state, reset)


def _backward(
    inputs: tuple[Any, ...], outputs: tuple[Tensor, ...], grad_outputs: tuple[Tensor | None, ...]
) -> tuple[Tensor | None, ...]:
    """Gradients of (q, k, v, log_decay, bonus, scale, initial_state, reset) from those of (o, final_state)."""
    from longhorn_zoo.plugins.linear_attention.triton_chunk_ops import chunk_bwd

    q, k, v, log_decay, bonus, scale, initial_state, reset = inputs
    do, dht = grad_outputs
    if do is None:
        do = torch.zeros_like(outputs[0])
    dq, dk, dv, dg, du, dh0 = chunk_bwd(q, k, v, log_decay, bonus, scale, initial_state, reset, do, dht)
    du = du.to(bonus.dtype) if bonus is not None else None
    dh0 = dh0.to(initial_state.dtype) if initial_state is not None else None
    return dq, dk, dv, dg, du, None, dh0, None


TRITON_BACKEND = Backend(
    name="triton", device_type="cuda", is_available=triton_available, forward=_forward, backward=_backward
)
"""The backend; :func:`register_triton_backend` adds it to an op."""


def register_triton_backend(op: ScanOp) -> None:
    """Add the Triton backend to ``op``, the linear-attention scan op (``linear_attn_scan``'s signature)."""
    op.register_backend(TRITON_BACKEND)
