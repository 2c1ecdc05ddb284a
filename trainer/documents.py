"""Helpers for mixers that keep the documents of a packed batch apart.

A packed row holds several documents back to back. The loaders mark each
document's first token with ``reset`` (B, T) bool; a mixer given ``reset`` (see
:mod:`longhorn_zoo.hookspecs`) must not let a document see the ones before it.
Token t belongs to document ``document_ids(reset)[b, t]``, the number of resets at
or before t: 0 is the document the row (or the state passed in) started in.

    reset       = [1 0 0 1 0 1 0 0]
    ids         = [1 1 1 2 2 3 3 3]
    positions   = [0 1 2 0 1 0 1 2]
"""

from __future__ import annotations

import torch
from torch import Tensor


def document_ids(reset: Tensor) -> Tensor:
    """(B, T) int32: the index of each token's document, counting the resets up to and including it."""
    return reset.to(torch.int32).cumsum(1, dtype=torch.int32)


def document_positions(reset: Tensor, offset: int | Tensor = 0) -> Tensor:
    """(B, T) int64: each token's position inside its document.

    Tokens before the row's first reset continue a document that began ``offset``
    tokens before the row (an int, or (B,) per row: the length of the state passed in).
    """
    t = torch.arange(reset.shape[1], device=reset.device).expand(reset.shape)
    before = -torch.as_tensor(offset, dtype=torch.long, device=reset.device).reshape(-1, 1)
    start = torch.where(reset, t, before).cummax(1).values
    return t - start


def same_document_causal(reset: Tensor) -> Tensor:
    """(B, 1, T, T) bool attention mask: query t sees key s <= t of its own document (block-causal)."""
    ids = document_ids(reset)
    causal = torch.ones(reset.shape[1], reset.shape[1], dtype=torch.bool, device=reset.device).tril()
    return (causal & (ids[:, :, None] == ids[:, None, :])).unsqueeze(1)
