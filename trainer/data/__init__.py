"""Data loaders. ``build_dataloader`` turns the ``[data]`` config into an endless batch iterator.

Every loader yields dicts with ``inputs`` and ``labels`` (B, T) int64 tensors
(labels equal to ``IGNORE`` are not scored) and has ``state_dict`` /
``load_state_dict`` so a resumed run continues with the same batches;
:func:`load_resharded` carries a state over to another number of ranks. The text and
shards loaders also yield ``reset`` (B, T) bool: True where a new document starts.

Where each dataset lives: ``mqar`` and ``bytes`` (``text.py``) are generated or
embedded; ``text`` streams documents from a source (``sources.py``), tokenizes them
(``tokenizer.py``) and packs them (``packing.py``); ``shards`` reads token shards
(``shards.py``) written by ``longhorn-zoo prepare`` (``prepare.py``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from torch import Tensor

from longhorn_zoo.config import JobConfig
from longhorn_zoo.data.errors import DataError
from longhorn_zoo.data.mqar import IGNORE, MQAR
from longhorn_zoo.data.packing import PackedTextStream
from longhorn_zoo.data.shards import ShardLoader, ShardSet, read_index
from longhorn_zoo.data.sources import TextSource
from longhorn_zoo.data.text import BYTE_VOCAB, ByteWindows, split_corpus
from longhorn_zoo.data.tokenizer import TIKTOKEN_FILES, ByteTokenizer, Tokenizer, build_tokenizer

__all__ = ["IGNORE", "DataError", "Loader", "RankSlice", "batch_order", "build_dataloader", "load_resharded",
           "resolve_tokenizer", "resolve_vocab_size", "run_tokenizer"]


class Loader(Protocol):
    def __iter__(self) -> Iterator[dict[str, Tensor]]: ...
    def __next__(self) -> dict[str, Tensor]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def data_vocab_size(cfg: JobConfig) -> tuple[int, str]:
    """The smallest model vocabulary the configured data needs, and where that number comes from."""
    d = cfg.data
    if d.dataset == "mqar":
        return d.mqar_vocab_size, "data.mqar_vocab_size"
    if d.dataset == "bytes":
        return BYTE_VOCAB, "byte-level data"
    if d.dataset == "text":
        return build_tokenizer(d.tokenizer).vocab_size, f"tokenizer {d.tokenizer}, padded to a multiple of 64"
    if d.dataset == "shards":
        meta = read_index(Path(d.shard_dir) / "train")["meta"]
        return int(meta["vocab_size"]), f"tokenizer {meta['tokenizer']} of the shards in {d.shard_dir}"
    raise ValueError(f"unknown data.dataset {d.dataset!r}")


def resolve_vocab_size(cfg: JobConfig) -> int:
    """Set ``model.vocab_size`` from the data when it is -1; raise DataError if it is too small."""
    need, why = data_vocab_size(cfg)
    if cfg.model.vocab_size == -1:
        cfg.model.vocab_size = need
    elif cfg.model.vocab_size < need:
        raise DataError(f"model.vocab_size {cfg.model.vocab_size} is smaller than the data's vocabulary {need} "
                        f"({why}); set model.vocab_size = {need}, or -1 to take it from the data")
    return cfg.model.vocab_size


def resolve_tokenizer(cfg: JobConfig) -> str | None:
    """Set ``data.tokenizer`` to the tokenizer the data is in and return it; None for mqar, which has none.

    Byte data is byte-level whatever ``data.tokenizer`` says, token shards name theirs in their
    index, and a local tokenizer file is made absolute. Training records the result in the run's
    ``config.toml``, so that eval, generate and export use the tokenizer the run trained with.
    """
    d = cfg.data
    if d.dataset == "mqar":
        return None
    if d.dataset == "bytes":
        d.tokenizer = "bytes"
    elif d.dataset == "shards":
        d.tokenizer = str(read_index(Path(d.shard_dir) / "train")["meta"]["tokenizer"])
    elif d.tokenizer != "bytes" and d.tokenizer not in TIKTOKEN_FILES and Path(d.tokenizer).is_file():
        d.tokenizer = str(Path(d.tokenizer).resolve())
    return d.tokenizer


def run_tokenizer(cfg: JobConfig) -> Tokenizer | None:
    """The tokenizer of a trained run's config (as :func:`resolve_tokenizer` recorded it); None for mqar."""
    if cfg.data.dataset == "mqar":
        return None
    return ByteTokenizer() if cfg.data.dataset == "bytes" else build_tokenizer(cfg.data.tokenizer)


class RankSlice:
    """This rank's rows of a batch drawn for all ranks, so a step's data does not depend on the rank count.

    Every rank draws the same ``local x world_size`` rows from one seed and keeps
    rows ``[rank x local, (rank + 1) x local)``: 2 ranks see exactly the global
    batch that 1 rank of twice the local batch would. Used for the generated
    (mqar) and embedded (bytes) data, whose rows are cheap.
    """

    def __init__(self, loader: Loader, rank: int, local_batch_size: int) -> None:
        self.loader, self.lo, self.hi = loader, rank * local_batch_size, (rank + 1) * local_batch_size

    def __iter__(self) -> RankSlice:
        return self

    def __next__(self) -> dict[str, Tensor]:
        return {k: v[self.lo : self.hi] for k, v in next(self.loader).items()}

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)


def build_dataloader(cfg: JobConfig, rank: int, world_size: int, split: str = "train") -> Loader:
    """The loader of ``split`` ("train" or "val") for data-parallel ``rank`` of ``world_size``."""
    d, t = cfg.data, cfg.training
    resolve_vocab_size(cfg)
    if d.document_boundaries and d.dataset not in ("text", "shards"):
        raise DataError(f"data.document_boundaries needs documents, and data.dataset = {d.dataset!r} has none "
                        "(its rows are windows of one stream); use text or shards, or set it to false")
    seed = cfg.training.seed * 1000 + (500 if split == "val" else 0)
    rows = t.local_batch_size * world_size
    if d.dataset in ("mqar", "bytes"):
        if d.dataset == "mqar":
            loader = MQAR(rows, t.seq_len, d.mqar_num_kv_pairs, d.mqar_vocab_size, seed)
        else:
            train, val = split_corpus(d.val_fraction)
            loader = ByteWindows(train if split == "train" else val, rows, t.seq_len, seed)
        return loader if world_size == 1 else RankSlice(loader, rank, t.local_batch_size)
    if d.dataset == "text":
        source = TextSource(d.source, d.text_field, d.hf_config, d.txt_sample_by, d.val_split, d.val_docs,
                            d.hf_revision)
        return PackedTextStream(source, split, build_tokenizer(d.tokenizer), t.local_batch_size, t.seq_len,
                                rank, world_size)
    if d.dataset == "shards":  # every rank draws from one permutation, so the seed is shared
        return ShardLoader(ShardSet(Path(d.shard_dir) / split), t.local_batch_size, t.seq_len, rank, world_size,
                           cfg.training.seed * 1000 + (500 if split == "val" else 0), d.shuffle)
    raise ValueError(f"unknown data.dataset {d.dataset!r}")


def batch_order(loader: Loader, saved_micro_batch: int, micro_batch: int) -> str:
    """How the batches of a resumed run compare with an uninterrupted run's, in a few words.

    Args:
        loader: This run's loader.
        saved_micro_batch, micro_batch: Sequences per micro-step over all ranks, when the
            checkpoint was saved and now.
    """
    if saved_micro_batch == micro_batch or isinstance(loader, ShardLoader | PackedTextStream):
        return "unchanged"  # a position in one sequence (or document) order, whatever the batch size
    return (f"new batches from the saved generator ({micro_batch} sequences per draw over all ranks, was "
            f"{saved_micro_batch}), not those of an uninterrupted run")


def load_resharded(loader: Loader, state: dict[str, Any], saved_world_size: int, saved_micro_batch: int,
                   micro_batch: int) -> str:
    """Load into ``loader`` the state of a rank of a run on ``saved_world_size`` ranks; returns how the data
    order compares with an uninterrupted run's (see :func:`batch_order`).

    Generated and embedded data (mqar, bytes) keep one generator for all ranks, so the state carries
    over as it is. Shards and text streams keep a position per rank: it is recomputed from the global
    number of sequences (or documents) read.
    """
    if isinstance(loader, ShardLoader | PackedTextStream):
        return loader.load_resharded(state, saved_world_size)
    loader.load_state_dict(state)
    return batch_order(loader, saved_micro_batch, micro_batch)
