"""The RWKV mixer: RWKV-6 "Finch" time mixing followed by the RWKV channel mix.

Time mix (Peng et al. 2024, "Eagle and Finch", arXiv 2404.05892), x_{t-1} by token shift:

    ddlerp_c(x_t, x_{t-1}) = x_t + (x_{t-1} - x_t) * (mu_c + tanh(lerp_x W_1) W_2,c)   c in r, k, v, g, w
    r, k, v, g = W_r xr, W_k xk, W_v xv, W_g xg
    w_t        = exp(max(-exp(d_0 + tanh(xw A) B), -5))   # data-dependent decay, per head and key
    o_t        = r_t^T (S_{t-1} + diag(u) k_t v_t^T),   S_t = diag(w_t) S_{t-1} + k_t v_t^T
    h          = W_o (HeadRMSNorm(o) * SiLU(g))

With ``decay = "static"`` the decay is RWKV-5's learned w = exp(-exp(d_0)) per head
and key (no xw, no decay LoRA).

Channel mix, with its own token shift:

    c = sigmoid(W_r' xr') * W_v' relu(W_k' xk')^2

Placement: the block gives the mixer RMSNorm(x) and adds what it returns to x, and
the model's SwiGLU MLP is off (``mlp = false``). This module returns

    h + ChannelMix(RMSNorm(RMSNorm(x) + h))

so a block computes x + h + c as RWKV does; the one difference from RWKV is that
the channel mix sees the normalised stream RMSNorm(x) + h instead of x + h.

The state is ``((x_{t-1} of the time mix, S), x_{t-1} of the channel mix)``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from longhorn_zoo.hookspecs import MixerArgs
from longhorn_zoo.plugins.linear_attention.layer import (
    Features,
    LinearAttention,
    RecurrentMixer,
    assign_,
    bounded_log_decay,
    token_shift,
)


def layer_ratios(args: MixerArgs) -> tuple[float, float]:
    """RWKV's depth ratios: 0 -> 1 over the layers, and 1 -> almost 0."""
    return args.layer_id / max(args.n_layers - 1, 1), 1.0 - args.layer_id / args.n_layers


class TimeMix(LinearAttention):
    def __init__(self, args: MixerArgs) -> None:
        o = args.options
        if o["decay"] not in ("dynamic", "static"):
            raise ValueError(f"rwkv: model.mixer.decay = {o['decay']!r}; choose dynamic or static")
        head_size = int(o["head_size"])
        if args.dim % head_size:
            raise ValueError(f"rwkv: dim {args.dim} is not a multiple of model.mixer.head_size {head_size}")
        super().__init__(args.dim, args.dim // head_size, args.dim, args.dim, args.n_layers, scale=1.0)
        self.args = args
        self.dynamic = o["decay"] == "dynamic"
        self.n_mix = 5 if self.dynamic else 4  # r, k, v, g (, w)
        rank = int(o["mix_lora_rank"])
        self.mu_x = nn.Parameter(torch.empty(args.dim))
        self.mu = nn.Parameter(torch.empty(self.n_mix, args.dim))
        self.mix_down = nn.Parameter(torch.empty(args.dim, self.n_mix * rank))
        self.mix_up = nn.Parameter(torch.empty(self.n_mix, rank, args.dim))
        self.decay_base = nn.Parameter(torch.empty(self.n_heads, self.head_k))
        if self.dynamic:
            self.decay_down = nn.Parameter(torch.empty(args.dim, int(o["decay_lora_rank"])))
            self.decay_up = nn.Parameter(torch.empty(int(o["decay_lora_rank"]), args.dim))
        self.bonus = nn.Parameter(torch.empty(self.n_heads, self.head_k))
        self.in_proj = nn.Linear(args.dim, 4 * args.dim, bias=False)  # W_r, W_k, W_v, W_g stacked

    def features(self, x: Tensor, last: Tensor | None, reset: Tensor | None) -> Features:
        shifted, last = token_shift(x, last, reset)
        dx = shifted - x
        lora = torch.tanh((x + dx * self.mu_x) @ self.mix_down).unflatten(-1, (self.n_mix, -1))
        lora = torch.einsum("btcr,crd->cbtd", lora, self.mix_up)
        mixed = x + dx * (self.mu[:, None, None] + lora)  # (n_mix, B, T, D)
        w = self.in_proj.weight.view(4, -1, x.shape[-1])
        r, k, v, g = (F.linear(mixed[i], w[i]) for i in range(4))
        if self.dynamic:
            d = self.decay_base.flatten() + torch.tanh(mixed[4] @ self.decay_down) @ self.decay_up
            log_decay = self.heads(bounded_log_decay(-torch.exp(d.float())))
        else:
            log_decay = bounded_log_decay(-torch.exp(self.decay_base.float())).expand(*x.shape[:2], -1, -1)
        return Features(self.heads(r), self.heads(k), self.heads(v), log_decay, g, last)

    def init_features(self) -> None:
        r0, r1 = layer_ratios(self.args)
        dim = self.args.dim
        ddd = torch.arange(dim, dtype=torch.float32) / dim
        assign_(self.mu_x, 1 - ddd**r1)
        mus = [1 - ddd ** (0.5 * r1), 1 - ddd**r1, 1 - (ddd**r1 + 0.3 * r0), 1 - ddd ** (0.5 * r1), 1 - ddd**r1]
        assign_(self.mu, torch.stack(mus[: self.n_mix]))  # r, k, v, g, w
        nn.init.zeros_(self.mix_down)
        nn.init.uniform_(self.mix_up, -0.01, 0.01)
        n = torch.arange(dim, dtype=torch.float32) / (dim - 1)
        assign_(self.decay_base, (-6 + 5 * n ** (0.7 + 1.3 * r0)).view(self.n_heads, self.head_k))
        if self.dynamic:
            nn.init.zeros_(self.decay_down)
            nn.init.uniform_(self.decay_up, -0.01, 0.01)
        idx = torch.arange(dim)
        assign_(self.bonus, (r0 * (1 - n) + ((idx + 1) % 3 - 1) * 0.1).view(self.n_heads, self.head_k))
        nn.init.trunc_normal_(self.in_proj.weight, std=0.02)


class ChannelMix(nn.Module):
    """RWKV channel mix: c = sigmoid(W_r xr) * W_v relu(W_k xk)^2, xr and xk token-shift lerps."""

    def __init__(self, args: MixerArgs) -> None:
        super().__init__()
        self.args = args
        hidden = 32 * math.ceil(float(args.options["ffn_ratio"]) * args.dim / 32)
        self.mu = nn.Parameter(torch.empty(2, args.dim))  # k, r
        self.key = nn.Linear(args.dim, hidden, bias=False)
        self.value = nn.Linear(hidden, args.dim, bias=False)
        self.receptance = nn.Linear(args.dim, args.dim, bias=False)

    def forward(self, x: Tensor, last: Tensor | None, reset: Tensor | None = None) -> tuple[Tensor, Tensor]:
        shifted, last = token_shift(x, last, reset)
        xk, xr = x + (shifted - x) * self.mu[:, None, None]
        return torch.sigmoid(self.receptance(xr)) * self.value(F.relu(self.key(xk)).square()), last

    def init_weights(self) -> None:
        _, r1 = layer_ratios(self.args)
        ddd = torch.arange(self.args.dim, dtype=torch.float32) / self.args.dim
        assign_(self.mu, (1 - ddd**r1).expand(2, -1))
        # All at 0.02, as the seed (RWKV x051a) does. A depth-scaled value (0.02 / sqrt(2 n_layers)) leaves the
        # residual stream at the embedding's scale, where the pre-norms and the time mix's head norm amplify the
        # backward pass layer after layer: at init, 24 layers x 1024 gave gradient norms of 10^3-10^4, against
        # 12 with 0.02 (docs/configs.md, "RWKV's gradient norm at 1.3B").
        nn.init.normal_(self.key.weight, std=0.02)
        nn.init.normal_(self.receptance.weight, std=0.02)
        nn.init.normal_(self.value.weight, std=0.02)


class RWKV(RecurrentMixer):
    """Time mix, then the channel mix on its own pre-norm residual (see the module docstring)."""

    def __init__(self, args: MixerArgs) -> None:
        super().__init__()
        self.time_mix = TimeMix(args)
        self.channel_norm = nn.RMSNorm(args.dim, eps=1e-5)
        self.channel_mix = ChannelMix(args)

    def mix(self, x: Tensor, state: Any, recurrent: bool, reset: Tensor | None = None) -> tuple[Tensor, Any]:
        tm_state, cm_last = (None, None) if state is None else state
        h, tm_state = self.time_mix.mix(x, tm_state, recurrent, reset)
        c, cm_last = self.channel_mix(self.channel_norm(x + h), cm_last, reset)
        return h + c, (tm_state, cm_last)

    @torch.no_grad()
    def init_weights(self) -> None:
        self.time_mix.init_weights()
        self.channel_norm.reset_parameters()
        self.channel_mix.init_weights()
