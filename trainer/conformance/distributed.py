"""The distributed check: FSDP2 over 2 CPU ranks (gloo) against one unsharded rank.

Two processes are spawned. Each builds the tiny LM the way the trainer does (meta
device, ``fully_shard`` per block and at the root, ``to_empty``, ``init_weights``
on the sharded parameters), loads the weights of an unsharded reference model and
runs forward and backward on its half of the batch. Rank 0 compares the averaged
loss and the gathered gradients with the reference's on the whole batch.
"""

from __future__ import annotations

import json
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from longhorn_zoo.conformance.harness import FP32_TOL, Conformance, ConformanceError, describe_mismatch, error_ratio

WORLD_SIZE = 2


def _compare(c: Conformance) -> str | None:
    """Run on every rank; returns the first disagreement (on rank 0) or None."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    from longhorn_zoo.model import build_model
    from longhorn_zoo.parallelize import apply_fsdp

    rank = dist.get_rank()
    inputs, labels = c.tokens(batch=2 * WORLD_SIZE)
    reference = c.model(seed=0)
    ref_loss = c.loss(reference, inputs, labels)
    ref_loss.backward()

    with c.checking("distributed", "fully_shard of the meta-device model"):
        model = build_model(c.config.model, c.seq_len, "meta")
        apply_fsdp(model, init_device_mesh("cpu", (WORLD_SIZE,)), torch.float32, torch.float32)
        model.to_empty(device="cpu")
    with c.checking("distributed", "init_weights() on sharded (DTensor) parameters"):
        c.init(model, seed=0)
    with c.checking("distributed", "loading the reference weights into the sharded model"):
        set_model_state_dict(model, reference.state_dict(), options=StateDictOptions(full_state_dict=True))
    local = slice(2 * rank, 2 * rank + 2)
    with c.checking("distributed", "forward and backward of the sharded model"):
        loss = c.loss(model, inputs[local], labels[local])
        loss.backward()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    got, want = mean_loss.item() / WORLD_SIZE, ref_loss.item()
    problems = []
    if abs(got - want) > FP32_TOL * abs(want):
        problems.append(f"loss on 2 ranks {got:.6f} vs 1 rank {want:.6f}")
    ref_grads = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        if p.grad is None:
            problems.append(f"{name} gets no gradient on 2 ranks")
            continue
        grad = p.grad.full_tensor()  # a collective: every rank gathers every gradient in the same order
        want = ref_grads[name].grad
        if error_ratio(grad, want) > FP32_TOL:
            problems.append(f"gradient of {name} on 2 ranks differs from 1 rank: {describe_mismatch(grad, want)}")
    return problems[0] if problems and rank == 0 else None


def _worker(rank: int, settings: list[dict[str, Any]], folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank,
                            world_size=WORLD_SIZE, timeout=timedelta(seconds=120))
    problems: list[str | None] = []
    try:
        for one in settings:
            try:
                problems.append(_compare(Conformance(**one)))
            except ConformanceError as e:
                problems.append(e.detail)
            except Exception as e:
                problems.append(f"raised {type(e).__name__}: {e}")
            dist.barrier()
        Path(folder, f"rank{rank}.json").write_text(json.dumps(problems))
    finally:
        dist.destroy_process_group()


def distributed_problems(confs: list[Conformance]) -> list[str | None]:
    """Run the distributed comparison for several mixers in one pair of processes.

    Starting two Python processes costs more than checking a tiny mixer, so the
    pytest suite batches every mixer of a session into one call.

    Returns:
        For each mixer, None if it passes, else what went wrong.
    """
    with tempfile.TemporaryDirectory() as folder:
        try:
            mp.start_processes(_worker, args=([c.settings() for c in confs], folder), nprocs=WORLD_SIZE,
                               start_method="spawn")
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as e:
            crash = f"a rank crashed: {str(e).strip().splitlines()[-1]}"
            return [crash] * len(confs)
        per_rank = [json.loads(Path(folder, f"rank{rank}.json").read_text()) for rank in range(WORLD_SIZE)]
    return [next((p if r == 0 else f"rank {r}: {p}" for r, p in enumerate(ps) if p), None) for ps in zip(*per_rank)]


def check_distributed(c: Conformance) -> None:
    """FSDP2 (``fully_shard``) on 2 CPU ranks gives the loss and gradients of 1 rank."""
    problem = distributed_problems([c])[0]
    if problem:
        raise c.fail("distributed", problem)
