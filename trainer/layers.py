"""The model's own layers around the mixers: the norms and the gated MLP of a block.

    SwiGLU (mlp_activation = "silu"):  out = W2 (SiLU(W1 x) * W3 x)    Llama, GLA
    GeGLU  (mlp_activation = "gelu"):  out = W2 (GELU(W1 x) * W3 x)    RetNet's FFN
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu}


def build_norm(kind: str, dim: int, eps: float) -> nn.Module:
    """``rmsnorm`` (with a weight) or ``layernorm`` (with a weight and no bias, as the seed's GPT-2-style models)."""
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps)
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, bias=False)
    raise ValueError(f"model.norm = {kind!r}; choose rmsnorm or layernorm")


class GatedMLP(nn.Module):
    """out = W2 (act(W1 x) * W3 x), act = SiLU or GELU."""

    def __init__(self, dim: int, hidden: int, activation: str = "silu") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"model.mlp_activation = {activation!r}; choose one of {', '.join(ACTIVATIONS)}")
        self.act = ACTIVATIONS[activation]
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(self.act(self.w1(x)) * self.w3(x))

    def init_weights(self, out_std: float) -> None:
        """W1 and W3 at std 0.02, W2 (the output) at ``out_std``."""
        nn.init.normal_(self.w1.weight, std=0.02)
        nn.init.normal_(self.w3.weight, std=0.02)
        nn.init.normal_(self.w2.weight, std=out_std)
