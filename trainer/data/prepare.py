"""Tokenize a text source into token shards, with several processes; streaming and resumable.

The reader streams documents in the source's order; worker processes tokenize chunks
of ``chunk_docs`` documents; the main process writes the chunks back in order through
a :class:`ShardWriter`. At most ``4 x num_proc`` chunks are in flight, so memory stays
bounded whatever the corpus size. After an interruption, running it again with the
same arguments skips the documents of the finished shards and carries on.
The command line is ``data/prepare.py``.
"""

from __future__ import annotations

import multiprocessing as mp
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from longhorn_zoo.data.shards import ShardWriter
from longhorn_zoo.data.sources import TextSource
from longhorn_zoo.data.tokenizer import Tokenizer, build_tokenizer

_TOKENIZER: Tokenizer | None = None


def _init_worker(spec: str) -> None:
    global _TOKENIZER
    _TOKENIZER = build_tokenizer(spec)


def _pack(texts: list[str]) -> tuple[np.ndarray, int]:
    return _TOKENIZER.pack(texts), len(texts)


def _chunks(items: Iterator[str], size: int) -> Iterator[list[str]]:
    while chunk := list(islice(items, size)):
        yield chunk


def _ordered_map(pool: Any, fn: Callable, items: Iterable, inflight: int) -> Iterator:
    """``map(fn, items)`` on a pool, in order, with at most ``inflight`` items submitted ahead."""
    pending: deque = deque()
    for item in items:
        pending.append(pool.apply_async(fn, (item,)))
        if len(pending) >= inflight:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def prepare(source: TextSource, tokenizer: str, out: str | Path, splits: tuple[str, ...] = ("train", "val"),
            num_proc: int = 1, shard_tokens: int = 100_000_000, max_tokens: int = 0, chunk_docs: int = 256,
            progress: bool = True) -> dict[str, dict[str, Any]]:
    """Write ``out/<split>/`` token shards of ``source`` for each split; returns each split's index.

    Args:
        source: the documents (see TextSource).
        tokenizer: ``data.tokenizer`` spec: bytes, a tiktoken encoding name or a .tiktoken path.
        out: output folder; ``out/train`` and ``out/val`` are what ``data.shard_dir = out`` reads.
        num_proc: tokenizer processes (1 tokenizes in this process).
        shard_tokens: a shard is closed at the first document end past this many tokens.
        max_tokens: stop the train split after about this many tokens (0: the whole source).
        chunk_docs: documents per task sent to a worker.
        progress: show a tqdm progress bar.
    """
    tok = build_tokenizer(tokenizer)  # fails fast (offline, bad path) before any work
    meta = {"tokenizer": tokenizer, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "dtype": tok.dtype.name,
            "source": asdict(source)}
    writers = {split: ShardWriter(Path(out) / split, {**meta, "split": split}, shard_tokens) for split in splits}
    pool = mp.Pool(num_proc, _init_worker, (tokenizer,)) if num_proc > 1 else None  # before any reader thread
    if pool is None:
        _init_worker(tokenizer)
    try:
        for split, writer in writers.items():
            if writer.complete:
                print(f"{split}: already prepared ({writer.tokens:,} tokens)")
                continue
            chunks = _chunks(islice(source.documents(split), writer.docs, None), chunk_docs)
            packed = _ordered_map(pool, _pack, chunks, 4 * num_proc) if pool else map(_pack, chunks)
            _write(writer, packed, max_tokens if split == "train" else 0, f"{split} ({tokenizer})", progress)
    finally:
        if pool is not None:
            pool.terminate()
    return {split: w.index for split, w in writers.items()}


def _write(writer: ShardWriter, packed: Iterator[tuple[np.ndarray, int]], max_tokens: int, desc: str,
           progress: bool) -> None:
    from tqdm import tqdm

    bar = tqdm(total=max_tokens or None, initial=writer.tokens, unit="tok", unit_scale=True, desc=desc,
               disable=not progress)
    for tokens, n_docs in packed:
        writer.append(tokens, n_docs)
        bar.update(len(tokens))
        if max_tokens and writer.tokens >= max_tokens:
            break
    writer.finish()
    bar.close()
