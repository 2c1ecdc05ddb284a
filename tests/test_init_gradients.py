"""At initialisation, a deep RWKV's gradient norm stays at Llama's scale (the fault seen at 1.3B, at 12 x 512)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from longhorn_zoo.config import load_config
from longhorn_zoo.model import build_model


def grad_norm_at_init(name: str, *options: str) -> float:
    cfg = load_config(None, ["--model.name", name, "--model.dim", "512", "--model.n_layers", "12",
                             "--model.tie_embeddings", "true", *options])
    model = build_model(cfg.model, 32, "meta")
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    tokens = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(1))
    F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
    return float(torch.cat([p.grad.flatten() for p in model.parameters()]).norm())


@pytest.mark.parametrize("name", ["rwkv", "rwkv5"])
def test_rwkv_gradient_norm_at_init_stays_near_llamas(name: str) -> None:
    # With the channel mix's value depth-scaled (0.02 / sqrt(2 L)), RWKV-6 gave 926 here against Llama's 31
    # (112 at the default ffn_ratio 3.5).
    llama = grad_norm_at_init("llama", "--model.mixer.n_heads", "8")
    assert grad_norm_at_init(name, "--model.mixer.ffn_ratio", "3.0") < 3 * llama  # the size configs' width
