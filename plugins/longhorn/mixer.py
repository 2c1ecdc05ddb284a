"""The Longhorn mixer: the shared selective block with the Longhorn scan."""

from __future__ import annotations

from torch import Tensor, nn

from longhorn_zoo.plugins.longhorn.ops import longhorn_scan, longhorn_step
from longhorn_zoo.plugins.selective_scan.block import SelectiveBlock


class Longhorn(SelectiveBlock):
    """Longhorn (arXiv 2407.14207): k and q are shared across channels; no A, dt bias starts at 0."""

    def scan(self, x: Tensor, dt: Tensor, k: Tensor, q: Tensor, z: Tensor,
             initial_state: Tensor | None, reset: Tensor | None) -> tuple[Tensor, Tensor]:
        return longhorn_scan(x, dt, k, q, self.D, z, initial_state, reset)

    def scan_step(self, x: Tensor, dt: Tensor, k: Tensor, q: Tensor, z: Tensor,
                  state: Tensor) -> tuple[Tensor, Tensor]:
        return longhorn_step(x, dt, k, q, self.D, z, state)

    def init_dt_bias(self) -> None:
        nn.init.zeros_(self.dt_proj.bias)  # beta = sigmoid(dt) starts near 0.5
