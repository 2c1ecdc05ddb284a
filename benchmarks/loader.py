"""Tokens per second one process's loader feeds from prepared token shards.

Usage: ``python benchmarks/loader.py [--shard-dir OUT/train] [--batch-size 16] [--seq-len 2048]``.

Without ``--shard-dir`` it first writes synthetic shards (random gpt2-sized ids, documents
of about 1000 tokens on average) to a temporary folder. It then times ``next(loader)`` of
a :class:`ShardLoader` (shuffled, as training reads it) for ``--seconds`` after a warm-up;
each batch is the int64 ``inputs``/``labels`` and the ``reset`` mask, as the trainer gets them.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from longhorn_zoo.data.shards import ShardLoader, ShardSet, ShardWriter


def write_synthetic(folder: Path, tokens: int, vocab: int = 50304, eos: int = 50256, seed: int = 0) -> None:
    """``tokens`` random ids in shards of 100M, a document ending (EOS) every 1000 tokens on average."""
    rng = np.random.default_rng(seed)
    meta = {"tokenizer": "synthetic", "vocab_size": vocab, "eos_id": eos, "dtype": "uint16"}
    writer = ShardWriter(folder, meta, shard_tokens=100_000_000)
    for start in range(0, tokens, 1 << 22):
        chunk = rng.integers(0, eos, min(1 << 22, tokens - start), dtype=np.uint16)
        chunk[rng.random(len(chunk)) < 1e-3] = eos
        chunk[-1] = eos
        writer.append(chunk, int((chunk == eos).sum()))
    writer.finish()


def measure(loader: ShardLoader, seconds: float) -> tuple[float, int]:
    """Tokens per second over ``seconds`` of ``next(loader)``, and the number of batches timed."""
    for _ in range(20):
        next(loader)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        batch = next(loader)
        n += 1
    elapsed = time.perf_counter() - t0
    return n * batch["inputs"].numel() / elapsed, n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shard-dir", default="", help="a prepared split (OUT/train); default: synthetic shards")
    p.add_argument("--tokens", type=int, default=200_000_000, help="synthetic tokens to write")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--seconds", type=float, default=5.0)
    a = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(a.shard_dir or tmp)
        if not a.shard_dir:
            write_synthetic(folder, a.tokens)
        shards = ShardSet(folder)
        total = sum(len(x) for x in shards.arrays)
        print(f"{total:,} tokens in {len(shards.arrays)} shards ({shards.arrays[0].dtype}), torch {torch.__version__}")
        for shuffle in (True, False):
            loader = ShardLoader(shards, a.batch_size, a.seq_len, seed=0, shuffle=shuffle)
            rate, n = measure(loader, a.seconds)
            print(f"B={a.batch_size} T={a.seq_len} shuffle={shuffle}: {rate / 1e6:.1f}M tokens/s per process "
                  f"({n} batches, {1e6 * a.seconds / n:.0f} us/batch)")


if __name__ == "__main__":
    main()
