"""Model transforms applied before training, in one fixed order.

:func:`parallelize` is the only place that wraps the model. On the meta-device
model, before its weights exist, it applies in this order:

1. float8 (``[float8]``): torchao swaps eligible ``nn.Linear`` layers for
   float8 ones. It must come first so that FSDP shards the float8 weights.
2. activation checkpointing (``[activation_checkpoint]``): ``full`` wraps every
   block; ``selective`` with an integer N wraps every N-th block (block 0, N,
   2N, ...); ``selective`` with ``op`` wraps every block but saves the outputs of
   matmuls, attention and the plugins' custom scan ops, recomputing only the
   cheap element-wise ops in backward.
3. per-block ``torch.compile(fullgraph=True)`` (``[compile]``), around the
   checkpoint wrapper so the recomputation is compiled too.
4. FSDP2 ``fully_shard`` on each block, then at the root (``[parallelism]``),
   with a ``MixedPrecisionPolicy``: bf16 parameters when training in bf16, and
   float32 gradient reduction unless configured otherwise. With
   ``data_parallel_replicate_degree`` > 1 the mesh is 2-D (replicate x shard),
   which is HSDP: shard inside a node, replicate across nodes.

Checkpoint keys do not depend on these wrappers: :mod:`longhorn_zoo.checkpoint` goes
through ``torch.distributed.checkpoint.state_dict``, which strips the
``_orig_mod`` and ``_checkpoint_wrapped_module`` prefixes.
"""

from __future__ import annotations

import torch
from torch import nn

from longhorn_zoo.config import ActivationCheckpoint, Float8, JobConfig
from longhorn_zoo.model import LM


class ParallelizeError(ValueError):
    """A parallelism, compile or float8 setting that cannot run here. The message names the fix."""


def apply_float8(model: LM, cfg: Float8, device: torch.device) -> None:
    """Convert eligible Linear layers to float8 training with torchao; an error if this machine cannot."""
    if device.type != "cuda":
        raise ParallelizeError(f"float8.enable needs a CUDA GPU of compute capability 8.9 or newer; this run is on "
                               f"{device.type}. Set --float8.enable false.")
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 9):
        raise ParallelizeError(f"float8.enable needs compute capability 8.9+ (Ada, Hopper or newer); "
                               f"{torch.cuda.get_device_name(device)} is sm_{cap[0]}{cap[1]}. "
                               "Set --float8.enable false.")
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as e:
        raise ParallelizeError("float8.enable needs torchao: pip install 'longhorn-zoo[float8]'") from e

    def eligible(mod: nn.Module, fqn: str) -> bool:
        # float8 matmuls need both dimensions divisible by 16
        return (isinstance(mod, nn.Linear) and mod.in_features % 16 == 0 and mod.out_features % 16 == 0
                and not any(f in fqn for f in cfg.filter_fqns))

    config = Float8LinearConfig(enable_fsdp_float8_all_gather=cfg.enable_fsdp_float8_all_gather)
    convert_to_float8_training(model, config=config, module_filter_fn=eligible)


# Selective per-op checkpointing saves these ops' outputs (plus every custom, non-aten op: the scan ops).
_SAVED_ATEN_OPS = ("mm", "addmm", "bmm", "_scaled_dot_product_flash_attention",
                   "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")


def _op_sac_context() -> tuple[object, object]:
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    saved = {getattr(torch.ops.aten, n).default for n in _SAVED_ATEN_OPS if hasattr(torch.ops.aten, n)}

    def policy(ctx: object, op: object, *args: object, **kwargs: object) -> CheckpointPolicy:
        keep = op in saved or getattr(op, "namespace", "aten") != "aten"
        return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def apply_ac(model: LM, cfg: ActivationCheckpoint) -> None:
    """Wrap blocks for activation checkpointing as ``cfg.mode`` / ``cfg.selective_ac_option`` say."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    every, kwargs = 1, {}
    if cfg.mode == "selective":
        if cfg.selective_ac_option == "op":
            kwargs["context_fn"] = _op_sac_context
        elif cfg.selective_ac_option.isdigit() and int(cfg.selective_ac_option) >= 1:
            every = int(cfg.selective_ac_option)
        else:
            raise ParallelizeError(f"activation_checkpoint.selective_ac_option = {cfg.selective_ac_option!r}; "
                                   "use 'op' or a positive integer such as '2'")
    for i, (name, block) in enumerate(list(model.layers.named_children())):
        if i % every == 0:
            model.layers.register_module(name, checkpoint_wrapper(block, preserve_rng_state=False, **kwargs))


def apply_compile(model: LM, backend: str) -> None:
    """Compile each block separately with ``fullgraph=True`` (no graph breaks allowed)."""
    for name, block in list(model.layers.named_children()):
        model.layers.register_module(name, torch.compile(block, backend=backend, fullgraph=True))


def build_mesh(cfg: JobConfig, world_size: int, device: torch.device) -> object:
    """The data-parallel device mesh: 1-D ``(dp_shard,)`` or, for HSDP, 2-D ``(dp_replicate, dp_shard)``."""
    from torch.distributed.device_mesh import init_device_mesh

    p = cfg.parallelism
    replicate = p.data_parallel_replicate_degree
    shard = world_size // replicate if p.data_parallel_shard_degree == -1 else p.data_parallel_shard_degree
    if replicate < 1 or shard < 1 or replicate * shard != world_size:
        raise ParallelizeError(f"parallelism: replicate degree {replicate} x shard degree "
                               f"{p.data_parallel_shard_degree} must equal the {world_size} ranks; "
                               "set data_parallel_shard_degree = -1 to use the rest")
    if replicate == 1:
        return init_device_mesh(device.type, (shard,), mesh_dim_names=("dp_shard",))
    return init_device_mesh(device.type, (replicate, shard), mesh_dim_names=("dp_replicate", "dp_shard"))


def apply_fsdp(model: LM, mesh: object, param_dtype: torch.dtype, reduce_dtype: torch.dtype) -> None:
    """Shard each block, then the root (embedding, final norm, head), with FSDP2 (HSDP on a 2-D mesh)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    blocks = list(model.layers.values())
    for i, block in enumerate(blocks):
        # the last block's parameters are needed again at once for backward: keep them gathered
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mesh=mesh, mp_policy=mp)


def parallelize(model: LM, cfg: JobConfig, world_size: int, device: torch.device) -> nn.Module:
    """Apply float8, activation checkpointing, compile and FSDP, in that order; returns the model to train."""
    if cfg.float8.enable:
        apply_float8(model, cfg.float8, device)
    if cfg.activation_checkpoint.mode != "none":
        apply_ac(model, cfg.activation_checkpoint)
    if cfg.compile.enable:
        apply_compile(model, cfg.compile.backend)
    if world_size > 1:
        bf16 = cfg.training.mixed_precision == "bf16" or (cfg.training.mixed_precision == "auto"
                                                          and device.type == "cuda")
        reduce = torch.bfloat16 if cfg.parallelism.mixed_precision_reduce == "bfloat16" else torch.float32
        apply_fsdp(model, build_mesh(cfg, world_size, device), torch.bfloat16 if bf16 else torch.float32, reduce)
    return model
