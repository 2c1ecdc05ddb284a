"""Model transforms applied before training, in one fixed order.

``parallelize`` applies, in this order: per-block ``torch.compile`` (fullgraph),
then FSDP2 ``fully_shard`` on each block and at the root. Everything runs on the
meta-device model before its weights are materialised.
"""

from __future__ import annotations

import torch
from torch import nn

from trainer.config import JobConfig
from trainer.model import LM


def apply_compile(model: LM) -> None:
    """Compile each block separately with ``fullgraph=True`` (no graph breaks allowed)."""
    for name, block in model.layers.named_children():
        model.layers.register_module(name, torch.compile(block, fullgraph=True))


def apply_fsdp(model: LM, mesh: object, param_dtype: torch.dtype, reduce_dtype: torch.dtype) -> None:
    """Shard each block, then the root (embedding, final norm, head), with FSDP2."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    blocks = list(model.layers.values())
    for i, block in enumerate(blocks):
        # the last block's parameters are needed again at once for backward: keep them gathered
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mesh=mesh, mp_policy=mp)


def parallelize(model: LM, cfg: JobConfig, world_size: int, device: torch.device) -> nn.Module:
    """Apply compile and FSDP as the config asks; returns the model to train."""
    if cfg.compile.enable:
        apply_compile(model)
    if world_size > 1:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (world_size,))
        bf16 = device.type == "cuda" and cfg.training.mixed_precision != "fp32"
        apply_fsdp(model, mesh, torch.bfloat16 if bf16 else torch.float32, torch.float32)
    return model
