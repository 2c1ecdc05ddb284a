"""The module skeleton shared by the gla, retnet and rwkv mixers.

    x'   = SiLU(causal_conv1d(x))           if short_conv > 0    # optional, GLA/RetNet only
    q, k, v, log_decay, gate = features(x')                     # the mixer's own part
    o, S = linear_attn_scan(q, k, v, log_decay, u, scale, S)    # per head, state S (K, V)
    y    = W_o (HeadNorm(o) * SiLU(gate))

HeadNorm normalises each head's V channels, one of (``head_norm``):

    rmsnorm             RMSNorm with a learned weight per channel (fla's GLA, RWKV-6 here)
    rmsnorm_noaffine    RMSNorm without weights (the seed's RetNet)
    layernorm_noaffine  LayerNorm without weights (the seed's GLA)
    groupnorm           LayerNorm with a weight and a bias per channel (GroupNorm with one
                        group per head: RWKV)

The optional short convolution (``short_conv`` = kernel width) gives the features
the last few tokens, as the short convolutions used with GLA and RetNet on
associative recall do; the papers' layers have none (the default, 0).

The recurrent state is ``(context, window, S)``: ``context`` is what the mixer's
features need from the past (None for GLA, the position for RetNet's rotary, the
last token for RWKV's token shift), ``window`` the last ``short_conv - 1`` inputs
(B, D, short_conv - 1) or None, and S is (B, H, K, V) in float32.

With document starts (``reset``), the scan zeroes S, the short conv and the token
shift see zeros instead of an earlier document's tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from longhorn_zoo.hookspecs import MixerArgs
from longhorn_zoo.plugins.linear_attention.ops import linear_attn_scan, linear_attn_step
from longhorn_zoo.plugins.selective_scan.conv import causal_conv1d


class Features(NamedTuple):
    """What a mixer's projections give the scan: q, k (B, T, H, K), v (B, T, H, V), the log decay
    ((B, T, H, K) or (H,)), the output gate (B, T, H * V) and the context for the next call."""

    q: Tensor
    k: Tensor
    v: Tensor
    log_decay: Tensor
    gate: Tensor
    context: Any


class RecurrentMixer(nn.Module):
    """``forward`` and ``step`` of the mixer contract, both from one ``mix(x, state, recurrent)``."""

    def mix(self, x: Tensor, state: Any, recurrent: bool, reset: Tensor | None = None) -> tuple[Tensor, Any]:
        """(B, T, D) to (B, T, D) and the new state; ``recurrent`` (T = 1) uses the single-step op;
        ``reset`` (B, T) marks document starts."""
        raise NotImplementedError

    def forward(self, x: Tensor, state: Any = None, *, return_state: bool = False,
                reset: Tensor | None = None) -> Any:
        y, state = self.mix(x, state, recurrent=False, reset=reset)
        return (y, state) if return_state else y

    def step(self, x: Tensor, state: Any) -> tuple[Tensor, Any]:
        y, state = self.mix(x.unsqueeze(1), state, recurrent=True)
        return y.squeeze(1), state


def expanded_dims(args: MixerArgs) -> tuple[int, int]:
    """(key dim, value dim) = (expand_k, expand_v) x dim, from the mixer options (GLA, RetNet)."""
    o = args.options
    return int(float(o["expand_k"]) * args.dim), int(float(o["expand_v"]) * args.dim)


HEAD_NORMS = ("rmsnorm", "rmsnorm_noaffine", "layernorm_noaffine", "groupnorm")


class LinearAttention(RecurrentMixer):
    """Base of the three mixers: subclasses define :meth:`features`, :meth:`init_features`,
    ``scale`` and, for RWKV, the ``bonus`` parameter (see :meth:`scan_bonus`).

    ``out_std`` is the std of W_o at init: 0.02 / sqrt(2 n_layers) unless the subclass sets it.
    """

    def __init__(self, dim: int, n_heads: int, key_dim: int, value_dim: int, n_layers: int,
                 scale: float | None = None, short_conv: int = 0, head_norm: str = "rmsnorm",
                 head_norm_eps: float = 1e-5) -> None:
        super().__init__()
        if key_dim % n_heads or value_dim % n_heads:
            raise ValueError(f"key dim {key_dim} and value dim {value_dim} must be multiples of n_heads {n_heads}")
        if head_norm not in HEAD_NORMS:
            raise ValueError(f"model.mixer.head_norm = {head_norm!r}; choose one of {', '.join(HEAD_NORMS)}")
        self.key_dim, self.value_dim = key_dim, value_dim
        self.n_heads, self.head_k, self.head_v = n_heads, key_dim // n_heads, value_dim // n_heads
        self.scale = self.head_k**-0.5 if scale is None else scale
        self.register_parameter("bonus", None)
        self.head_norm, self.head_norm_eps = head_norm, head_norm_eps
        affine = head_norm in ("rmsnorm", "groupnorm")
        self.norm_weight = nn.Parameter(torch.empty(value_dim)) if affine else None
        self.norm_bias = nn.Parameter(torch.empty(value_dim)) if head_norm == "groupnorm" else None
        self.o_proj = nn.Linear(value_dim, dim, bias=False)
        self.short_conv = short_conv
        if short_conv > 0:
            self.conv = nn.Conv1d(dim, dim, short_conv, groups=dim, bias=True)
        self.out_std = 0.02 / math.sqrt(2 * n_layers)

    def features(self, x: Tensor, context: Any, reset: Tensor | None) -> Features:
        """q, k, v, decay and gate of x (B, T, D); ``reset`` for features that look back (token shift)."""
        raise NotImplementedError

    def init_features(self) -> None:
        """Initialise the subclass's own parameters."""
        raise NotImplementedError

    def heads(self, x: Tensor) -> Tensor:
        """(B, T, H * X) as (B, T, H, X)."""
        return x.unflatten(-1, (self.n_heads, -1))

    def scan_bonus(self) -> Tensor | None:
        """The bonus u (H, K/H) the scan gets, or None (no bonus)."""
        return self.bonus

    def normalize_heads(self, o: Tensor) -> Tensor:
        """HeadNorm of o (B, T, H, V/H), flattened to (B, T, V)."""
        shape = (self.head_v,)
        if self.head_norm.startswith("rmsnorm"):
            o = F.rms_norm(o, shape, eps=self.head_norm_eps)
        else:
            o = F.layer_norm(o, shape, eps=self.head_norm_eps)
        o = o.flatten(2)
        if self.norm_weight is not None:
            o = o * self.norm_weight
        if self.norm_bias is not None:
            o = o + self.norm_bias
        return o

    def convolve(self, x: Tensor, window: Tensor | None, reset: Tensor | None) -> tuple[Tensor, Tensor]:
        """SiLU of the causal depthwise conv of x (B, T, D), continuing ``window``; and the new window."""
        return causal_conv1d(x, self.conv.weight.squeeze(1), self.conv.bias, window, reset, "silu")

    def mix(self, x: Tensor, state: tuple[Any, Any, Tensor] | None, recurrent: bool,
            reset: Tensor | None = None) -> tuple[Tensor, tuple[Any, Any, Tensor]]:
        context, window, s = (None, None, None) if state is None else state
        if self.short_conv > 0:
            x, window = self.convolve(x, window, reset)
        f = self.features(x, context, reset)
        if recurrent:
            if s is None:
                cd = torch.float64 if x.dtype == torch.float64 else torch.float32
                s = x.new_zeros(x.shape[0], self.n_heads, self.head_k, self.head_v, dtype=cd)
            g = f.log_decay[:, 0] if f.log_decay.dim() == 4 else f.log_decay
            o, s = linear_attn_step(f.q[:, 0], f.k[:, 0], f.v[:, 0], g, self.scan_bonus(), self.scale, s)
            o = o.unsqueeze(1)
        else:
            o, s = linear_attn_scan(f.q, f.k, f.v, f.log_decay, self.scan_bonus(), self.scale, s, reset)
        return self.o_proj(self.normalize_heads(o) * F.silu(f.gate)), (f.context, window, s)

    @torch.no_grad()
    def init_weights(self) -> None:
        if self.norm_weight is not None:
            nn.init.ones_(self.norm_weight)
        if self.norm_bias is not None:
            nn.init.zeros_(self.norm_bias)
        nn.init.normal_(self.o_proj.weight, std=self.out_std)
        if self.short_conv > 0:
            self.conv.reset_parameters()
        self.init_features()

    def scan_flops_per_token(self) -> float:
        """State update and readout: about 4 flops per state element per token."""
        return 4.0 * self.n_heads * self.head_k * self.head_v


def flops_per_token(build: Callable[[MixerArgs], nn.Module]) -> Callable[[MixerArgs, int], float]:
    """A ``MixerSpec.flops_per_token`` for ``build``: 2 x the layer's weights plus its scan."""

    def count(args: MixerArgs, seq_len: int) -> float:
        with torch.device("meta"):
            mixer = build(args)
        attn = next(m for m in mixer.modules() if isinstance(m, LinearAttention))
        return 2.0 * sum(p.numel() for p in mixer.parameters()) + attn.scan_flops_per_token()

    return count


# Mixers whose decay is unbounded (RWKV's -exp(d), GLA's logsigmoid) clamp it here, in the model, at a
# decay factor of e^-5 = 0.0067 a step, so that every backend computes the same function and the
# models trained with the clamp keep it. No backend needs the clamp to be exact: the reference and the
# Triton kernels are exact at any log decay <= 0 (see triton_chunk.py). The Triton kernels factor a
# chunk's pair weights around its middle step while half a chunk's log decay stays above -60
# (triton_chunk_ops.EXP_LIMIT) and redo a chunk past that with each weight formed on its own, exact
# but slower; at the clamp, half a chunk of 32 sums to -80, so chunks that sit at it take that path.
MIN_LOG_DECAY = -5.0
# A decay per head runs in chunks of 64: half the floor per step, the same -80 over half a chunk.
MIN_LOG_DECAY_PER_HEAD = -2.5


def bounded_log_decay(log_decay: Tensor, floor: float = MIN_LOG_DECAY) -> Tensor:
    """``log_decay`` clamped below at ``floor`` (:data:`MIN_LOG_DECAY`; no gradient where clamped)."""
    return log_decay.clamp(min=floor)


def assign_(param: Tensor, value: Tensor) -> None:
    """``param.copy_(value)`` for a value computed in full on every rank, also when ``param`` is an
    FSDP-sharded DTensor (each rank keeps its own shard of ``value``; no communication)."""
    value = value.to(device=param.device, dtype=param.dtype)
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        value = distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)
    param.copy_(value)


def init_rows_(param: Tensor, parts: list[tuple[int, Callable[[Tensor], Any]]]) -> None:
    """Initialise consecutive row blocks of ``param`` differently: ``parts`` is (rows, in-place init) in order.

    The whole tensor is drawn on every rank from torch's global generator (seeded alike) and
    assigned with :func:`assign_`, so it works on FSDP-sharded parameters too.
    """
    if sum(rows for rows, _ in parts) != param.shape[0]:
        raise ValueError(f"init_rows_: the parts cover {sum(r for r, _ in parts)} rows of {param.shape[0]}")
    full = torch.empty(param.shape, dtype=torch.float32)
    for block, (_, init) in zip(full.split([rows for rows, _ in parts]), parts):
        init(block)
    assign_(param, full)


def token_shift(x: Tensor, last: Tensor | None, reset: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """x_{t-1} for every t of x (B, T, D), starting from ``last`` (B, D) or zeros, and zero where a
    document starts at t (``reset``); and x's last token."""
    first = x.new_zeros(x.shape[0], 1, x.shape[2]) if last is None else last.unsqueeze(1).to(x.dtype)
    shifted = torch.cat([first, x[:, :-1]], dim=1)
    if reset is not None:
        shifted = shifted.masked_fill(reset.unsqueeze(-1), 0.0)
    return shifted, x[:, -1]
