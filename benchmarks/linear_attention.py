"""The linear-attention and attention cases of the op benchmark (run them with ``python -m benchmarks.ops``).

GLA, RetNet and RWKV-6 share one scan op, ``linear_attn_scan`` (``plugins/linear_attention/ops.py``),
with a Triton backend. The variants differ in the decay (per token and key for GLA and RWKV-6, one fixed
value per head for RetNet) and in the bonus (RWKV-6). For each variant this module gives what
:class:`benchmarks.ops.OpCase` needs: an input builder, the bytes the op must move, fla's chunk op
for comparison and a sweep of the Triton chunk size and warps. Causal SDPA is the attention the
linear mixers are measured against.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

SHAPES = [(4, 2048), (1, 8192), (1, 16384)]
"""(B, T) timed: 8192 tokens a batch, but B = 1 at T = 16384."""
SDPA_HEADS, SDPA_HEAD_DIM = 16, 128


@dataclass(frozen=True)
class Variant:
    """One mixer's use of ``linear_attn_scan``.

    Attributes:
        name: The mixer (``--ops`` name).
        heads: H at the benchmark shape.
        head_dim: K = V.
        per_key: Decay per token and key (GLA, RWKV-6); else one fixed decay per head (RetNet).
        bonus: Has RWKV-6's bonus u for the current token.
        target_us: Forward plus backward target at B = 4, T = 2048 (issue 8).
        sweep: (chunk, warps of the per-chunk kernels) settings of ``--sweep``, the default first.
    """

    name: str
    heads: int
    head_dim: int
    per_key: bool
    bonus: bool
    target_us: float
    sweep: tuple[tuple[int, int], ...]


VARIANTS = {
    "gla": Variant("gla", 16, 128, True, False, 1900.0, ((32, 4), (32, 8), (64, 4), (64, 8))),
    "retnet": Variant("retnet", 16, 128, False, False, 1300.0, ((64, 4), (64, 8), (32, 4))),
    "rwkv": Variant("rwkv", 32, 64, True, True, 1800.0, ((32, 4), (32, 8), (64, 4), (64, 8))),
}


def inputs(variant: Variant, b: int, t: int, dtype: torch.dtype, gen: torch.Generator, heads: int) -> list:
    """``linear_attn_scan``'s arguments on the generator's device, as the mixer passes them.

    q, k, v in ``dtype``; the log decay in float32 (GLA and RWKV-6 compute it in float32; RetNet's
    fixed log(1 - 2^(-5 - h)), which fla's retention uses too); a float32 bonus; scale K^-1/2; an
    initial state (float32), so its gradient is checked too; no resets (fla's chunk ops take none).
    """
    d = variant.head_dim

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, device=gen.device)

    q, k, v = (randn(b, t, heads, d).to(dtype) for _ in range(3))
    if variant.per_key:
        log_decay = F.logsigmoid(randn(b, t, heads, d) + 3.0)
    else:
        log_decay = torch.log1p(-torch.exp2(-5.0 - torch.arange(heads, device=gen.device, dtype=torch.float32)))
    bonus = randn(heads, d) if variant.bonus else None
    return [q, k, v, log_decay, bonus, d**-0.5, randn(b, heads, d, d), None]


def floor_bytes(args: list) -> tuple[float, float]:
    """Forward: read q, k, v, log decay and the initial state, write o and the final state. The backward
    adds: read q, k, v, log decay, do and d final state, write dq, dk, dv, d log decay and d initial state."""
    q, k, v, log_decay = args[:4]
    n = [x.numel() * x.element_size() for x in (q, k, v, log_decay)]
    b, _, h, dk = q.shape
    state = 2 * b * h * dk * v.shape[-1] * 4  # one float32 state read, one written
    fwd = sum(n) + n[2] + state
    return fwd, fwd + 2 * sum(n) + n[2] + state


def fla_op(variant: Variant) -> Callable[..., tuple[Tensor, Tensor]]:
    """fla's chunk op for the variant (fla 0.6, [B, T, H, K] layout), called with ``linear_attn_scan``'s
    arguments and returning (o, final state).

    Raises:
        ImportError: fla is not installed (or does not import).
    """
    if variant.name == "gla":
        from fla.ops.gla import chunk_gla

        def run(q, k, v, log_decay, bonus, scale, initial_state, reset):
            return chunk_gla(q, k, v, log_decay, scale=scale, initial_state=initial_state, output_final_state=True)

    elif variant.name == "retnet":
        from fla.ops.retention import chunk_retention

        def run(q, k, v, log_decay, bonus, scale, initial_state, reset):
            return chunk_retention(q, k, v, scale=scale, initial_state=initial_state, output_final_state=True)

    else:
        from fla.ops.rwkv6 import chunk_rwkv6

        def run(q, k, v, log_decay, bonus, scale, initial_state, reset):
            return chunk_rwkv6(
                q, k, v, log_decay, bonus, scale=scale, initial_state=initial_state, output_final_state=True
            )

    return run


def sweep(variant: Variant, b: int, t: int) -> Iterator[str]:
    """Applies each (chunk, warps) setting of the Triton kernels in turn, yielding its label; restores the defaults."""
    from longhorn_zoo.plugins.linear_attention import triton_chunk_ops as ops

    chunk_attr = "CHUNK_PER_KEY" if variant.per_key else "CHUNK_PER_HEAD"
    saved = getattr(ops, chunk_attr), ops.NUM_WARPS_CHUNK
    try:
        for chunk, warps in variant.sweep:
            setattr(ops, chunk_attr, chunk)
            ops.NUM_WARPS_CHUNK = warps
            yield f"chunk {chunk:2d} warps {warps}"
    finally:
        setattr(ops, chunk_attr, saved[0])
        ops.NUM_WARPS_CHUNK = saved[1]


def causal_sdpa(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor]:
    """Causal softmax attention, (B, H, T, D) -> ((B, H, T, D),): the comparison row."""
    return (F.scaled_dot_product_attention(q, k, v, is_causal=True),)


def sdpa_inputs(b: int, t: int, dtype: torch.dtype, gen: torch.Generator, heads: int) -> list:
    """q, k, v of :func:`causal_sdpa`, head dim 128, on the generator's device."""
    return [torch.randn(b, heads, t, SDPA_HEAD_DIM, generator=gen, device=gen.device).to(dtype) for _ in range(3)]


def sdpa_floor(args: list) -> tuple[float, float]:
    """Forward: read q, k, v, write o. Backward: read q, k, v, o, do, write dq, dk, dv."""
    n = args[0].numel() * args[0].element_size()
    return 4 * n, 12 * n
