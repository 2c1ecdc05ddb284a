"""Multi-query associative recall (MQAR), generated from a seed.

A sequence holds P key-value pairs, then the same P keys again in a random order,
each followed by its value::

    k1 v1 k2 v2 ... kP vP | kπ1 vπ1 kπ2 vπ2 ... kπP vπP | 0 0 ...

The model is scored only where it must recall: at each query key the target is
that key's value (loss and accuracy on the answers only; every other label is
``IGNORE``). Token 0 is padding; keys come from [1, V/2) and values from [V/2, V),
with V = ``vocab_size``; keys within a sequence are distinct.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

IGNORE = -100


class MQAR:
    """An endless, seeded stream of MQAR batches; resumable through ``state_dict``."""

    def __init__(self, batch_size: int, seq_len: int, num_kv_pairs: int, vocab_size: int, seed: int) -> None:
        if seq_len < 4 * num_kv_pairs:
            raise ValueError(f"MQAR needs training.seq_len >= 4 x data.mqar_num_kv_pairs = {4 * num_kv_pairs}, "
                             f"got {seq_len}; raise seq_len or lower mqar_num_kv_pairs")
        if vocab_size // 2 - 1 < num_kv_pairs:
            raise ValueError(f"data.mqar_vocab_size {vocab_size} has too few keys for {num_kv_pairs} pairs; "
                             f"use at least {2 * num_kv_pairs + 2}")
        self.batch_size, self.seq_len, self.num_kv, self.vocab = batch_size, seq_len, num_kv_pairs, vocab_size
        self.gen = torch.Generator().manual_seed(seed)

    def __iter__(self) -> MQAR:
        return self

    def __next__(self) -> dict[str, Tensor]:
        return make_batch(self.batch_size, self.seq_len, self.num_kv, self.vocab, self.gen)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.gen.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gen.set_state(state["generator"])


def make_batch(batch_size: int, seq_len: int, num_kv: int, vocab: int, gen: torch.Generator) -> dict[str, Tensor]:
    """One batch: ``inputs`` and ``labels`` of shape (batch_size, seq_len)."""
    half = vocab // 2
    keys = torch.argsort(torch.rand(batch_size, half - 1, generator=gen), dim=1)[:, :num_kv] + 1
    values = torch.randint(half, vocab, (batch_size, num_kv), generator=gen)
    order = torch.argsort(torch.rand(batch_size, num_kv, generator=gen), dim=1)
    qk, qv = keys.gather(1, order), values.gather(1, order)
    ctx = torch.stack([keys, values], dim=2).flatten(1)
    queries = torch.stack([qk, qv], dim=2).flatten(1)
    pad = torch.zeros(batch_size, seq_len - 4 * num_kv, dtype=torch.long)
    inputs = torch.cat([ctx, queries, pad], dim=1)
    labels = torch.full_like(inputs, IGNORE)
    labels[:, 2 * num_kv : 4 * num_kv : 2] = qv
    return {"inputs": inputs, "labels": labels}
