"""Optimizer and learning-rate schedule builders."""

from __future__ import annotations

import math

import torch
from torch import nn

from longhorn_zoo.config import LRScheduler as LRConfig
from longhorn_zoo.config import Optimizer as OptimizerConfig

# torch.optim.AdamW's flags for each ``optimizer.implementation``
IMPLEMENTATIONS = {"fused": {"fused": True}, "foreach": {"foreach": True},
                   "for-loop": {"foreach": False, "fused": False}}


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on parameters of two or more dimensions only (not norms, biases, D).

    A module opts its own parameters out of weight decay by naming them in a
    ``no_weight_decay`` attribute (e.g. Mamba's 2-D ``A_log``; see :mod:`longhorn_zoo.hookspecs`),
    unless ``cfg.weight_decay_exemptions`` is off. ``cfg.implementation`` picks torch's fused, foreach or
    for-loop update; all three take plain tensors and FSDP2's DTensors, on CPU and CUDA.
    """
    exempt = {id(mod.get_parameter(name)) for mod in model.modules() for name in getattr(mod, "no_weight_decay", ())
              if cfg.weight_decay_exemptions}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and id(p) not in exempt else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                             **IMPLEMENTATIONS[cfg.implementation])


def lr_factor(step: int, total_steps: int, cfg: LRConfig) -> float:
    """Multiplier of the peak LR at optimizer step ``step`` (0-based).

    Linear warm-up over ``warmup_steps``, then
    * cosine: half-cosine from 1 down to ``min_lr_ratio`` at the last step;
    * wsd: flat at 1, then a linear decay to ``min_lr_ratio`` over the last
      ``wsd_decay_ratio`` of the steps (warmup-stable-decay);
    * constant: 1.
    """
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    rest = max(total_steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / rest, 1.0)
    lo = cfg.min_lr_ratio
    if cfg.decay_type == "cosine":
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.decay_type == "wsd":
        decay_start = 1.0 - cfg.wsd_decay_ratio
        if progress <= decay_start:
            return 1.0
        return 1.0 - (1.0 - lo) * (progress - decay_start) / max(cfg.wsd_decay_ratio, 1e-12)
    return 1.0


def build_lr_scheduler(opt: torch.optim.Optimizer, total_steps: int,
                       cfg: LRConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` over :func:`lr_factor`; its state_dict goes into checkpoints."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total_steps, cfg))
