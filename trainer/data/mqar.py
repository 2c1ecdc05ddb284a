"""Multi-query associative recall (MQAR), generated from a seed, in the layout of Zoology.

A sequence holds P key-value pairs, then the same P keys again, in a random order and at
random even offsets of the query section, with padding (token 0) everywhere else::

    k1 v1 k2 v2 ... kP vP | 0 0 kπ1 0 kπ2 0 0 0 ... kπP 0

The model is scored only where it must recall: at each query key the target is that key's
value (loss and accuracy on the answers only; every other label is ``IGNORE``). The values
are never shown in the query section, so a query can only be answered by looking its key
up in the context (no answer can be inferred from the answers already given). Keys come
from [1, V/2) and values from [V/2, V), with V = ``vocab_size``; within a sequence the keys
are distinct and so are the values.
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
    values = torch.argsort(torch.rand(batch_size, vocab - half, generator=gen), dim=1)[:, :num_kv] + half
    context = torch.stack([keys, values], dim=2).flatten(1)
    # the query section has (seq_len - 2P) // 2 even slots; P of them, chosen at random, hold the keys
    slots = (seq_len - 2 * num_kv) // 2
    chosen = torch.argsort(torch.rand(batch_size, slots, generator=gen), dim=1)[:, :num_kv]
    pos = 2 * num_kv + 2 * chosen
    inputs = torch.zeros(batch_size, seq_len, dtype=torch.long)
    inputs[:, : 2 * num_kv] = context
    inputs.scatter_(1, pos, keys)
    labels = torch.full_like(inputs, IGNORE)
    labels.scatter_(1, pos, values)
    return {"inputs": inputs, "labels": labels}
