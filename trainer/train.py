"""The training entry point: ``python -m longhorn_zoo.train [CONFIG.toml] [--section.key value ...]``.

One batch's path: the loader yields ``inputs``/``labels`` (longhorn_zoo.data), and ``reset``
at document starts, which goes along with ``data.document_boundaries`` -> the LM
(longhorn_zoo.model, mixers from plugins) under autocast -> cross-entropy on scored
labels -> backward, accumulated over micro-batches up to the global batch ->
clip -> AdamW step and LR schedule (longhorn_zoo.optim) -> metrics (longhorn_zoo.metrics) ->
checkpoint on interval, last step or SIGTERM (longhorn_zoo.checkpoint, which also resumes); traces and
memory snapshots on request (longhorn_zoo.profiling).
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from longhorn_zoo.checkpoint import CheckpointError, CheckpointManager, SigtermFlag
from longhorn_zoo.config import ConfigError, JobConfig, parse_args, to_toml
from longhorn_zoo.data import IGNORE, build_dataloader, resolve_tokenizer, resolve_vocab_size
from longhorn_zoo.metrics import MetricsLogger, build_metrics_logger
from longhorn_zoo.model import LM, build_model, flops_per_token
from longhorn_zoo.ops import set_backend_preference
from longhorn_zoo.optim import build_lr_scheduler, build_optimizer
from longhorn_zoo.parallelize import parallelize
from longhorn_zoo.profiling import Profiler

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


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (in float32) of logits (B, T, V) over the scored labels (B, T)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE)


def build_loss(cfg: JobConfig) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss, compiled with the model (``[compile] enable``): one fused pass over the logits instead of
    a float32 copy, a log-softmax and their gradients (B x T x vocab floats each) in memory."""
    return torch.compile(cross_entropy, backend=cfg.compile.backend) if cfg.compile.enable else cross_entropy


def loss_and_accuracy(logits: torch.Tensor, labels: torch.Tensor,
                      loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = cross_entropy,
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean cross-entropy over scored labels, and the (correct, scored) counts for accuracy, all three
    0-d tensors on the logits' device: nothing here waits for the device."""
    loss = loss_fn(logits, labels)
    with torch.no_grad():
        lab = labels.flatten()
        scored = lab != IGNORE
        correct = ((logits.flatten(0, 1).argmax(-1) == lab) & scored).sum()
    return loss, correct, scored.sum()


def model_inputs(batch: dict[str, torch.Tensor], cfg: JobConfig,
                 device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The batch's ``inputs`` on ``device``, and its document starts when ``data.document_boundaries`` is on."""
    reset = batch["reset"].to(device) if cfg.data.document_boundaries else None
    return batch["inputs"].to(device), reset


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
def evaluate(model: torch.nn.Module, cfg: JobConfig, rank: int, world_size: int, device: torch.device,
             autocast: Callable[[], AbstractContextManager]) -> float:
    """Mean loss over ``training.eval_batches`` batches of the validation split, over all ranks."""
    model.eval()
    loader = build_dataloader(cfg, rank, world_size, split="val")
    total = 0.0
    for _ in range(cfg.training.eval_batches):
        batch = next(loader)
        inputs, reset = model_inputs(batch, cfg, device)
        with autocast():
            logits = model(inputs, reset=reset)
        total += float(loss_and_accuracy(logits, batch["labels"].to(device))[0])
    model.train()
    mean = total / cfg.training.eval_batches
    if dist.is_initialized():  # every rank scored its own rows: average them
        t = torch.tensor([mean], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        mean = float(t) / world_size
    return mean


def build_autocast(cfg: JobConfig, device: torch.device, world_size: int) -> Callable[[], AbstractContextManager]:
    """bf16 autocast on CUDA (or when asked) for one rank; FSDP's mixed-precision policy does it for several."""
    mp = cfg.training.mixed_precision
    if (mp == "bf16" or (mp == "auto" and device.type == "cuda")) and world_size == 1:
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext


def train_step(model: torch.nn.Module, loader: Iterator[dict[str, torch.Tensor]], optimizer: torch.optim.Optimizer,
               scheduler: torch.optim.lr_scheduler.LRScheduler, cfg: JobConfig, accum: int, device: torch.device,
               autocast: Callable[[], AbstractContextManager], metrics: MetricsLogger, step: int,
               loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = cross_entropy) -> tuple[float, float]:
    """One optimizer step over ``accum`` micro-batches; returns (lr used, gradient norm before clipping).

    The host waits for the device once per step, after clipping: the losses, accuracy counts and the norm
    stay on the device until then, so the backward and the clipping are queued while the forward still
    runs, and the next step's forward while the optimizer does. A non-finite loss stops the run there,
    before the optimizer step."""
    stats, sizes = [], []
    for _ in range(accum):
        t_data = time.perf_counter()
        batch = next(loader)
        (inputs, reset), labels = model_inputs(batch, cfg, device), batch["labels"].to(device)
        data_time = time.perf_counter() - t_data
        with autocast():
            logits = model(inputs, reset=reset)
        loss, correct, scored = loss_and_accuracy(logits, labels, loss_fn)
        (loss / accum).backward()
        stats.append(torch.stack([loss.detach().double(), correct.double(), scored.double()]))
        sizes.append((inputs.numel(), data_time))
    max_norm = cfg.training.max_norm if cfg.training.max_norm > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
        grad_norm = grad_norm.full_tensor()
    *micro, norm = torch.cat([*stats, grad_norm.detach().double().reshape(1).to(stats[0].device)]).tolist()
    step_loss = 0.0
    for loss_i, correct_i, scored_i, (tokens, data_time) in zip(micro[0::3], micro[1::3], micro[2::3], sizes):
        step_loss += loss_i / accum
        metrics.record(loss_i, tokens, int(correct_i), int(scored_i), data_time)
    if not math.isfinite(step_loss):
        raise TrainingError(f"loss is {step_loss} at step {step}; lower optimizer.lr or check the data")
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return lr, norm


def build_model_for_training(cfg: JobConfig, rank: int, world_size: int, device: torch.device) -> tuple[LM, float]:
    """The model on the meta device, reported, parallelized, then materialised on ``device``; and FLOPs/token."""
    model: LM = build_model(cfg.model, cfg.training.seq_len, "meta")
    fpt = flops_per_token(model, cfg.training.seq_len)
    if rank == 0:
        print(f"model: {cfg.model.name}, {cfg.model.n_layers} layers x {cfg.model.dim}, "
              f"{model.num_params():,} parameters ({model.num_params(exclude_embedding=True):,} without embedding), "
              f"{fpt / 1e6:.1f} MFLOPs/token forward", flush=True)
        if cfg.job.description:
            print(f"job: {cfg.job.description}")
    model = parallelize(model, cfg, world_size, device)
    model.to_empty(device=device)
    model.init_weights()
    return model, fpt


def train(cfg: JobConfig) -> dict[str, float]:
    """Run the job described by ``cfg``; returns the last logged metrics."""
    device = pick_device(cfg, int(os.environ.get("LOCAL_RANK", "0")))
    sigterm = SigtermFlag(device)  # first, so that a SIGTERM during start-up stops the run after its first step
    try:
        return _train(cfg, device, sigterm)
    finally:
        sigterm.restore()


def _train(cfg: JobConfig, device: torch.device, sigterm: SigtermFlag) -> dict[str, float]:
    """:func:`train` after the device and the SIGTERM flag are set up."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    set_backend_preference(cfg.model.op_backend)
    resolve_vocab_size(cfg)  # model.vocab_size from the tokenizer if -1; an error if too small
    resolve_tokenizer(cfg)  # data.tokenizer: the one the data is in, recorded in config.toml below
    torch.manual_seed(cfg.training.seed)

    model, fpt = build_model_for_training(cfg, rank, world_size, device)
    autocast = build_autocast(cfg, device, world_size)
    loss_fn = build_loss(cfg)
    optimizer = build_optimizer(model, cfg.optimizer)
    scheduler = build_lr_scheduler(optimizer, cfg.training.steps, cfg.lr_scheduler)
    loader = build_dataloader(cfg, rank, world_size)
    accum = grad_accum_steps(cfg, world_size)
    dump = Path(cfg.job.dump_folder)
    if rank == 0:  # the resolved config, for resuming by hand and for longhorn_zoo.eval / longhorn_zoo.generate
        dump.mkdir(parents=True, exist_ok=True)
        (dump / "config.toml").write_text(to_toml(cfg))
    ckpt = CheckpointManager(cfg, model, optimizer, scheduler, loader, rank, world_size, device)
    if cfg.checkpoint.create_seed_checkpoint:
        if world_size > 1 or not cfg.checkpoint.enable:
            raise TrainingError("checkpoint.create_seed_checkpoint needs one rank and checkpoint.enable = true")
        ckpt.save(0)
        return {}
    start = ckpt.load()
    if start >= cfg.training.steps:
        if rank == 0:
            print(f"nothing to do: the checkpoint of step {start} in {ckpt.folder} has reached training.steps = "
                  f"{cfg.training.steps}; raise training.steps to train further", flush=True)
        if world_size > 1:
            dist.destroy_process_group()
        return {}
    metrics = build_metrics_logger(cfg, rank, device, fpt, H200_BF16_PEAK if device.type == "cuda" else None)
    tb_dir = dump / cfg.metrics.save_tb_folder if cfg.metrics.enable_tensorboard else None  # one folder per run inside
    sigterm = SigtermFlag(device)

    last: dict[str, float] = {}
    stop = False
    profiler = Profiler(cfg.profiling, dump, rank, device, start)
    for step in range(start + 1, cfg.training.steps + 1):
        lr, grad_norm = train_step(model, loader, optimizer, scheduler, cfg, accum, device, autocast, metrics, step,
                                   loss_fn)
        profiler.step(step)
        if step % cfg.metrics.log_freq == 0 or step in (start + 1, cfg.training.steps):
            last = metrics.log(step, lr, grad_norm)
        every = cfg.training.eval_interval
        if (every > 0 and step % every == 0) or step == cfg.training.steps:
            last["loss/val"] = evaluate(model, cfg, rank, world_size, device, autocast)
            metrics.scalar("loss/val", last["loss/val"], step)
            if rank == 0:
                print(f"step {step:6d}  validation loss {last['loss/val']:.4f}", flush=True)
        stop = sigterm.requested()
        ckpt.maybe_save(step, force=stop or step == cfg.training.steps)
        if stop:
            break
    profiler.close()
    ckpt.close(export=not stop)
    metrics.close()
    if rank == 0:
        print(end_of_run(cfg, step, stop, last, tb_dir), flush=True)
    if world_size > 1:
        dist.destroy_process_group()
    return last


def end_of_run(cfg: JobConfig, step: int, stopped: bool, last: dict[str, float], tb_dir: Path | None) -> str:
    """The run's last line: why it ended, its final losses, and where its outputs went."""
    ckpt = Path(cfg.job.dump_folder) / cfg.checkpoint.folder
    if stopped:
        saved = f"saved {ckpt / f'step-{step}'}; run the same command to resume" if cfg.checkpoint.enable else \
            "nothing saved (checkpoint.enable = false)"
        return f"SIGTERM: stopped after step {step}, {saved}"
    losses = ", ".join(f"{name} loss {last[key]:.4f}" for name, key in (("train", "loss/train"), ("val", "loss/val"))
                       if key in last)
    where = [f"outputs in {Path(cfg.job.dump_folder)}"]
    if cfg.checkpoint.enable:
        where.append(f"checkpoints in {ckpt}")
    if tb_dir is not None:
        where.append(f"TensorBoard events in {tb_dir}")
    return f"done: step {step}, {losses}; {', '.join(where)}"


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
    except (TrainingError, CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def run_command(argv: list[str] | None = None) -> int:
    """:func:`main`, ending a successful multi-process run with :func:`_exit_after_distributed_run`."""
    status = main(argv)
    if status == 0 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _exit_after_distributed_run(status)
    return status


def _exit_after_distributed_run(code: int) -> None:
    """Ends a process of a multi-process run without interpreter finalization.

    With gloo, a worker thread of a process group may still be releasing the last collective's
    tensors when the main thread returns; if the interpreter is finalizing by then, that thread
    cannot take the GIL, is terminated, and the process aborts (SIGABRT, "terminate called without
    an active exception") after a successful run. After a successful run everything it writes is
    closed (checkpoints, metrics), so the process flushes its streams and exits at once. A failed
    run exits normally, so that finalizers still flush what it left open.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(run_command())
