"""Data loaders. ``build_dataloader`` turns the ``[data]`` config into an endless batch iterator.

Every loader yields dicts with ``inputs`` and ``labels`` (B, T) int64 tensors
(labels equal to ``IGNORE`` are not scored) and has ``state_dict`` /
``load_state_dict`` so a resumed run continues with the same batches.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from torch import Tensor

from trainer.config import JobConfig
from trainer.data.mqar import IGNORE, MQAR
from trainer.data.text import BYTE_VOCAB, ByteWindows, split_corpus

__all__ = ["IGNORE", "Loader", "build_dataloader"]


class Loader(Protocol):
    def __iter__(self) -> Iterator[dict[str, Tensor]]: ...
    def __next__(self) -> dict[str, Tensor]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def build_dataloader(cfg: JobConfig, rank: int, world_size: int, split: str = "train") -> Loader:
    """The loader of ``split`` ("train" or "val") for data-parallel ``rank`` of ``world_size``."""
    d, t = cfg.data, cfg.training
    seed = cfg.training.seed * 1000 + rank + (500 if split == "val" else 0)
    if d.dataset == "mqar":
        if cfg.model.vocab_size < d.mqar_vocab_size:
            raise ValueError(f"model.vocab_size {cfg.model.vocab_size} is smaller than data.mqar_vocab_size "
                             f"{d.mqar_vocab_size}; set model.vocab_size >= {d.mqar_vocab_size}")
        return MQAR(t.local_batch_size, t.seq_len, d.mqar_num_kv_pairs, d.mqar_vocab_size, seed)
    if d.dataset == "bytes":
        if cfg.model.vocab_size < BYTE_VOCAB:
            raise ValueError(f"byte-level data needs model.vocab_size >= {BYTE_VOCAB}, got {cfg.model.vocab_size}")
        train, val = split_corpus(d.val_fraction)
        return ByteWindows(train if split == "train" else val, t.local_batch_size, t.seq_len, seed)
    raise ValueError(f"unknown data.dataset {d.dataset!r}")
