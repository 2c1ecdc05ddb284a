"""The causal depthwise convolution as a custom op, ``longhorn_zoo::causal_conv1d``: the selective-scan
block's conv and the linear-attention layers' optional short conv.

Per batch b, channel e and step t, with kernel size K and weight w (E, K):

    a_t[e] = bias[e] + sum_{s=0}^{K-1} w[e, K-1-s] * x_{t-s}[e] * seen(t, s)
    y_t[e] = SiLU(a_t[e])            (activation "silu"; "none" keeps a_t)

Positions -(K-1)..-1 hold ``initial_state`` (the last K-1 inputs of the previous segment; zeros
when None). ``seen(t, s)`` is False when a document starts (``reset``) at one of the steps
t-s+1..t: a window never reaches back past the start of its document, and a row that had a reset
no longer sees the initial state. The final state is the last K-1 inputs, those before the last
reset zeroed, so that a following call continues the document.

The reference below runs on every device; the Triton kernels (:mod:`.conv_triton`) are the
CUDA backend, used when Triton and a GPU are there.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from longhorn_zoo.ops import Backend, define_scan_op
from longhorn_zoo.plugins.linear_attention.triton_chunk import triton_available
from longhorn_zoo.plugins.selective_scan.reference import compute_dtype

ACTIVATIONS = ("silu", "none")


def check_conv_args(x: Tensor, weight: Tensor, bias: Tensor | None, initial_state: Tensor | None,
                    reset: Tensor | None, activation: str) -> None:  # fmt: skip
    """Raise a ValueError naming the argument whose shape or value does not fit x (B, T, E)."""
    if x.dim() != 3:
        raise ValueError(f"causal_conv1d: x must be (B, T, E), got shape {tuple(x.shape)}")
    bsz, seqlen, chans = x.shape
    if weight.dim() != 2 or weight.shape[0] != chans or weight.shape[1] < 1:
        raise ValueError(f"causal_conv1d: weight must be (E, K) = ({chans}, K), got {tuple(weight.shape)}; "
                         "pass an nn.Conv1d weight (E, 1, K) as weight.squeeze(1)")
    km1 = weight.shape[1] - 1
    if bias is not None and tuple(bias.shape) != (chans,):
        raise ValueError(f"causal_conv1d: bias must be (E,) = ({chans},), got {tuple(bias.shape)}")
    if initial_state is not None and tuple(initial_state.shape) != (bsz, chans, km1):
        raise ValueError(f"causal_conv1d: initial_state must be (B, E, K-1) = ({bsz}, {chans}, {km1}), "
                         f"got {tuple(initial_state.shape)}")
    if reset is not None and (tuple(reset.shape) != (bsz, seqlen) or reset.dtype != torch.bool):
        raise ValueError(f"causal_conv1d: reset must be a bool (B, T) = ({bsz}, {seqlen}) tensor, "
                         f"got {reset.dtype} {tuple(reset.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"causal_conv1d: activation must be one of {ACTIVATIONS}, got {activation!r}")


def _shift_right(reset: Tensor, m: int) -> Tensor:
    """reset[:, t - m] at each t, False where t - m < 0."""
    return F.pad(reset, (m, 0))[:, : reset.shape[1]]


def causal_conv1d_reference(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    initial_state: Tensor | None,
    reset: Tensor | None,
    activation: str = "silu",
) -> tuple[Tensor, Tensor]:
    """Causal depthwise conv1d with an optional SiLU, conv state in and out, and document resets.

    Args:
        x: (B, T, E) input; any strides (the block passes a slice of in_proj's output).
        weight: (E, K) taps; ``weight[:, K-1]`` multiplies the current step.
        bias: (E,) or None.
        initial_state: (B, E, K-1), the inputs before step 0, or None for zeros.
        reset: (B, T) bool, True where a document starts, or None.
        activation: ``"silu"`` or ``"none"``.

    Returns:
        y (B, T, E) contiguous and the final state (B, E, K-1), both in x's dtype, computed in
        float32 (float64 for float64 inputs).
    """
    check_conv_args(x, weight, bias, initial_state, reset, activation)
    bsz, seqlen, chans = x.shape
    km1 = weight.shape[1] - 1
    cd = compute_dtype(x)
    prev = x.new_zeros(bsz, km1, chans, dtype=cd) if initial_state is None else initial_state.to(cd).transpose(1, 2)
    xe = torch.cat([prev, x.to(cd)], dim=1)  # position p at index p + K - 1
    w = weight.to(cd)
    a = torch.zeros(bsz, seqlen, chans, dtype=cd, device=x.device) if bias is None else bias.to(cd).expand_as(x)
    seen = None  # seen(t, s): no reset at t-s+1..t
    for s in range(km1 + 1):
        if s > 0 and reset is not None:
            step_ok = ~_shift_right(reset, s - 1)
            seen = step_ok if seen is None else seen & step_ok
        tap = w[:, km1 - s] * xe[:, km1 - s : km1 - s + seqlen]
        a = a + (tap if seen is None else tap * seen[..., None])
    y = F.silu(a) if activation == "silu" else a
    final = xe[:, seqlen:]  # positions T-(K-1)..T-1
    if reset is not None:
        padded = F.pad(reset, (km1, 0))  # position p at index p + K - 1
        kept = [~padded[:, seqlen + i + 1 :].any(-1) for i in range(km1)]  # no reset after position T-(K-1)+i
        final = final * torch.stack(kept, -1).to(cd)[..., None] if kept else final
    return y.to(x.dtype), final.transpose(1, 2).to(x.dtype).contiguous()


def _causal_conv1d_fake(x, weight, bias, initial_state, reset, activation="silu"):
    return x.new_empty(x.shape), x.new_empty(x.shape[0], x.shape[2], weight.shape[1] - 1)


def _causal_conv1d_examples(dtype: torch.dtype, gen: torch.Generator) -> list[tuple]:
    """Tiny inputs for the conformance suite: with bias, state and resets, then without, then no SiLU."""
    bsz, seqlen, chans, ksize = 2, 6, 3, 3

    def r(*shape: int) -> Tensor:
        return torch.randn(*shape, dtype=dtype, generator=gen)

    x, w, b = r(bsz, seqlen, chans), r(chans, ksize), r(chans)
    reset = torch.zeros(bsz, seqlen, dtype=torch.bool)
    reset[0, 2] = reset[1, 5] = True
    return [(x, w, b, r(bsz, chans, ksize - 1), reset, "silu"), (x, w, None, None, None, "silu"),
            (x, w, b, r(bsz, chans, ksize - 1), None, "none")]  # fmt: skip


def _triton_forward(x, weight, bias, initial_state, reset, activation="silu"):
    from longhorn_zoo.plugins.selective_scan.conv_triton import MAX_K, conv_fwd

    check_conv_args(x, weight, bias, initial_state, reset, activation)
    if weight.shape[1] > MAX_K:  # no kernel: the reference, on the GPU
        return causal_conv1d_reference(x, weight, bias, initial_state, reset, activation)
    return conv_fwd(x, weight, bias, initial_state, reset, activation)


def _triton_backward(
    inputs: tuple[Any, ...], outputs: tuple[Tensor, ...], grads: tuple[Tensor | None, ...]
) -> tuple[Tensor | None, ...]:
    """Gradients of (x, weight, bias, initial_state, reset, activation) from those of (y, final_state)."""
    from longhorn_zoo.plugins.selective_scan.conv_triton import MAX_K, conv_bwd

    x, weight, bias, initial_state, reset, activation = inputs
    dy, d_final = grads
    dy = torch.zeros_like(outputs[0]) if dy is None else dy
    if weight.shape[1] > MAX_K:  # no kernel: autograd through the reference, as the forward ran it
        return _reference_backward(inputs, dy, d_final)
    dx, dw, db, ds0 = conv_bwd(x, weight, bias, initial_state, reset, activation, dy, d_final)
    return dx, dw, (None if bias is None else db), (None if initial_state is None else ds0), None, None


def _reference_backward(inputs: tuple[Any, ...], dy: Tensor, d_final: Tensor | None) -> tuple[Tensor | None, ...]:
    """The backward of :func:`causal_conv1d_reference` by autograd, in the op's gradient order."""
    x, weight, bias, initial_state, reset, activation = inputs
    leaves = [None if t is None else t.detach().requires_grad_() for t in (x, weight, bias, initial_state)]
    with torch.enable_grad():
        y, final = causal_conv1d_reference(*leaves, reset, activation)
        outs, out_grads = [y], [dy]
        if d_final is not None:
            outs.append(final)
            out_grads.append(d_final)
        present = [t for t in leaves if t is not None]
        got = iter(torch.autograd.grad(outs, present, out_grads, allow_unused=True))
    grads = [None if t is None else next(got) for t in leaves]
    grads = [g if g is not None or t is None else torch.zeros_like(t) for g, t in zip(grads, leaves)]
    return (*grads, None, None)


TRITON_BACKEND = Backend(name="triton", device_type="cuda", is_available=triton_available,
                         forward=_triton_forward, backward=_triton_backward)  # fmt: skip
"""The Triton kernels of :mod:`.conv_triton`, for CUDA tensors."""

causal_conv1d = define_scan_op("longhorn_zoo::causal_conv1d", causal_conv1d_reference, _causal_conv1d_fake,
                               example_inputs=_causal_conv1d_examples)  # fmt: skip
causal_conv1d.register_backend(TRITON_BACKEND)
