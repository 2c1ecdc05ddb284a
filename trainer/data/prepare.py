"""Tokenize a text source into token shards, with several processes; streaming and resumable.

    longhorn-zoo prepare --source slimpajama --tokenizer gpt2 --out /data/slimpajama_gpt2 \
        --val-split validation --max-tokens 100_000_000_000 --num-proc 32

(or ``python -m longhorn_zoo.data.prepare ...``) writes ``OUT/train`` and ``OUT/val``; train
with ``data.shard_dir = OUT``. See docs/data.md. It needs the ``data`` extra.

The reader streams documents in the source's order; worker processes tokenize chunks
of ``chunk_docs`` documents; the main process writes the chunks back in order through
a :class:`ShardWriter`. At most ``4 x num_proc`` chunks are in flight, so memory stays
bounded whatever the corpus size. After an interruption, running it again with the
same arguments skips the documents of the finished shards and carries on.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from longhorn_zoo.data.errors import DataError
from longhorn_zoo.data.shards import ShardWriter
from longhorn_zoo.data.sources import HUB_ALIASES, TextSource
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
    try:
        from tqdm import tqdm
    except ImportError:
        raise DataError("preparing shards needs tqdm (in the data extra): pip install 'longhorn-zoo[data]'") from None
    bar = tqdm(total=max_tokens or None, initial=writer.tokens, unit="tok", unit_scale=True, desc=desc,
               disable=not progress)
    for tokens, n_docs in packed:
        writer.append(tokens, n_docs)
        bar.update(len(tokens))
        if max_tokens and writer.tokens >= max_tokens:
            break
    writer.finish()
    bar.close()


def build_parser() -> argparse.ArgumentParser:
    """The options of ``longhorn-zoo prepare`` (``python -m longhorn_zoo.data.prepare``)."""
    p = argparse.ArgumentParser(prog="python -m longhorn_zoo.data.prepare",
                                description="Tokenize a text source into resumable token shards for "
                                            "data.dataset = 'shards' (needs pip install 'longhorn-zoo[data]').")
    p.add_argument("--source", required=True,
                   help=f"hub dataset id or alias ({', '.join(HUB_ALIASES)}), or a local txt/jsonl/parquet "
                        "file, glob or folder")
    p.add_argument("--out", required=True, help="output folder (gets train/ and val/)")
    p.add_argument("--tokenizer", default="gpt2",
                   help="bytes, gpt2, r50k_base, cl100k_base, o200k_base or a .tiktoken file")
    p.add_argument("--text-field", default="text", help="column holding the document text")
    p.add_argument("--hf-config", default="", help="hub dataset config name (e.g. sample-10BT)")
    p.add_argument("--hf-revision", default="", help="hub dataset branch, tag or commit (refs/convert/parquet "
                   "reads the Parquet export of a script-based dataset)")
    p.add_argument("--sample-by", default="paragraph", choices=("line", "paragraph", "document"),
                   help="txt files: what one document is")
    p.add_argument("--val-split", default="", help="source split for validation; empty holds out --val-docs")
    p.add_argument("--val-docs", type=int, default=1000, help="leading train documents held out for validation")
    p.add_argument("--splits", default="train,val", help="comma-separated splits to write")
    p.add_argument("--num-proc", type=int, default=os.cpu_count() or 1, help="tokenizer processes")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard (about)")
    p.add_argument("--max-tokens", type=int, default=0, help="stop the train split after this many tokens")
    p.add_argument("--chunk-docs", type=int, default=256, help="documents per tokenizer task")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (1 with the reason on a data error)."""
    a = build_parser().parse_args(argv)
    source = TextSource(a.source, a.text_field, a.hf_config, a.sample_by, a.val_split, a.val_docs,
                        a.hf_revision)
    try:
        indexes = prepare(source, a.tokenizer, a.out, tuple(a.splits.split(",")), a.num_proc, a.shard_tokens,
                          a.max_tokens, a.chunk_docs, not a.no_progress)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for split, index in indexes.items():
        print(f"{split}: {index['tokens']:,} tokens, {index['docs']:,} documents, {len(index['shards'])} shards")
    return 0


if __name__ == "__main__":
    sys.exit(main())
