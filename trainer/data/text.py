"""Byte-level language modelling on an offline corpus: the Python standard library's source.

Every machine that runs Python has its standard library, so this corpus needs no
download. It is the top-level ``*.py`` files of ``sysconfig.get_paths()["stdlib"]``,
sorted by name and joined with a NUL byte, capped at ``MAX_BYTES``. Tokens are the
bytes themselves (vocabulary 256). The last ``val_fraction`` of the bytes is held
out for validation. The exact text depends on the Python version.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

MAX_BYTES = 8 * 1024 * 1024
BYTE_VOCAB = 256


def stdlib_corpus(max_bytes: int = MAX_BYTES) -> bytes:
    """The corpus bytes (deterministic for a given Python version)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))
    if not files:
        raise FileNotFoundError(f"no *.py files under the standard library folder {root}; "
                                "use data.dataset = 'mqar' or a prepared dataset")
    parts, total = [], 0
    for f in files:
        b = f.read_bytes()
        parts.append(b)
        total += len(b) + 1
        if total >= max_bytes:
            break
    return b"\0".join(parts)[:max_bytes]


class ByteWindows:
    """Endless batches of random ``seq_len + 1``-byte windows; seeded and resumable."""

    def __init__(self, data: np.ndarray, batch_size: int, seq_len: int, seed: int) -> None:
        if len(data) <= seq_len + 1:
            raise ValueError(f"corpus of {len(data)} bytes is too short for seq_len {seq_len}")
        self.data = torch.from_numpy(data.astype(np.int64))
        self.batch_size, self.seq_len = batch_size, seq_len
        self.gen = torch.Generator().manual_seed(seed)

    def __iter__(self) -> ByteWindows:
        return self

    def __next__(self) -> dict[str, Tensor]:
        starts = torch.randint(0, len(self.data) - self.seq_len - 1, (self.batch_size,), generator=self.gen)
        idx = starts[:, None] + torch.arange(self.seq_len + 1)
        window = self.data[idx]
        return {"inputs": window[:, :-1], "labels": window[:, 1:]}

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gen.set_state(state["generator"])


def split_corpus(val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation byte arrays."""
    data = np.frombuffer(stdlib_corpus(), dtype=np.uint8)
    n_val = int(len(data) * val_fraction)
    return data[: len(data) - n_val], data[len(data) - n_val :]
