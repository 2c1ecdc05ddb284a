"""The DeltaNet mixer: multi-head linear attention whose state is updated by the delta rule.

    q, k, v = W_q x, W_k x, W_v x          split into H heads of size d
    q, k    = L2norm(SiLU(q)), L2norm(SiLU(k))
    beta    = sigmoid(W_beta x)            one write strength per head
    o, S    = delta_rule(q, k, v, beta, S) see lz_deltanet.ops
    out     = W_o RMSNorm(o)               norm per head

The recurrent state is the delta-rule state S (B, H, d, d) in float32; at document
starts (``reset``) the op zeroes it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from longhorn_zoo import MixerArgs
from lz_deltanet.ops import delta_rule, delta_rule_step


class DeltaNet(nn.Module):
    def __init__(self, args: MixerArgs) -> None:
        super().__init__()
        self.n_heads = int(args.options["n_heads"])
        if args.dim % self.n_heads:
            raise ValueError(f"deltanet: dim {args.dim} is not divisible by model.mixer.n_heads {self.n_heads}")
        self.head_dim = args.dim // self.n_heads
        self.qkv = nn.Linear(args.dim, 3 * args.dim, bias=False)
        self.beta_proj = nn.Linear(args.dim, self.n_heads, bias=True)
        self.o_norm = nn.RMSNorm(self.head_dim, eps=1e-5)
        self.o_proj = nn.Linear(args.dim, args.dim, bias=False)
        self.out_std = 0.02 / math.sqrt(2 * args.n_layers)

    def _project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """x (..., D) to q, k, v (..., H, d) and beta (..., H)."""
        q, k, v = self.qkv(x).unflatten(-1, (3, self.n_heads, self.head_dim)).unbind(-3)
        q, k = F.normalize(F.silu(q), dim=-1), F.normalize(F.silu(k), dim=-1)
        return q, k, v, torch.sigmoid(self.beta_proj(x))

    def _output(self, o: Tensor) -> Tensor:
        return self.o_proj(self.o_norm(o).flatten(-2))

    def forward(self, x: Tensor, state: Tensor | None = None, *, return_state: bool = False,
                reset: Tensor | None = None) -> Any:
        o, state = delta_rule(*self._project(x), state, reset)
        out = self._output(o)
        return (out, state) if return_state else out

    def step(self, x: Tensor, state: Tensor | None) -> tuple[Tensor, Tensor]:
        """One token: x (B, D) to (B, D)."""
        q, k, v, beta = self._project(x)
        if state is None:
            state = x.new_zeros(x.shape[0], self.n_heads, self.head_dim, self.head_dim, dtype=torch.float32)
        cd = state.dtype
        o, state = delta_rule_step(state, q.to(cd), k.to(cd), v.to(cd), beta.to(cd))
        return self._output(o.to(x.dtype)), state

    def init_weights(self) -> None:
        nn.init.trunc_normal_(self.qkv.weight, std=0.02)
        nn.init.trunc_normal_(self.beta_proj.weight, std=0.02)
        nn.init.zeros_(self.beta_proj.bias)  # beta starts at 0.5
        self.o_norm.reset_parameters()
        nn.init.trunc_normal_(self.o_proj.weight, std=self.out_std)
