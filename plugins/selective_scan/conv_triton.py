"""Forward and backward custom ops of the causal depthwise conv, on the Triton kernels of
:mod:`.conv_triton_kernels`.

``longhorn_zoo::causal_conv1d_fwd`` and ``longhorn_zoo::causal_conv1d_bwd`` are
``torch.library.triton_op`` ops, so under ``torch.compile`` Inductor sees the kernels and there is
no graph break. Importing this module imports Triton; :mod:`.conv` does so only when the backend
runs. x, dy and the states are read in place through their strides (the block's x is a slice of
in_proj's output, row stride 2E); nothing is copied but the (B, T) reset mask, as uint8.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import triton
from torch import Tensor
from torch.library import triton_op, wrap_triton

from longhorn_zoo.plugins.selective_scan import conv_triton_kernels as kern

FWD_CONFIGS = [(32, 128, 4), (64, 128, 4), (64, 256, 8)]
"""(BT steps, BE channels, warps) the forward's autotuner tries."""
BWD_CONFIGS = [(16, 128, 4), (32, 128, 8), (16, 256, 8), (8, 128, 4), (8, 256, 4), (16, 64, 2), (32, 64, 4)]
"""(BT steps, BE channels, warps) the backward's first pass tries; every BT divides CHUNK_MULTIPLE.
Its second pass (dx from g) tries the forward's."""
CHUNK_MULTIPLE = 64
"""The backward's chunk of steps per program is a multiple of this (so of every BT)."""
MIN_BWD_PROGRAMS = 8192
"""The backward's first pass splits time into chunks until about this many programs run (at 128 channels a
program): each program loops over its chunk, so short chunks keep more loads in flight."""


def _autotuned(kernel, configs: list[tuple[int, int, int]]):
    return wrap_triton(triton.autotune(
        configs=[triton.Config({"BT": bt, "BE": be}, num_warps=nw) for bt, be, nw in configs],
        key=["E", "K", "HAS_RESET"],
    )(kernel))  # fmt: skip


_fwd = _autotuned(kern.conv_fwd_kernel, FWD_CONFIGS)
_bwd_gate = _autotuned(kern.conv_bwd_gate_kernel, BWD_CONFIGS)
_bwd_input = _autotuned(kern.conv_bwd_input_kernel, FWD_CONFIGS)


@contextlib.contextmanager
def use_configs(fwd: list[tuple[int, int, int]], bwd: list[tuple[int, int, int]]) -> Iterator[None]:
    """Inside the block the kernels choose among these (BT, BE, warps) configs only (one: no autotuning).

    Every backward BT must divide :data:`CHUNK_MULTIPLE`.
    """
    global _fwd, _bwd_gate, _bwd_input
    saved = _fwd, _bwd_gate, _bwd_input
    _fwd, _bwd_gate, _bwd_input = (_autotuned(kern.conv_fwd_kernel, fwd), _autotuned(kern.conv_bwd_gate_kernel, bwd),
                                   _autotuned(kern.conv_bwd_input_kernel, fwd))
    try:
        yield
    finally:
        _fwd, _bwd_gate, _bwd_input = saved


def _pow2(n: int) -> int:
    """The smallest power of two >= max(n, 2)."""
    return max(2, 1 << (n - 1).bit_length())


def _chunk(bsz: int, seqlen: int, chans: int) -> int:
    """Steps per backward program: the fewest chunks that give about MIN_BWD_PROGRAMS programs."""
    per_chunk = bsz * triton.cdiv(chans, 128)
    nchunks = max(1, min(triton.cdiv(seqlen, CHUNK_MULTIPLE), triton.cdiv(MIN_BWD_PROGRAMS, per_chunk)))
    return CHUNK_MULTIPLE * triton.cdiv(triton.cdiv(seqlen, nchunks), CHUNK_MULTIPLE)


def _common(x: Tensor, weight: Tensor, bias: Tensor | None, initial_state: Tensor | None,
            reset: Tensor | None, activation: str) -> tuple[list, dict]:  # fmt: skip
    """Pointer and stride arguments shared by both kernels (absent tensors stand in as x), and constexprs."""
    ksize = weight.shape[1]
    r = None if reset is None else reset.to(torch.uint8).contiguous()  # a copy: Inductor cannot bitcast bool
    s0_strides = (0, 0, 0) if initial_state is None else initial_state.stride()
    s0 = x if initial_state is None else initial_state
    ptrs = [x, weight, x if bias is None else bias, s0, x if r is None else r]
    strides = [*x.stride(), *s0_strides, *weight.stride()]
    meta = dict(K=ksize, KP=_pow2(ksize - 1), SILU=activation == "silu", HAS_BIAS=bias is not None,
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

    def grid(m: dict) -> tuple[int, int, int]:
        return triton.cdiv(seqlen, m["BT"]), triton.cdiv(chans, m["BE"]), bsz

    _fwd[grid](*ptrs, y, final, seqlen, chans, *strides, **meta)
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
    df = d_final_state
    df_strides = (0, 0, 0) if df is None else df.stride()

    g = x.new_empty(bsz, seqlen, chans, dtype=torch.float32)
    x_ptrs, x_strides = ptrs[:5], strides

    def gate_grid(m: dict) -> tuple[int, int, int]:
        return triton.cdiv(chans, m["BE"]), nchunks, bsz

    def input_grid(m: dict) -> tuple[int, int, int]:
        return triton.cdiv(seqlen, m["BT"]), triton.cdiv(chans, m["BE"]), bsz

    _bwd_gate[gate_grid](*x_ptrs, dy, g, part, seqlen, chans, ct, *x_strides, *dy.stride(), KP2=_pow2(ksize),
                         **meta)  # fmt: skip
    _bwd_input[input_grid](ptrs[1], ptrs[4], g, dy if df is None else df, dx, ds0, seqlen, chans,
                           *weight.stride(), *df_strides, K=meta["K"], KP=meta["KP"], HAS_STATE=meta["HAS_STATE"],
                           HAS_RESET=meta["HAS_RESET"], HAS_DST=df is not None)  # fmt: skip
    sums = part.sum(0)
    dw = sums[:ksize].t().contiguous().to(weight.dtype)
    db = sums[ksize].to(weight.dtype if bias is None else bias.dtype)
    return dx, dw, db, ds0.to(x.dtype if initial_state is None else initial_state.dtype)
