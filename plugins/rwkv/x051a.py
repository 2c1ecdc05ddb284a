"""The rwkv5 mixer: RWKV "x051a", the seed's RWKV (the official Longhorn repo's ``models/rwkv.py``,
from BlinkDL's nanoRWKV), an RWKV-5-like block with a fixed decay and bonus per head.

Per block, on the residual stream x, with x_{t-1} by token shift and fixed lerps mu:

    a      = LN_1(x)
    r, k, v, g = W_c (a_t + (a_{t-1} - a_t) mu_c)              c in r, k, v, g
    o_t    = r_t^T (S_{t-1} + u_h k_t v_t^T),   S_t = w_h S_{t-1} + k_t v_t^T,   w_h = exp(-exp(d_h))
    h      = W_o (GroupNorm_H(o) * SiLU(g))                   # LayerNorm per head, weight and bias
    b      = LN_2(x + h)
    c      = sigmoid(W_r' b_r) * W_v' relu(W_k' b_k)^2         # the channel mix, 3 dim wide
    x     <- x + h + c

The module takes the residual stream itself (``residual_input``: the block applies no
norm) and returns h + c, so a block computes exactly the seed's. The model adds a learned
position embedding and ends with a LayerNorm (this plugin's ``[model]`` defaults). The
decay w_h and bonus u_h are one number per head; the log decay is clamped at -2.5 per
step (the Triton backend's range for a per-head decay; the seed's init spans -0.37 to
-0.0025). Init as the seed's: linear weights normal with std 0.02, W_o with
0.02 / sqrt(2 n_layers).

The state is ``((a_{t-1}, None, S), b_{t-1})``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from longhorn_zoo.hookspecs import MixerArgs
from longhorn_zoo.plugins.linear_attention.layer import (
    MIN_LOG_DECAY_PER_HEAD,
    Features,
    LinearAttention,
    RecurrentMixer,
    assign_,
    bounded_log_decay,
    token_shift,
)
from longhorn_zoo.plugins.rwkv.mixer import ChannelMix, layer_ratios

GROUP_NORM_EPS = 64e-5  # the seed's GroupNorm eps, (1e-5) * 64


class TimeMixX051a(LinearAttention):
    """The x051a time mix: fixed token-shift lerps, a decay and a bonus per head, a GroupNorm per head."""

    def __init__(self, args: MixerArgs) -> None:
        head_size = int(args.options["head_size"])
        if args.dim % head_size:
            raise ValueError(f"rwkv5: dim {args.dim} is not a multiple of model.mixer.head_size {head_size}")
        n_heads = args.dim // head_size
        super().__init__(args.dim, n_heads, args.dim, args.dim, args.n_layers, scale=1.0, head_norm="groupnorm",
                         head_norm_eps=GROUP_NORM_EPS)
        self.args = args
        self.mu = nn.Parameter(torch.empty(4, args.dim))  # r, k, v, g
        self.in_proj = nn.Linear(args.dim, 4 * args.dim, bias=False)  # W_r, W_k, W_v, W_g stacked
        self.decay_base = nn.Parameter(torch.empty(n_heads, 1))  # the seed's time_decay
        self.bonus = nn.Parameter(torch.empty(n_heads, 1))  # the seed's time_faaaa

    def scan_bonus(self) -> Tensor:
        return self.bonus.expand(-1, self.head_k).contiguous()

    def features(self, x: Tensor, last: Tensor | None, reset: Tensor | None) -> Features:
        shifted, last = token_shift(x, last, reset)
        mixed = x + (shifted - x) * self.mu[:, None, None]  # (4, B, T, D)
        w = self.in_proj.weight.view(4, -1, x.shape[-1])
        r, k, v, g = (F.linear(mixed[i], w[i]) for i in range(4))
        log_decay = bounded_log_decay(-torch.exp(self.decay_base.float()).flatten(), MIN_LOG_DECAY_PER_HEAD)
        return Features(self.heads(r), self.heads(k), self.heads(v), log_decay, g, last)

    def init_features(self) -> None:
        r0, r1 = layer_ratios(self.args)
        ddd = torch.arange(self.args.dim, dtype=torch.float32) / self.args.dim
        assign_(self.mu, torch.stack([1 - ddd ** (0.5 * r1), 1 - ddd**r1, 1 - (ddd**r1 + 0.3 * r0),
                                      1 - ddd ** (0.5 * r1)]))
        h = torch.arange(self.n_heads, dtype=torch.float32) / max(self.n_heads - 1, 1)
        assign_(self.decay_base, (-6 + 5 * h ** (0.7 + 1.3 * r0)).unsqueeze(-1))
        assign_(self.bonus, (r0 * (1 - h)).unsqueeze(-1))
        nn.init.normal_(self.in_proj.weight, std=0.02)


class RWKV5(RecurrentMixer):
    """LN_1, the time mix, LN_2 on x + h, the channel mix (see the module docstring)."""

    residual_input = True

    def __init__(self, args: MixerArgs) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(args.dim, eps=1e-5, bias=False)
        self.time_mix = TimeMixX051a(args)
        self.ln_2 = nn.LayerNorm(args.dim, eps=1e-5, bias=False)
        self.channel_mix = ChannelMix(args)

    def mix(self, x: Tensor, state: Any, recurrent: bool, reset: Tensor | None = None) -> tuple[Tensor, Any]:
        tm_state, cm_last = (None, None) if state is None else state
        h, tm_state = self.time_mix.mix(self.ln_1(x), tm_state, recurrent, reset)
        c, cm_last = self.channel_mix(self.ln_2(x + h), cm_last, reset)
        return h + c, (tm_state, cm_last)

    @torch.no_grad()
    def init_weights(self) -> None:
        self.ln_1.reset_parameters()
        self.time_mix.init_weights()
        self.ln_2.reset_parameters()
        self.channel_mix.init_weights()
