"""Pre-tokenized shards: the on-disk format, its writer and reader, and the loader that samples them.

A prepared split is a folder of ``shard_NNNNN.bin`` files, each a flat array of
uint16 or uint32 token ids (documents followed by EOS, never cut between shards),
and an ``index.json``::

    {"format": "longhorn-zoo-tokens", "version": 1, "meta": {tokenizer, vocab_size, eos_id, dtype, source...},
     "shards": [{"file": "shard_00000.bin", "tokens": N, "docs": D}, ...],
     "tokens": total, "docs": total, "complete": true}

The writer rewrites the index after every finished shard, so an interrupted
preparation resumes after the last finished shard. The reader memory-maps the
shards and checks each against the index.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from longhorn_zoo.data.errors import DataError
from longhorn_zoo.data.packing import to_batch

FORMAT, VERSION, INDEX = "longhorn-zoo-tokens", 1, "index.json"


def read_index(folder: Path) -> dict[str, Any]:
    """The parsed ``index.json`` of a prepared split; raises DataError if missing or invalid."""
    path = folder / INDEX
    if not path.is_file():
        raise DataError(f"no {path}: prepare token shards first with `longhorn-zoo prepare --out "
                        f"{folder.parent} ...` (see docs/data.md)")
    try:
        index = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is corrupt ({e}); delete the folder and prepare it again") from None
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise DataError(f"{path} is not a {FORMAT} v{VERSION} index")
    return index


class ShardWriter:
    """Appends packed token arrays to shards of about ``shard_tokens`` tokens; resumes a partial folder."""

    def __init__(self, folder: Path, meta: dict[str, Any], shard_tokens: int) -> None:
        self.folder, self.shard_tokens = folder, shard_tokens
        folder.mkdir(parents=True, exist_ok=True)
        if (folder / INDEX).exists():
            self.index = read_index(folder)
            if self.index["meta"] != meta:
                raise DataError(f"{folder} was prepared with other settings ({self.index['meta']}), not {meta}; "
                                "use another output folder or delete it")
        else:
            self.index = {"format": FORMAT, "version": VERSION, "meta": meta, "shards": [], "tokens": 0,
                          "docs": 0, "complete": False}
        self.dtype = np.dtype(meta["dtype"])
        keep = {s["file"] for s in self.index["shards"]} | {INDEX}
        for stray in folder.iterdir():  # a shard left unfinished by an interrupted run
            if stray.name not in keep:
                stray.unlink()
        self._file: Any = None
        self._tokens = self._docs = 0

    @property
    def complete(self) -> bool:
        return self.index["complete"]

    @property
    def docs(self) -> int:
        """Documents written to finished shards (where a resumed run picks up)."""
        return self.index["docs"]

    @property
    def tokens(self) -> int:
        """Tokens written, finished shards and the open one."""
        return self.index["tokens"] + self._tokens

    def append(self, tokens: np.ndarray, docs: int) -> None:
        """Add ``docs`` whole documents (their tokens, EOS included); closes the shard once it is full."""
        if self._file is None:
            self._file = open(self._path(len(self.index["shards"])) + ".tmp", "wb")  # noqa: SIM115
        self._file.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        self._tokens += len(tokens)
        self._docs += docs
        if self._tokens >= self.shard_tokens:
            self._close_shard()

    def finish(self) -> None:
        """Close the last shard and mark the split complete."""
        if self._file is not None:
            self._close_shard()
        self.index["complete"] = True
        self._write_index()

    def _path(self, i: int) -> str:
        return str(self.folder / f"shard_{i:05d}.bin")

    def _close_shard(self) -> None:
        self._file.close()
        path = self._path(len(self.index["shards"]))
        os.replace(path + ".tmp", path)
        self.index["shards"].append({"file": Path(path).name, "tokens": self._tokens, "docs": self._docs})
        self.index["tokens"] += self._tokens
        self.index["docs"] += self._docs
        self._file, self._tokens, self._docs = None, 0, 0
        self._write_index()

    def _write_index(self) -> None:
        tmp = self.folder / (INDEX + ".tmp")
        tmp.write_text(json.dumps(self.index, indent=1))
        os.replace(tmp, self.folder / INDEX)


class ShardSet:
    """The memory-mapped shards of a prepared split, checked against their index."""

    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder)
        index = read_index(folder)
        if not index["complete"]:
            raise DataError(f"{folder} is only partly prepared ({len(index['shards'])} shards); run "
                            "longhorn-zoo prepare again with the same arguments to finish it")
        self.meta = index["meta"]
        self.vocab_size, self.eos_id = int(self.meta["vocab_size"]), int(self.meta["eos_id"])
        dtype = np.dtype(self.meta["dtype"])
        self.arrays: list[np.ndarray] = []
        for shard in index["shards"]:
            path = folder / shard["file"]
            if not path.is_file():
                raise DataError(f"shard {path} listed in the index is missing")
            size, want = path.stat().st_size, shard["tokens"] * dtype.itemsize
            if size != want:
                raise DataError(f"shard {path} is corrupt: {size} bytes, the index says {want}; prepare it again")
            arr = np.memmap(path, dtype=dtype, mode="r")
            probe = np.concatenate([arr[:4096], arr[-4096:]])
            if probe.max(initial=0) >= self.vocab_size or arr[-1] != self.eos_id:
                raise DataError(f"shard {path} is corrupt: ids beyond the vocab ({self.vocab_size}) or no final "
                                "EOS; prepare it again")
            self.arrays.append(arr)
        if not self.arrays:
            raise DataError(f"{folder} holds no tokens")


_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer: a fast, well-spread hash of uint64s."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def permute(x: np.ndarray, n: int, key: np.ndarray) -> np.ndarray:
    """Element-wise a seeded bijection of [0, n) (per-element ``key``), in O(1) memory.

    A 4-round Feistel network on 2h >= log2(n) bits is a bijection of [0, 4^h); cycle
    walking (re-applying it to results >= n, which 4^h < 4n keeps rare) restricts it to [0, n).
    """
    h = max(1, ((n - 1).bit_length() + 1) // 2)
    shift, mask = np.uint64(h), np.uint64((1 << h) - 1)
    out, key = x.astype(np.uint64), key.astype(np.uint64)
    todo = np.ones(len(out), dtype=bool)
    while todo.any():
        left, right, k = out[todo] >> shift, out[todo] & mask, key[todo]
        for rnd in range(4):
            left, right = right, left ^ (_mix(right ^ _mix(k + np.uint64(rnd))) & mask)
        out[todo] = (left << shift) | right
        todo = out >= np.uint64(n)
    return out.astype(np.int64)


class ShardLoader:
    """Endless batches of ``seq_len``-token sequences from prepared shards, for one data-parallel rank.

    Each shard is cut into (tokens - 1) // seq_len sequences; the N sequences of all
    shards are numbered. Epoch e visits them in the order ``permute(., N, key(seed, e))``
    (or in order without shuffling), and rank r takes positions r, r + W, r + 2W, ...
    of it, N // W per epoch, so ranks never overlap. The state is one counter.
    """

    def __init__(self, shards: ShardSet, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True) -> None:
        self.shards, self.batch_size, self.seq_len = shards, batch_size, seq_len
        self.rank, self.world_size, self.seed, self.shuffle = rank, world_size, seed, shuffle
        counts = [(len(a) - 1) // seq_len for a in shards.arrays]
        self.first = np.concatenate([[0], np.cumsum(counts)])  # first sequence number of each shard
        self.n_seqs = int(self.first[-1])
        self.per_rank = self.n_seqs // world_size
        if self.per_rank == 0:
            raise DataError(f"{self.n_seqs} sequences of {seq_len} tokens are too few for {world_size} ranks")
        self.item = 0

    def __iter__(self) -> ShardLoader:
        return self

    def sequence_ids(self, items: np.ndarray) -> np.ndarray:
        """The global sequence numbers this rank reads as its items ``items``."""
        epoch, pos = np.divmod(items, self.per_rank)
        seq = pos * self.world_size + self.rank
        if self.shuffle:
            key = _mix(np.uint64(self.seed) * np.uint64(1_000_003) + epoch.astype(np.uint64))
            seq = permute(seq, self.n_seqs, key)
        return seq

    def __next__(self) -> dict[str, Tensor]:
        T, eos = self.seq_len, self.shards.eos_id
        seqs = self.sequence_ids(self.item + np.arange(self.batch_size))
        self.item += self.batch_size
        shard = np.searchsorted(self.first, seqs, side="right") - 1
        windows = np.empty((self.batch_size, T + 2), dtype=self.shards.arrays[0].dtype)
        for row, (s, start) in enumerate(zip(shard, (seqs - self.first[shard]) * T)):
            arr = self.shards.arrays[s]
            if start:
                windows[row] = arr[start - 1 : start + T + 1]
            else:  # a shard starts a document
                windows[row, 0], windows[row, 1:] = eos, arr[: T + 1]
        return to_batch(windows, eos)

    def state_dict(self) -> dict[str, Any]:
        return {"item": self.item}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.item = int(state["item"])

    def load_resharded(self, state: dict[str, Any], saved_world_size: int) -> str:
        """Load the state of a rank of ``saved_world_size`` ranks: the ranks read positions [0, item x W) of
        their epoch's order together, so this rank goes on from that position of the same order."""
        epoch, item = divmod(int(state["item"]), self.n_seqs // saved_world_size)
        read = item * saved_world_size
        first = min(-(-read // self.world_size), self.per_rank)  # round up: all ranks start at one position
        self.item = epoch * self.per_rank + first
        skipped = first * self.world_size - read
        note = f"the same sequence order, from position {read:,} of epoch {epoch}"
        return note + (f" (skipping {skipped} sequences to start every rank at one position)" if skipped > 0 else "")
