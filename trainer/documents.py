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
import torch.nn.functional as F
from torch import Tensor


def document_ids(reset: Tensor) -> Tensor:
    """(B, T) int32: the index of each token's document, counting the resets up to and including it."""
    return reset.to(torch.int32).cumsum(1, dtype=torch.int32)


def document_positions(reset: Tensor, offset: int = 0) -> Tensor:
    """(B, T) int64: each token's position inside its document.

    Tokens before the row's first reset continue a document that began ``offset``
    tokens before the row (the length of the state passed in).
    """
    t = torch.arange(reset.shape[1], device=reset.device).expand(reset.shape)
    start = torch.where(reset, t, torch.full_like(t, -offset)).cummax(1).values
    return t - start


def same_document_causal(reset: Tensor) -> Tensor:
    """(B, 1, T, T) bool attention mask: query t sees key s <= t of its own document (block-causal)."""
    ids = document_ids(reset)
    causal = torch.ones(reset.shape[1], reset.shape[1], dtype=torch.bool, device=reset.device).tril()
    return (causal & (ids[:, :, None] == ids[:, None, :])).unsqueeze(1)


def causal_depthwise_conv(x: Tensor, window: Tensor | None, weight: Tensor, bias: Tensor | None,
                          reset: Tensor | None) -> tuple[Tensor, Tensor]:
    """Causal depthwise conv of ``x`` (B, C, T) that continues ``window``, restarting at document starts.

        y[c, t] = bias[c] + sum_j weight[c, 0, j] x'[c, t - (K - 1) + j]

    where x' is ``window`` (B, C, K - 1) (zeros if None) followed by x, and, with
    ``reset``, an input of an earlier document than token t counts as zero.

    Returns:
        y (B, C, T), and the new window: the last K - 1 inputs, with those before
        the last document start zeroed, so that a next call continues that document.
    """
    bsz, chans, seqlen = x.shape
    km1 = weight.shape[-1] - 1
    prev = x.new_zeros(bsz, chans, km1) if window is None else window.to(x.dtype)
    xp = torch.cat([prev, x], dim=-1)
    if reset is None:
        return F.conv1d(xp, weight, bias, groups=chans), xp[..., xp.shape[-1] - km1 :]
    ids = F.pad(document_ids(reset), (km1, 0))  # the window's inputs belong to document 0
    same = ids.unfold(1, km1 + 1, 1) == ids[:, km1:, None]  # (B, T, K): tap j sees token t's document
    taps = xp.unfold(-1, km1 + 1, 1) * same.unsqueeze(1).to(x.dtype)  # (B, C, T, K)
    y = (taps * weight.squeeze(1)[:, None, :]).sum(-1)
    if bias is not None:
        y = y + bias[:, None]
    keep = (ids[:, ids.shape[1] - km1 :] == ids[:, -1:]).unsqueeze(1).to(x.dtype)
    return y, xp[..., xp.shape[-1] - km1 :] * keep
