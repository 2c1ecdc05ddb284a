"""The causal-conv case of the op benchmark (run it with ``python -m benchmarks.ops --ops conv``).

``causal_conv1d`` (``plugins/selective_scan/conv.py``) is the selective-scan block's depthwise conv
and SiLU, timed at a 1.3B layer's width (E = d_inner = 4096, K = 4). This module gives what
:class:`benchmarks.ops.OpCase` needs: an input builder, the bytes the op must move, PyTorch's
``F.conv1d`` as the block called it before (the peer) and a sweep over the Triton kernels' configs
(channels and warps a program).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from itertools import product

import torch
import torch.nn.functional as F
from torch import Tensor

CHANNELS, KERNEL = 4096, 4
SHAPES = [(8, 2048), (4, 2048), (1, 8192)]
"""(B, T) timed; B = 8, T = 2048 is the 1.3B training step of issue 20."""
TARGET_US = 20e3 / 48
"""Forward plus backward target at B = 8, T = 2048: 20 ms for the 48 layers of the 1.3B step."""


def inputs(b: int, t: int, dtype: torch.dtype, gen: torch.Generator, chans: int) -> list:
    """``causal_conv1d``'s arguments as the block passes them in training: x the first half of in_proj's
    (B, T, 2E) output (row stride 2E, read in place), weight (E, K), bias, no initial state and no resets
    (``tests/test_causal_conv.py`` checks those paths on the GPU)."""

    def randn(*shape: int, scale: float = 1.0) -> Tensor:
        return (torch.randn(*shape, generator=gen, device=gen.device) * scale).to(dtype)

    x = randn(b, t, 2 * chans)[..., :chans]
    return [x, randn(chans, KERNEL, scale=KERNEL**-0.5), randn(chans), None, None, "silu"]


def floor_bytes(args: list) -> tuple[float, float]:
    """x read and y written forward; x and dy read and dx written backward (the weights are negligible)."""
    x = args[0]
    big = x.numel() * x.element_size()
    return 2 * big, 5 * big


def conv1d_peer() -> Callable[..., tuple[Tensor, Tensor]]:
    """PyTorch's depthwise conv as the block called it before the op: ``torch.cat`` of the state, then
    ``F.conv1d(groups=E)`` and SiLU on the (B, E, T) transpose; it ignores ``reset``."""

    def conv(x: Tensor, weight: Tensor, bias: Tensor | None, initial_state: Tensor | None, reset: Tensor | None,
             activation: str) -> tuple[Tensor, Tensor]:  # fmt: skip
        bsz, seqlen, chans = x.shape
        km1 = weight.shape[1] - 1
        prev = x.new_zeros(bsz, chans, km1) if initial_state is None else initial_state.to(x.dtype)
        xt = torch.cat([prev, x.transpose(1, 2)], dim=-1)
        y = F.conv1d(xt, weight.unsqueeze(1), bias, groups=chans)
        y = F.silu(y) if activation == "silu" else y
        return y.transpose(1, 2), xt[..., seqlen:]

    return conv


def sweep(b: int, t: int) -> Iterator[str]:
    """Pins the Triton kernels to each (forward, backward) config in turn, yielding its label; restores them."""
    from longhorn_zoo.plugins.selective_scan import conv_triton as ct

    for fwd, bwd in product(ct.FWD_CONFIGS, ct.BWD_CONFIGS):
        with ct.use_configs([fwd], [bwd]):
            yield f"fwd (BE, warps) {fwd} bwd {bwd}"
