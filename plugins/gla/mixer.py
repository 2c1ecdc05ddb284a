"""The GLA mixer: linear attention with a data-dependent, per-key forget gate.

Per head (Yang et al. 2023, "Gated Linear Attention Transformers with
Hardware-Efficient Training", arXiv 2312.06635):

    q, k, v, g = W_q x, W_k x, W_v x, W_g x                 # K = expand_k D, V = expand_v D
    log a_t    = max(logsigmoid(W_2 W_1 x_t + b) / 16, -5)  # low rank 16, a_t in (0, 1)^K
    S_t        = diag(a_t) S_{t-1} + k_t v_t^T,   o_t = q_t^T S_t / sqrt(K / H)
    y          = W_o (HeadRMSNorm(o) * SiLU(g))

The state is ``(None, S)``: GLA has no token shift, S is (B, H, K/H, V/H).
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from longhorn_zoo.hookspecs import MixerArgs
from longhorn_zoo.plugins.linear_attention.layer import Features, LinearAttention, bounded_log_decay, expanded_dims


class GLA(LinearAttention):
    def __init__(self, args: MixerArgs) -> None:
        o = args.options
        key_dim, value_dim = expanded_dims(args)
        super().__init__(args.dim, int(o["n_heads"]), key_dim, value_dim, args.n_layers,
                         short_conv=int(o["short_conv"]))
        self.in_proj = nn.Linear(args.dim, 2 * self.key_dim + 2 * self.value_dim, bias=False)
        self.gk_down = nn.Linear(args.dim, int(o["gate_low_rank"]), bias=False)
        self.gk_up = nn.Linear(int(o["gate_low_rank"]), self.key_dim, bias=True)
        self.gate_logit_normalizer = float(o["gate_logit_normalizer"])

    def features(self, x: Tensor, context: Any, reset: Tensor | None) -> Features:
        q, k, v, g = self.in_proj(x).split([self.key_dim, self.key_dim, self.value_dim, self.value_dim], dim=-1)
        log_decay = bounded_log_decay(F.logsigmoid(self.gk_up(self.gk_down(x)).float()) / self.gate_logit_normalizer)
        return Features(self.heads(q), self.heads(k), self.heads(v), self.heads(log_decay), g, None)

    def init_features(self) -> None:
        nn.init.trunc_normal_(self.in_proj.weight, std=0.02)
        nn.init.trunc_normal_(self.gk_down.weight, std=0.02)
        nn.init.trunc_normal_(self.gk_up.weight, std=0.02)
        nn.init.zeros_(self.gk_up.bias)  # a = sigmoid(0) ** (1/16) ~ 0.96 at init
