"""The Mamba mixer: the shared selective block with the Mamba-1 scan."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from longhorn_zoo.hookspecs import MixerArgs
from longhorn_zoo.plugins.mamba.ops import mamba_scan, mamba_step
from longhorn_zoo.plugins.selective_scan.block import SelectiveBlock
from longhorn_zoo.plugins.selective_scan.reference import compute_dtype

DT_MIN, DT_MAX, DT_FLOOR = 1e-3, 0.1, 1e-4


class Mamba(SelectiveBlock):
    """Mamba-1 (arXiv 2312.00752): the block's k and q are B and C; A = -exp(A_log) per channel and state.

    ``A_log`` is (d_inner, N) but, like D, gets no weight decay (see ``no_weight_decay``).
    """

    no_weight_decay = ("A_log",)

    def __init__(self, args: MixerArgs) -> None:
        super().__init__(args)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, self.d_state))

    def A(self) -> Tensor:
        """A = -exp(A_log), (d_inner, N), in the scan's compute dtype (float32, or float64 in tests)."""
        return -torch.exp(self.A_log.to(compute_dtype(self.A_log)))

    def scan(self, x: Tensor, dt: Tensor, B: Tensor, C: Tensor, z: Tensor, initial_state: Tensor | None,
             reset: Tensor | None) -> tuple[Tensor, Tensor]:
        return mamba_scan(x, dt, self.A(), B, C, self.D, z, initial_state, reset)

    def scan_step(self, x: Tensor, dt: Tensor, B: Tensor, C: Tensor, z: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        return mamba_step(x, dt, self.A(), B, C, self.D, z, state)

    @torch.no_grad()
    def init_dt_bias(self) -> None:
        # softplus(bias) = dt, log-uniform in [DT_MIN, DT_MAX]; inverse softplus: dt + log(1 - exp(-dt)).
        # In-place ops only, so this also works on FSDP-sharded (DTensor) parameters.
        b = self.dt_proj.bias
        b.uniform_(math.log(DT_MIN), math.log(DT_MAX)).exp_().clamp_(min=DT_FLOOR)
        b.add_(torch.log(-torch.expm1(-b)))

    @torch.no_grad()
    def init_weights(self) -> None:
        super().init_weights()
        # A_log[i, n] = log(n + 1): a cumulative sum of ones along the state axis (in place, DTensor-safe).
        self.A_log.fill_(1.0)
        self.A_log.copy_(self.A_log.cumsum(-1).log())
