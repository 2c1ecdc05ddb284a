"""The training entry point: ``python -m trainer.train [CONFIG.toml] [--section.key value ...]``.

One batch's path: the loader yields ``inputs``/``labels`` (trainer.data) -> the LM
(trainer.model, mixers from plugins) under autocast -> cross-entropy on scored
labels -> backward, accumulated over micro-batches up to the global batch ->
clip -> AdamW step and LR schedule (trainer.optim) -> metrics (trainer.metrics).
"""

from __future__ import annotations

import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from trainer.config import ConfigError, JobConfig, parse_args, to_toml
from trainer.data import IGNORE, build_dataloader
from trainer.metrics import MetricsLogger
from trainer.model import LM, build_model, flops_per_token
from trainer.ops import set_backend_preference
from trainer.optim import build_lr_scheduler, build_optimizer
from trainer.parallelize import parallelize

H200_BF16_PEAK = 989e12  # dense bf16 FLOP/s of an H100/H200 SXM, the MFU denominator


class TrainingError(RuntimeError):
    """A run that cannot go on (non-finite loss, bad batch settings)."""


def pick_device(cfg: JobConfig, local_rank: int) -> torch.device:
    want = cfg.training.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise TrainingError("training.device = 'cuda' but no CUDA device is visible; use 'cpu' or 'auto'")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def loss_and_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Mean cross-entropy over scored labels, and (correct, scored) counts for accuracy."""
    flat, lab = logits.flatten(0, 1).float(), labels.flatten()
    loss = F.cross_entropy(flat, lab, ignore_index=IGNORE)
    scored = lab != IGNORE
    correct = int((flat.argmax(-1)[scored] == lab[scored]).sum())
    return loss, correct, int(scored.sum())


def grad_accum_steps(cfg: JobConfig, world_size: int) -> int:
    per_step = cfg.training.local_batch_size * world_size
    gbs = cfg.training.global_batch_size
    if gbs == -1:
        return 1
    if gbs % per_step:
        raise TrainingError(f"training.global_batch_size {gbs} is not a multiple of local_batch_size x ranks = "
                            f"{per_step}; use a multiple such as {per_step * max(gbs // per_step, 1)}")
    return gbs // per_step


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, batches: int, device: torch.device, autocast) -> float:
    model.eval()
    total = 0.0
    for _ in range(batches):
        batch = next(loader)
        with autocast():
            logits = model(batch["inputs"].to(device))
        total += float(loss_and_accuracy(logits, batch["labels"].to(device))[0])
    model.train()
    return total / batches


def train(cfg: JobConfig) -> dict[str, float]:
    """Run the job described by ``cfg``; returns the last logged metrics."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(cfg, local_rank)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    set_backend_preference(cfg.model.op_backend)
    torch.manual_seed(cfg.training.seed)

    model: LM = build_model(cfg.model, cfg.training.seq_len, "meta")
    n_params = model.num_params()
    fpt = flops_per_token(model, cfg.training.seq_len)
    if rank == 0:
        print(f"model: {cfg.model.name}, {cfg.model.n_layers} layers x {cfg.model.dim}, "
              f"{n_params:,} parameters ({model.num_params(exclude_embedding=True):,} without embedding), "
              f"{fpt / 1e6:.1f} MFLOPs/token forward", flush=True)
        if cfg.job.description:
            print(f"job: {cfg.job.description}")
    model = parallelize(model, cfg, world_size, device)
    model.to_empty(device=device)
    model.init_weights()

    use_bf16 = cfg.training.mixed_precision == "bf16" or (cfg.training.mixed_precision == "auto" and device.type == "cuda")
    if use_bf16 and world_size == 1:
        def autocast():
            return torch.autocast(device.type, dtype=torch.bfloat16)
    else:  # fp32, or bf16 through FSDP's mixed-precision policy
        autocast = nullcontext

    optimizer = build_optimizer(model, cfg.optimizer)
    scheduler = build_lr_scheduler(optimizer, cfg.training.steps, cfg.lr_scheduler)
    loader = build_dataloader(cfg, rank, world_size)
    accum = grad_accum_steps(cfg, world_size)
    dump = Path(cfg.job.dump_folder)
    tb_dir = dump / cfg.metrics.save_tb_folder if cfg.metrics.enable_tensorboard else None
    metrics = MetricsLogger(tb_dir, cfg.metrics.log_freq, rank, device, fpt,
                            H200_BF16_PEAK if device.type == "cuda" else None)

    last: dict[str, float] = {}
    for step in range(1, cfg.training.steps + 1):
        step_loss = 0.0
        for _ in range(accum):
            t_data = time.perf_counter()
            batch = next(loader)
            inputs, labels = batch["inputs"].to(device), batch["labels"].to(device)
            data_time = time.perf_counter() - t_data
            with autocast():
                logits = model(inputs)
            loss, correct, scored = loss_and_accuracy(logits, labels)
            (loss / accum).backward()
            step_loss += float(loss.detach()) / accum
            metrics.record(float(loss.detach()), inputs.numel(), correct, scored, data_time)
        if not math.isfinite(step_loss):
            raise TrainingError(f"loss is {step_loss} at step {step}; lower optimizer.lr or check the data")
        max_norm = cfg.training.max_norm if cfg.training.max_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % cfg.metrics.log_freq == 0 or step == cfg.training.steps:
            last = metrics.log(step, lr, float(grad_norm))

    val_loader = build_dataloader(cfg, rank, world_size, split="val")
    val = evaluate(model, val_loader, 4, device, autocast)
    last["loss/val"] = val
    metrics.scalar("loss/val", val, cfg.training.steps)
    if rank == 0:
        print(f"validation loss {val:.4f} after {cfg.training.steps} steps", flush=True)
    metrics.close()
    if world_size > 1:
        dist.destroy_process_group()
    return last


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, print_config = parse_args(argv)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if print_config:
        print(to_toml(cfg))
        return 0
    try:
        train(cfg)
    except (TrainingError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
