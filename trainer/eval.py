"""Evaluation of a trained model: ``python -m longhorn_zoo.eval --checkpoint DIR``.

* Validation loss and perplexity on the held-out split.
* Length extrapolation: loss and perplexity at 1x, 2x, 4x, 8x and 16x the training
  context, on the same number of tokens per length (printed as a table, plotted to
  ``extrapolation.png`` when matplotlib is installed, and written as TensorBoard
  scalars ``eval/ppl_at_<len>``).
* For models trained on MQAR: recall accuracy over sequence lengths and numbers of
  key-value pairs (``eval/mqar_acc_kv<P>_len<T>``).

``--json PATH`` also writes the measured numbers, with the model's parameter counts,
as one JSON object (``scripts/study.py`` collects them).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import torch

from longhorn_zoo.config import JobConfig
from longhorn_zoo.data import build_dataloader
from longhorn_zoo.data.mqar import make_batch
from longhorn_zoo.model import LM
from longhorn_zoo.train import loss_and_accuracy, model_inputs

FACTORS = (1, 2, 4, 8, 16)


@torch.no_grad()
def mean_loss(model: LM, cfg: JobConfig, seq_len: int, tokens: int, device: str) -> float:
    """Mean validation loss over about ``tokens`` tokens in windows of ``seq_len``."""
    batch = max(1, min(cfg.training.local_batch_size, tokens // seq_len))
    run = dataclasses.replace(cfg, training=dataclasses.replace(cfg.training, seq_len=seq_len, local_batch_size=batch))
    loader = build_dataloader(run, 0, 1, split="val")
    n_batches = max(1, tokens // (seq_len * batch))
    total = 0.0
    for _ in range(n_batches):
        b = next(loader)
        inputs, reset = model_inputs(b, cfg, device)
        total += float(loss_and_accuracy(model(inputs, reset=reset), b["labels"].to(device))[0])
    return total / n_batches


def extrapolation(model: LM, cfg: JobConfig, tokens: int, device: str) -> list[tuple[int, float]]:
    """(length, loss) at each factor of the training context that the model can read (a learned position
    embedding stops at the training context)."""
    longest = model.max_positions
    return [(f * cfg.training.seq_len, mean_loss(model, cfg, f * cfg.training.seq_len, tokens, device))
            for f in FACTORS if longest is None or f * cfg.training.seq_len <= longest]


@torch.no_grad()
def mqar_sweep(model: LM, cfg: JobConfig, device: str, batches: int = 4) -> list[tuple[int, int, float]]:
    """(pairs, seq_len, accuracy) over pair counts and lengths that the vocabulary allows (and, with a learned
    position embedding, that the model can read)."""
    gen = torch.Generator().manual_seed(cfg.training.seed + 12345)
    vocab = cfg.data.mqar_vocab_size
    base = cfg.data.mqar_num_kv_pairs
    longest = model.max_positions
    rows = []
    for pairs in sorted({max(1, base // 2), base, 2 * base}):
        if pairs > vocab // 2 - 1:
            continue
        shortest = max(4 * pairs, cfg.training.seq_len)
        for seq_len in sorted({4 * pairs, shortest, 2 * shortest}):
            if longest is not None and seq_len > longest:
                continue
            correct = scored = 0
            for _ in range(batches):
                b = make_batch(cfg.training.local_batch_size, seq_len, pairs, vocab, gen)
                _, c, s = loss_and_accuracy(model(b["inputs"].to(device)), b["labels"].to(device))
                correct, scored = correct + int(c), scored + int(s)
            rows.append((pairs, seq_len, correct / max(scored, 1)))
    return rows


def plot(rows: list[tuple[int, float]], path: Path, title: str) -> Path | None:
    """Perplexity against length as a PNG; None if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r[0] for r in rows], [math.exp(r[1]) for r in rows], marker="o")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("evaluation length (tokens)")
    ax.set_ylabel("perplexity")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    from longhorn_zoo.inference import add_checkpoint_args, load_from_args

    p = argparse.ArgumentParser(prog="python -m longhorn_zoo.eval", description=__doc__.splitlines()[0])
    add_checkpoint_args(p)
    p.add_argument("--tokens", type=int, default=16384, help="validation tokens per evaluated length")
    p.add_argument("--out", type=Path, help="folder for the plot and TensorBoard events (default: the dump folder)")
    p.add_argument("--json", type=Path, help="also write the numbers to this JSON file")
    args = p.parse_args(argv)
    loaded = load_from_args(args)
    if loaded is None:
        return 1
    model, cfg = loaded
    out = args.out or Path(cfg.job.dump_folder)
    out.mkdir(parents=True, exist_ok=True)
    from torch.utils.tensorboard import SummaryWriter

    from longhorn_zoo.metrics import new_run_folder

    writer = SummaryWriter(str(new_run_folder(out / "tb_eval")))
    name = cfg.model.name
    result = {"mixer": name, "n_layers": cfg.model.n_layers, "dim": cfg.model.dim, "dataset": cfg.data.dataset,
              "seq_len": cfg.training.seq_len, "params": model.num_params(),
              "params_non_embedding": model.num_params(exclude_embedding=True),
              "device": torch.cuda.get_device_name(args.device) if str(args.device).startswith("cuda") else "cpu",
              "torch": torch.__version__}
    if cfg.data.dataset == "mqar":
        print(f"MQAR recall accuracy of {name}\n  pairs  seq_len  accuracy")
        sweep = mqar_sweep(model, cfg, args.device)
        for pairs, seq_len, acc in sweep:
            print(f"  {pairs:5d}  {seq_len:7d}  {acc:8.3f}")
            writer.add_scalar(f"eval/mqar_acc_kv{pairs}_len{seq_len}", acc)
        if model.max_positions is not None:
            print(f"  (lengths up to {model.max_positions} only: the learned position embedding's positions)")
        result["mqar_num_kv_pairs"] = cfg.data.mqar_num_kv_pairs
        result["mqar"] = [{"pairs": p, "seq_len": t, "accuracy": a} for p, t, a in sweep]
    else:
        rows = extrapolation(model, cfg, args.tokens, args.device)
        val = rows[0][1]
        print(f"validation loss {val:.4f}, perplexity {math.exp(val):.3f} ({name}, context {cfg.training.seq_len})")
        print("  length  factor    loss  perplexity")
        for (length, loss), factor in zip(rows, FACTORS):
            print(f"  {length:6d}  {factor:5d}x  {loss:6.4f}  {math.exp(loss):10.3f}")
            writer.add_scalar(f"eval/ppl_at_{length}", math.exp(loss))
        if len(rows) < len(FACTORS):
            print(f"  (no longer lengths: the learned position embedding has {model.max_positions} positions)")
        writer.add_scalar("eval/val_loss", val)
        png = plot(rows, out / "extrapolation.png", f"{name}: trained at {cfg.training.seq_len} tokens")
        print(f"plot: {png}" if png else "plot: skipped (pip install matplotlib)")
        result["tokens_per_length"] = args.tokens
        result["val_loss"] = val
        result["extrapolation"] = [{"factor": f, "length": length, "loss": loss, "ppl": math.exp(loss)}
                                   for (length, loss), f in zip(rows, FACTORS)]
    writer.close()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"numbers: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
