"""The Mamba-style block shared by Longhorn and Mamba.

    x, z   = in_proj(u).chunk(2)                  # (B, T, E) each, E = expand * D
    x      = SiLU(causal_conv1d(x))               # kernel conv_kernel, one fused op (conv.py)
    dt_low, k, q = x_proj(x).split(R, N, N)       # k, q shared by all E channels
    dt     = dt_proj(dt_low)                      # (B, T, E), bias included
    y, h   = scan(x, dt, k, q, D, z, h0)          # the subclass's recurrence, gate fused
    out    = out_proj(y)

The recurrent state is ``(conv_state, ssm_state)``: the last ``conv_kernel - 1``
conv inputs (B, E, K-1) and the scan state (B, E, N) in float32. At document
starts (``reset``) the scan zeroes its state and the conv sees zeros before them.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from longhorn_zoo.hookspecs import MixerArgs
from longhorn_zoo.plugins.selective_scan.conv import causal_conv1d
from longhorn_zoo.plugins.selective_scan.reference import compute_dtype

State = tuple[Tensor, Tensor]


def flops_per_token(args: MixerArgs, seq_len: int) -> float:
    """Forward FLOPs per token of one block: matmuls (2 per weight) plus about 6 per state element in the scan.

    Serves as ``MixerSpec.flops_per_token`` for every mixer built on :class:`SelectiveBlock`.
    """
    o = args.options
    e, n = int(o["expand"]) * args.dim, int(o["d_state"])
    r = int(o["dt_rank"]) or -(-args.dim // 16)
    weights = args.dim * 2 * e + e * (r + 2 * n) + r * e + e * args.dim + e * int(o["conv_kernel"])
    return 2.0 * weights + 6.0 * e * n


INITS = ("mamba_ssm", "normal")
"""``model.mixer.init``: how :meth:`SelectiveBlock.init_weights` draws in_proj, x_proj and out_proj."""


class SelectiveBlock(nn.Module):
    """Base class; subclasses supply the scan (:meth:`scan`, :meth:`scan_step`) and dt bias init."""

    def __init__(self, args: MixerArgs) -> None:
        super().__init__()
        o = args.options
        self.dim = args.dim
        self.d_state = int(o["d_state"])
        self.d_inner = int(o["expand"]) * args.dim
        self.conv_kernel = int(o["conv_kernel"])
        self.dt_rank = int(o["dt_rank"]) or math.ceil(args.dim / 16)
        self.init_scheme = o.get("init", "mamba_ssm")  # model folders written before the option: the default
        if self.init_scheme not in INITS:
            raise ValueError(f"model.mixer.init = {self.init_scheme!r}; choose one of {', '.join(INITS)}")
        self.n_layers = args.n_layers
        self.in_proj = nn.Linear(args.dim, 2 * self.d_inner, bias=False)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, self.conv_kernel, groups=self.d_inner, bias=True)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * self.d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.D = nn.Parameter(torch.empty(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, args.dim, bias=False)

    # -- what subclasses define -------------------------------------------------
    def scan(self, x: Tensor, dt: Tensor, k: Tensor, q: Tensor, z: Tensor,
             initial_state: Tensor | None, reset: Tensor | None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def scan_step(self, x: Tensor, dt: Tensor, k: Tensor, q: Tensor, z: Tensor,
                  state: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def init_dt_bias(self) -> None:
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------
    def _project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        dt_low, k, q = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        return self.dt_proj(dt_low), k, q

    def forward(self, u: Tensor, state: State | None = None, *, return_state: bool = False,
                reset: Tensor | None = None) -> Any:
        x, z = self.in_proj(u).chunk(2, dim=-1)  # views of one (B, T, 2E) tensor, read in place by the ops
        x, conv_state = causal_conv1d(x, self.conv1d.weight.squeeze(1), self.conv1d.bias,
                                      None if state is None else state[0], reset, "silu")
        dt, k, q = self._project(x)
        y, h = self.scan(x, dt, k, q, z, None if state is None else state[1], reset)
        out = self.out_proj(y)
        return (out, (conv_state, h)) if return_state else out

    def step(self, u: Tensor, state: State | None) -> tuple[Tensor, State]:
        """One token: u (B, D) to (B, D)."""
        bsz = u.shape[0]
        if state is None:
            state = (u.new_zeros(bsz, self.d_inner, self.conv_kernel - 1),
                     u.new_zeros(bsz, self.d_inner, self.d_state, dtype=compute_dtype(u)))
        conv_state, h = state
        x, z = self.in_proj(u).chunk(2, dim=-1)
        window = torch.cat([conv_state.to(x.dtype), x.unsqueeze(-1)], dim=-1)  # (B, E, K)
        x = F.silu((window * self.conv1d.weight.squeeze(1)).sum(-1) + self.conv1d.bias)
        dt, k, q = self._project(x)
        y, h = self.scan_step(x, dt, k, q, z, h)
        return self.out_proj(y), (window[..., 1:], h)

    def init_weights(self) -> None:
        # "mamba_ssm", as mamba_ssm (and the seed's Longhorn) initialise: in_proj and x_proj keep PyTorch's
        # default (uniform within 1/sqrt(fan_in)), out_proj that divided by sqrt(n_layers). "normal": those
        # three at std 0.02, out_proj 0.02 / sqrt(2 n_layers) (GPT-2's). The same draws in the same order.
        normal = self.init_scheme == "normal"

        def draw(linear: nn.Linear) -> None:
            if normal:
                nn.init.trunc_normal_(linear.weight, std=0.02)
            else:
                linear.reset_parameters()

        draw(self.in_proj)  # in_proj, conv1d, x_proj in this order, so "mamba_ssm" draws as before
        self.conv1d.reset_parameters()
        draw(self.x_proj)
        bound = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -bound, bound)
        self.init_dt_bias()
        nn.init.ones_(self.D)
        if normal:
            nn.init.trunc_normal_(self.out_proj.weight, std=0.02 / math.sqrt(2 * self.n_layers))
            return
        self.out_proj.reset_parameters()
        with torch.no_grad():
            self.out_proj.weight.mul_(1 / math.sqrt(self.n_layers))
