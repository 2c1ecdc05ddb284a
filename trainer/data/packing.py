"""Packing documents into fixed-length sequences, and the loader that streams a text source.

Documents are tokenized and joined into one stream, each followed by EOS, and the
stream is cut into rows of ``seq_len + 1`` tokens that overlap by one (row k holds
stream[kT : kT + T + 1]), so no token is dropped. Every row also carries the token
before it, which marks whether the row's first input starts a document::

    inputs = row[:-1]   labels = row[1:]   reset[t] = (token before inputs[t]) == EOS

``reset`` is True where a new document starts (the first token of the whole stream
counts as one), for mixers that clear their state at document boundaries.
"""

from __future__ import annotations

from itertools import islice
from typing import Any

import numpy as np
import torch
from torch import Tensor

from longhorn_zoo.data.errors import DataError
from longhorn_zoo.data.sources import TextSource
from longhorn_zoo.data.tokenizer import Tokenizer

CHUNK_DOCS = 64  # documents tokenized at a time, per rank


def to_batch(windows: np.ndarray, eos_id: int) -> dict[str, Tensor]:
    """(B, T + 2) windows, each led by the token before it, as ``inputs``, ``labels`` and ``reset`` (B, T)."""
    w = torch.from_numpy(windows.astype(np.int64, copy=False))
    return {"inputs": w[:, 1:-1].contiguous(), "labels": w[:, 2:].contiguous(), "reset": w[:, :-2] == eos_id}


class PackedTextStream:
    """Endless packed batches tokenized on the fly from a text source, one data-parallel rank's share.

    Document i of the split goes to rank ``i % world_size``; each rank packs its own
    documents, so ranks never share a token. At the end of the split it starts over.
    The state is the number of documents read and the tokens not yet emitted, so a
    resumed loader yields exactly the batches the original would have; resuming
    re-reads (without tokenizing) the documents before that point.
    """

    def __init__(self, source: TextSource, split: str, tokenizer: Tokenizer, batch_size: int, seq_len: int,
                 rank: int = 0, world_size: int = 1) -> None:
        self.source, self.split, self.tok = source, split, tokenizer
        self.batch_size, self.seq_len, self.rank, self.world_size = batch_size, seq_len, rank, world_size
        self.docs_seen = 0
        self.buf = np.array([tokenizer.eos_id], dtype=np.int64)
        self._docs = source.documents(split)

    def __iter__(self) -> PackedTextStream:
        return self

    def _fill(self, need: int) -> None:
        while len(self.buf) < need:
            chunk = list(islice(self._docs, CHUNK_DOCS * self.world_size))
            if not chunk:
                if self.docs_seen <= self.rank:
                    raise DataError(f"{self.source.source} has {self.docs_seen} {self.split} documents, too few "
                                    f"for rank {self.rank} of {self.world_size}")
                self.docs_seen, self._docs = 0, self.source.documents(self.split)
                continue
            mine = chunk[(self.rank - self.docs_seen) % self.world_size :: self.world_size]
            self.docs_seen += len(chunk)
            self.buf = np.concatenate([self.buf, self.tok.pack(mine)])

    def __next__(self) -> dict[str, Tensor]:
        B, T = self.batch_size, self.seq_len
        self._fill(B * T + 2)
        windows = np.stack([self.buf[i * T : i * T + T + 2] for i in range(B)])
        self.buf = self.buf[B * T :]
        return to_batch(windows, self.tok.eos_id)

    def state_dict(self) -> dict[str, Any]:
        # bytes, not a tensor: its length varies, and DCP loads tensors in place into same-shaped ones
        return {"docs_seen": self.docs_seen, "buf": self.buf.astype("<i8").tobytes()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.docs_seen = int(state["docs_seen"])
        self.buf = np.frombuffer(state["buf"], dtype="<i8").astype(np.int64)
        self._docs = islice(self.source.documents(self.split), self.docs_seen, None)

    def load_resharded(self, state: dict[str, Any], saved_world_size: int) -> str:
        """Load the state of a rank of ``saved_world_size`` ranks: every rank had read the same documents, so this
        rank goes on after them with its own share; the tokens the old ranks had read ahead are skipped."""
        ahead = len(state["buf"]) // 8 - 1
        self.load_state_dict({"docs_seen": state["docs_seen"], "buf": np.array([self.tok.eos_id], "<i8").tobytes()})
        return (f"the same document order, after document {self.docs_seen:,} (skipping the tokens the old ranks "
                f"had read ahead but not trained on: {ahead:,} on one of them)")
