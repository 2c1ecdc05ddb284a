"""The RetNet mixer: multi-scale retention, linear attention with a fixed decay per head.

Per head h of H (Sun et al. 2023, "Retentive Network", arXiv 2307.08621):

    q, k    = rope(W_q x, t), rope(W_k x, t)       # K = expand_k D
    v, g    = W_v x, W_g x                         # V = expand_v D
    S_t     = gamma_h S_{t-1} + k_t v_t^T,   o_t = q_t^T S_t / sqrt(K / H),   gamma_h = 1 - 2^(-5-h)
    y       = W_o (HeadRMSNorm(o) * SiLU(g))

Rotary positions are plain RoPE (RetNet's xPos without the length extrapolation
term), computed on the fly. The state is ``(position, S)``: the number of tokens
seen so far (for the rotary angles) and S (B, H, K/H, V/H).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from longhorn_zoo.hookspecs import MixerArgs
from longhorn_zoo.plugins.linear_attention.layer import Features, LinearAttention, expanded_dims
from longhorn_zoo.plugins.llama.attention import apply_rope


class RetNet(LinearAttention):
    def __init__(self, args: MixerArgs) -> None:
        o = args.options
        key_dim, value_dim = expanded_dims(args)
        super().__init__(args.dim, int(o["n_heads"]), key_dim, value_dim, args.n_layers,
                         short_conv=int(o["short_conv"]))
        self.rope_theta = float(o["rope_theta"])
        self.in_proj = nn.Linear(args.dim, 2 * key_dim + 2 * value_dim, bias=False)

    def features(self, x: Tensor, position: int | None, reset: Tensor | None) -> Features:
        past = position or 0
        q, k, v, g = self.in_proj(x).split([self.key_dim, self.key_dim, self.value_dim, self.value_dim], dim=-1)
        pos = torch.arange(past, past + x.shape[1], device=x.device)
        q, k = (apply_rope(self.heads(t).transpose(1, 2), pos, self.rope_theta).transpose(1, 2) for t in (q, k))
        heads = torch.arange(self.n_heads, device=x.device, dtype=torch.float32)
        log_decay = torch.log1p(-torch.exp2(-5.0 - heads))  # log gamma_h, (H,)
        return Features(q, k, self.heads(v), log_decay, g, past + x.shape[1])

    def init_features(self) -> None:
        nn.init.trunc_normal_(self.in_proj.weight, std=0.02)
