"""Forward and backward custom ops of the causal depthwise conv, on the Triton kernels of
:mod:`.conv_triton_kernels`.

``longhorn_zoo::causal_conv1d_fwd`` and ``longhorn_zoo::causal_conv1d_bwd`` are
``torch.library.triton_op`` ops, so under ``torch.compile`` Inductor sees the kernels and there is
no graph break. Importing this module imports Triton; :mod:`.conv` does so only when the backend
runs. x and dy are read in place through their strides (the block's x is a slice of in_proj's
output, row stride 2E); only tiny tensors are copied (see :func:`_common`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import triton
from torch import Tensor
from torch.library import triton_op, wrap_triton

from longhorn_zoo.plugins.selective_scan import conv_triton_kernels as kern
from longhorn_zoo.plugins.selective_scan.conv_triton_kernels import MAX_K

__all__ = ["MAX_K", "conv_bwd", "conv_fwd", "use_configs"]

FWD_CONFIGS = [(128, 1), (256, 2), (512, 4)]
"""(BE channels, warps) the forward's autotuner tries (4 channels a thread). ptxas (sm_90, bf16): 94
registers, 137 with state and resets; no spills."""
BWD_CONFIGS = [(128, 1), (256, 2), (512, 4)]
"""(BE channels, warps) the backward's autotuner tries. ptxas (sm_90, bf16): 136 registers, 238 with
state and resets; no spills."""
CHUNK_MULTIPLE = 64
"""A program's chunk of steps is a multiple of this."""
MIN_PROGRAMS = 2048
"""Both kernels split time into chunks until about this many programs run (at 128 channels a program).
On the H200 at B = 8, T = 2048, E = 4096 that is chunks of 256 steps; ``python -m
benchmarks.conv_kernels --sweep`` times the others."""


def _autotuned(kernel, configs: list[tuple[int, int]]):
    return wrap_triton(triton.autotune(
        configs=[triton.Config({"BE": be}, num_warps=nw) for be, nw in configs],
        key=["E", "K", "HAS_RESET"],
    )(kernel))  # fmt: skip


_fwd = _autotuned(kern.conv_fwd_kernel, FWD_CONFIGS)
_bwd = _autotuned(kern.conv_bwd_kernel, BWD_CONFIGS)


@contextlib.contextmanager
def use_configs(fwd: list[tuple[int, int]], bwd: list[tuple[int, int]]) -> Iterator[None]:
    """Inside the block the kernels choose among these (BE, warps) configs only (one: no autotuning)."""
    global _fwd, _bwd
    saved = _fwd, _bwd
    _fwd, _bwd = _autotuned(kern.conv_fwd_kernel, fwd), _autotuned(kern.conv_bwd_kernel, bwd)
    try:
        yield
    finally:
        _fwd, _bwd = saved


def _chunk(bsz: int, seqlen: int, chans: int) -> int:
    """Steps per program: the fewest chunks that give about MIN_PROGRAMS programs."""
    per_chunk = bsz * triton.cdiv(chans, 128)
    nchunks = max(1, min(triton.cdiv(seqlen, CHUNK_MULTIPLE), triton.cdiv(MIN_PROGRAMS, per_chunk)))
    return CHUNK_MULTIPLE * triton.cdiv(triton.cdiv(seqlen, nchunks), CHUNK_MULTIPLE)


def _channels_last(t: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
    """A (B, E, K-1) state as a contiguous (B, K-1, E) copy (tiny), and the strides the kernels take for the
    state, (batch, channel, tap): the kernels then read a state row as they read an x row, vectorised."""
    c = t.transpose(1, 2).contiguous()
    return c, (c.stride(0), c.stride(2), c.stride(1))


def _common(x: Tensor, weight: Tensor, bias: Tensor | None, initial_state: Tensor | None,
            reset: Tensor | None, activation: str) -> tuple[list, dict]:  # fmt: skip
    """Pointer and stride arguments shared by both kernels (absent tensors stand in as x), and constexprs.

    x is read in place; the weight (as (K, E)) and the initial state (as (B, K-1, E)) are tiny copies with
    channels contiguous, and the reset mask a uint8 copy (Inductor cannot bitcast bool).
    """
    ksize = weight.shape[1]
    wt = weight.t().contiguous()
    r = None if reset is None else reset.to(torch.uint8).contiguous()
    s0, s0_strides = (x, (0, 0, 0)) if initial_state is None else _channels_last(initial_state)
    ptrs = [x, wt, x if bias is None else bias, s0, x if r is None else r]
    strides = [*x.stride(), *s0_strides, wt.stride(1), wt.stride(0)]
    meta = dict(K=ksize, SILU=activation == "silu", HAS_BIAS=bias is not None,
                HAS_STATE=initial_state is not None, HAS_RESET=reset is not None)  # fmt: skip
    return [ptrs, strides], meta


@triton_op("longhorn_zoo::causal_conv1d_fwd", mutates_args=())
def conv_fwd(x: Tensor, weight: Tensor, bias: Tensor | None, initial_state: Tensor | None,
             reset: Tensor | None, activation: str) -> tuple[Tensor, Tensor]:  # fmt: skip
    """y (B, T, E) and the final state (B, E, K-1), contiguous, in x's dtype."""
    bsz, seqlen, chans = x.shape
    y = x.new_empty(bsz, seqlen, chans)
    final = x.new_empty(bsz, chans, weight.shape[1] - 1)
    (ptrs, strides), meta = _common(x, weight, bias, initial_state, reset, activation)
    ct = _chunk(bsz, seqlen, chans)

    def grid(m: dict) -> tuple[int, int, int]:
        return triton.cdiv(chans, m["BE"]), triton.cdiv(seqlen, ct), bsz

    _fwd[grid](*ptrs, y, final, seqlen, chans, ct, *strides, **meta)
    return y, final


@triton_op("longhorn_zoo::causal_conv1d_bwd", mutates_args=())
def conv_bwd(
    x: Tensor, weight: Tensor, bias: Tensor | None, initial_state: Tensor | None, reset: Tensor | None,
    activation: str, dy: Tensor, d_final_state: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """dx (B, T, E) contiguous in x's dtype, d weight (E, K) and d bias (E,) in weight's dtype, and
    d initial_state (B, E, K-1) in x's dtype (zeros without an initial state)."""
    bsz, seqlen, chans = x.shape
    ksize = weight.shape[1]
    (ptrs, strides), meta = _common(x, weight, bias, initial_state, reset, activation)
    ct = _chunk(bsz, seqlen, chans)
    nchunks = triton.cdiv(seqlen, ct)
    dx = x.new_empty(bsz, seqlen, chans)
    ds0 = x.new_zeros(bsz, chans, ksize - 1, dtype=torch.float32)
    part = x.new_empty(bsz * nchunks, ksize + 1, chans, dtype=torch.float32)
    df, df_strides = (dy, (0, 0, 0)) if d_final_state is None else _channels_last(d_final_state)

    def grid(m: dict) -> tuple[int, int, int]:
        return triton.cdiv(chans, m["BE"]), nchunks, bsz

    _bwd[grid](*ptrs, dy, df, dx, ds0, part, seqlen, chans, ct, *strides, *dy.stride(),
               *df_strides, HAS_DST=d_final_state is not None, **meta)  # fmt: skip
    sums = part.sum(0)
    dw = sums[:ksize].t().contiguous().to(weight.dtype)
    db = sums[ksize].to(weight.dtype if bias is None else bias.dtype)
    return dx, dw, db, ds0.to(x.dtype if initial_state is None else initial_state.dtype)
