"""The selective-scan cases of the op benchmark (run them with ``python -m benchmarks.ops``).

Longhorn and Mamba have CUDA kernels in ``csrc/``; both are timed at the channels and state size of
a 1.3B model's layer (D_inner = 4096, N = 16). This module gives what :class:`benchmarks.ops.OpCase`
needs for each: an input builder, the bytes the op must move and a sweep of the kernels' launch
settings (``longhorn_zoo.plugins.selective_scan.cuda.TUNING``).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

CHANNELS, STATE = 4096, 16
SHAPES = [(4, 2048), (1, 8192), (1, 16384), (1, 2048)]  # (B, T) at D_inner = 4096, N = 16


def _randn(gen: torch.Generator, *shape: int, scale: float = 1.0, shift: float = 0.0) -> Tensor:
    return torch.randn(*shape, generator=gen, device=gen.device) * scale + shift


def _block_views(gen: torch.Generator, b: int, t: int, c: int, dtype: torch.dtype, k_scale: float,
                 dt_shift: float = 0.0) -> tuple[Tensor, ...]:  # fmt: skip
    """x, dt, z, k, q laid out as the selective-scan block passes them (plugins/selective_scan/block.py):
    x the convolution's contiguous (B, T, C) output, z the second half of in_proj's output,
    k and q slices of x_proj's output (after the dt rank), dt the contiguous dt_proj output."""
    x = _randn(gen, b, t, c).to(dtype)
    z = _randn(gen, b, t, 2 * c).to(dtype)[..., c:]
    dt = _randn(gen, b, t, c, shift=dt_shift).to(dtype)
    rank = c // 32
    proj = _randn(gen, b, t, rank + 2 * STATE, scale=k_scale).to(dtype)
    k, q = proj[..., rank : rank + STATE], proj[..., rank + STATE :]
    return x, dt, z, k, q


def longhorn_inputs(b: int, t: int, dtype: torch.dtype, gen: torch.Generator, c: int) -> list:
    x, dt, z, k, q = _block_views(gen, b, t, c, dtype, k_scale=0.3)
    reset = torch.rand(b, t, generator=gen, device=gen.device) < 1e-3
    return [x, dt, k, q, _randn(gen, c), z, _randn(gen, b, c, STATE), reset]


def mamba_inputs(b: int, t: int, dtype: torch.dtype, gen: torch.Generator, c: int) -> list:
    x, dt, z, B, C = _block_views(gen, b, t, c, dtype, k_scale=0.5, dt_shift=-3.0)
    A = -torch.exp(torch.rand(c, STATE, generator=gen, device=gen.device) * 2.8)
    reset = torch.rand(b, t, generator=gen, device=gen.device) < 1e-3
    return [x, dt, A, B, C, _randn(gen, c), z, _randn(gen, b, c, STATE), reset]


def floor_bytes(args: list) -> tuple[float, float]:
    """x, dt, z read and y written forward; x, dt, z, dy read and dx, ddt, dz written backward."""
    x, initial_state = args[0], args[-2]
    big = x.numel() * x.element_size()  # one (B, T, C) tensor
    small = 2 * x.shape[0] * x.shape[1] * initial_state.shape[-1] * x.element_size()  # the two (B, T, N) vectors
    fwd = 4 * big + small
    return fwd, fwd + 7 * big + 2 * small


def sweep(b: int, t: int) -> Iterator[str]:
    """Applies each launch shape of the CUDA backend's TUNING in turn, yielding its label; restores it."""
    from longhorn_zoo.plugins.selective_scan import cuda as ss

    saved = dict(ss.TUNING)
    try:
        settings = [(4, fwd_blocks, 4.0, 1) for fwd_blocks in (1.0, 2.0, 4.0, 8.0, 16.0)]
        settings += [(2, fwd_blocks, 4.0, 1) for fwd_blocks in (2.0, 8.0)]
        # the backward in 1 and 4 chunks at B x C = 4 x 4096 (the default, 4 blocks/SM, makes 2 of 64-channel blocks)
        settings += [(4, 4.0, bwd_blocks, 1) for bwd_blocks in (2.0, 8.0)]
        # the default's chunks with a summary pass in the backward instead of the forward's entry states
        settings += [(0, 4.0, 4.0, 0)]
        for lanes, fwd_blocks, bwd_blocks, entry in settings:
            ss.TUNING.update(fwd_lanes=lanes, fwd_blocks_per_sm=fwd_blocks, bwd_blocks_per_sm=bwd_blocks,
                             entry_states=entry)
            chunks = ss.chunk_lengths(b, t, CHANNELS)
            yield (f"fwd_lanes {lanes} fwd_blocks/SM {fwd_blocks:.0f} bwd_blocks/SM {bwd_blocks:.0f} "
                   f"entry_states {entry} chunks {chunks}")
    finally:
        ss.TUNING.clear()
        ss.TUNING.update(saved)
