"""The GLA mixer: linear attention with a data-dependent, per-key forget gate.

Per head (Yang et al. 2023, "Gated Linear Attention Transformers with
Hardware-Efficient Training", arXiv 2312.06635), as the seed (the official Longhorn
repo's ``models/gla.py``) builds it:

    q, k, v, g = W_q x, W_k x, W_v x, W_g x + b_g           # K = expand_k D, V = expand_v D
    log a_t    = max(logsigmoid(W_2 W_1 x_t + b) / 16, -5)  # low rank 16, a_t in (0, 1)^K
    S_t        = diag(a_t) S_{t-1} + k_t v_t^T,   o_t = c q_t^T S_t
    y          = W_o (HeadNorm(o) * SiLU(g))

The seed's scale is c = 1 / sqrt(K/H x D/H): its fla kernel scales q by 1/sqrt(K/H) and
it scales k by 1/sqrt(D/H) itself (``qk_scale = "key_value"``; ``"key"`` is the paper's
1/sqrt(K/H)). Its head norm is a LayerNorm without weights, and W_g has a bias.
Initialisation as the seed's: W_q, W_k, W_1, W_2 Xavier-uniform with gain 2^-2.5,
everything else normal with std 0.02 (W_o included: no depth scaling), biases zero.

The state is ``(None, None, S)``: GLA has no token shift, S is (B, H, K/H, V/H).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from longhorn_zoo.hookspecs import MixerArgs
from longhorn_zoo.plugins.linear_attention.layer import (
    Features,
    LinearAttention,
    bounded_log_decay,
    expanded_dims,
    init_rows_,
)

QK_GAIN = 2**-2.5  # the seed's Xavier gain for W_q, W_k and the gate's low-rank pair


class GLA(LinearAttention):
    def __init__(self, args: MixerArgs) -> None:
        o = args.options
        key_dim, value_dim = expanded_dims(args)
        n_heads = int(o["n_heads"])
        if o["qk_scale"] not in ("key", "key_value"):
            raise ValueError(f"gla: model.mixer.qk_scale = {o['qk_scale']!r}; choose key or key_value")
        scale = (key_dim // n_heads) ** -0.5
        if o["qk_scale"] == "key_value":
            scale *= (args.dim / n_heads) ** -0.5
        super().__init__(args.dim, n_heads, key_dim, value_dim, args.n_layers, scale=scale,
                         short_conv=int(o["short_conv"]), head_norm=str(o["head_norm"]),
                         head_norm_eps=float(o["head_norm_eps"]))
        self.in_proj = nn.Linear(args.dim, 2 * self.key_dim + 2 * self.value_dim, bias=False)
        self.g_bias = nn.Parameter(torch.empty(self.value_dim)) if o["gate_bias"] else None
        self.gk_down = nn.Linear(args.dim, int(o["gate_low_rank"]), bias=False)
        self.gk_up = nn.Linear(int(o["gate_low_rank"]), self.key_dim, bias=True)
        self.gate_logit_normalizer = float(o["gate_logit_normalizer"])
        self.out_std = 0.02

    def features(self, x: Tensor, context: Any, reset: Tensor | None) -> Features:
        q, k, v, g = self.in_proj(x).split([self.key_dim, self.key_dim, self.value_dim, self.value_dim], dim=-1)
        if self.g_bias is not None:
            g = g + self.g_bias
        log_decay = bounded_log_decay(F.logsigmoid(self.gk_up(self.gk_down(x)).float()) / self.gate_logit_normalizer)
        return Features(self.heads(q), self.heads(k), self.heads(v), self.heads(log_decay), g, None)

    def init_features(self) -> None:
        def xavier(t: Tensor) -> None:
            nn.init.xavier_uniform_(t, gain=QK_GAIN)

        def normal(t: Tensor) -> None:
            nn.init.normal_(t, std=0.02)

        init_rows_(self.in_proj.weight, [(self.key_dim, xavier), (self.key_dim, xavier),
                                         (2 * self.value_dim, normal)])
        nn.init.xavier_uniform_(self.gk_down.weight, gain=QK_GAIN)
        nn.init.xavier_uniform_(self.gk_up.weight, gain=QK_GAIN)
        nn.init.zeros_(self.gk_up.bias)  # a = sigmoid(0) ** (1/16) ~ 0.96 at init
        if self.g_bias is not None:
            nn.init.zeros_(self.g_bias)
