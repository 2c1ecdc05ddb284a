"""The RetNet mixer: multi-scale retention, linear attention with a fixed decay per head.

Per head h of H (Sun et al. 2023, "Retentive Network", arXiv 2307.08621), as the seed
(the official Longhorn repo's ``models/retnet.py``, from torchscale) builds it:

    q, k    = rot(W_q x, t), rot(W_k x, t)         # K = expand_k D
    v, g    = W_v x, W_g x                         # V = expand_v D, rounded down to a multiple of H
    S_t     = gamma_h S_{t-1} + k_t v_t^T,   o_t = q_t^T S_t / sqrt(K / H),   gamma_h = 1 - 2^(-5-h)
    y       = W_o (HeadNorm(o) * SiLU(g))          # HeadNorm: RMSNorm without weights, eps 1e-6

The seed's defaults: V = 1.8 D and a GeGLU FFN as wide (``mlp_activation = "gelu"``),
norms with eps 1e-6, every weight normal with std 0.02 (no depth scaling).
``rotary = "retnet"`` is the seed's rotary: channel pairs (2i, 2i + 1) turn by t x
theta^(-i / (K/2H - 1)); ``"llama"`` is RoPE's split halves, theta^(-2i / (K/H)). The
seed's parallel form also divides each row of q k^T by the square root of its decay
sum and by its clamped |q k^T| sum; the head norm undoes both scalings (up to its eps),
so the recurrence here leaves them out. The state is ``(position, None, S)``: the
tokens seen so far (for the rotary angles) and S (B, H, K/H, V/H).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from longhorn_zoo.hookspecs import MixerArgs
from longhorn_zoo.plugins.linear_attention.layer import Features, LinearAttention, expanded_dims
from longhorn_zoo.plugins.llama.attention import apply_rope

ROTARY = ("retnet", "llama")


def retnet_rotary(x: Tensor, pos: Tensor, theta: float) -> Tensor:
    """Turn channel pairs (2i, 2i + 1) of x (B, T, H, d) by pos * theta^(-i / (d/2 - 1)) (torchscale's rotary)."""
    d = x.shape[-1]
    inv_freq = theta ** -torch.linspace(0, 1, d // 2, device=x.device, dtype=torch.float32)
    ang = pos.to(torch.float32)[:, None] * inv_freq[None]  # (T, d/2)
    cos, sin = ang.cos()[:, None].to(x.dtype), ang.sin()[:, None].to(x.dtype)  # (T, 1, d/2)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)


class RetNet(LinearAttention):
    def __init__(self, args: MixerArgs) -> None:
        o = args.options
        n_heads = int(o["n_heads"])
        key_dim, value_dim = expanded_dims(args)
        if o["rotary"] not in ROTARY:
            raise ValueError(f"retnet: model.mixer.rotary = {o['rotary']!r}; choose one of {', '.join(ROTARY)}")
        super().__init__(args.dim, n_heads, key_dim, value_dim // n_heads * n_heads, args.n_layers,
                         short_conv=int(o["short_conv"]), head_norm=str(o["head_norm"]),
                         head_norm_eps=float(o["head_norm_eps"]))
        self.rotary, self.rope_theta = str(o["rotary"]), float(o["rope_theta"])
        self.in_proj = nn.Linear(args.dim, 2 * self.key_dim + 2 * self.value_dim, bias=False)
        self.out_std = 0.02

    def rotate(self, x: Tensor, pos: Tensor) -> Tensor:
        """Rotary positions on x (B, T, H, K/H)."""
        if self.rotary == "retnet":
            return retnet_rotary(x, pos, self.rope_theta)
        return apply_rope(x.transpose(1, 2), pos, self.rope_theta).transpose(1, 2)

    def features(self, x: Tensor, position: int | None, reset: Tensor | None) -> Features:
        past = position or 0
        q, k, v, g = self.in_proj(x).split([self.key_dim, self.key_dim, self.value_dim, self.value_dim], dim=-1)
        pos = torch.arange(past, past + x.shape[1], device=x.device)
        q, k = self.rotate(self.heads(q), pos), self.rotate(self.heads(k), pos)
        heads = torch.arange(self.n_heads, device=x.device, dtype=torch.float32)
        log_decay = torch.log1p(-torch.exp2(-5.0 - heads))  # log gamma_h, (H,)
        return Features(q, k, self.heads(v), log_decay, g, past + x.shape[1])

    def init_features(self) -> None:
        nn.init.normal_(self.in_proj.weight, std=0.02)
