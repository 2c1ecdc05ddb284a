"""Llama attention: multi-head causal self-attention with rotary positions (RoPE).

    q, k, v = Wq x, Wk x, Wv x            split into H heads of size D/H
    q, k    = rope(q, pos), rope(k, pos)  pos counts from the cached length
    out     = Wo softmax(q k^T / sqrt(d) + causal mask) v

The recurrent state is a KV cache ``(k, v, visible)``: k and v (B, H, T_cached, D/H),
and ``visible`` (B, T_cached) bool, the cached keys of each row's last document, or
None when every cached key is (no document starts so far). With document starts
(``reset``) the mask is block-causal: a query sees the keys of its own document only,
and the cache only from the tokens before a row's first start.

Which kernel runs:

* no ``reset`` and no cache: SDPA with ``is_causal=True`` (flash attention on a GPU);
* ``reset`` without a cache, on CUDA: ``flex_attention`` with a :class:`BlockMask` from
  ``create_block_mask`` over the document ids (:func:`flex_document_attention`): 128 x 128
  blocks without a causal pair of one document are skipped, blocks inside one document run
  unmasked, and no (T, T) mask is stored. Both functions are compiled once here, as the
  PyTorch docs recommend; inside the trainer's per-block ``torch.compile(fullgraph=True)``
  they are traced into the block's graph. The block mask is built in every layer;
* otherwise (CPU, a KV cache, or ``model.op_backend = "reference"``): SDPA with the dense
  (B, 1, T, T_cached + T) bool mask of :func:`_document_mask`, which rules out flash attention
  and costs O(T^2) memory. CPU keeps it because flex_attention has no backward pass there.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from longhorn_zoo.documents import document_ids, same_document_causal
from longhorn_zoo.hookspecs import MixerArgs
from longhorn_zoo.ops import REFERENCE, get_backend_preference

KVCache = tuple[Tensor, Tensor, Tensor | None]


def rope_table(pos: Tensor, d: int, theta: float) -> Tensor:
    """cos and sin of the angles pos * theta^(-2i/d), i < d/2: (2, len(pos), d/2) in float32."""
    inv_freq = theta ** (-torch.arange(0, d, 2, device=pos.device, dtype=torch.float32) / d)
    ang = pos.to(torch.float32)[:, None] * inv_freq[None]
    return torch.stack([ang.cos(), ang.sin()])


def rotate(x: Tensor, table: Tensor) -> Tensor:
    """Rotate channel pairs (i, i + d/2) of x (B, H, T, d) by the angles of ``table`` (2, T, d/2)."""
    d = x.shape[-1]
    cos, sin = table[0].to(x.dtype), table[1].to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def apply_rope(x: Tensor, pos: Tensor, theta: float) -> Tensor:
    """Rotate channel pairs (i, i + d/2) of x (B, H, T, d) by angle pos * theta^(-2i/d)."""
    return rotate(x, rope_table(pos, x.shape[-1], theta))


# Uncompiled, flex_attention materialises the scores and create_block_mask the (B, 1, T, T) mask.
_flex_attention = torch.compile(flex_attention)
_create_block_mask = torch.compile(create_block_mask)


def document_block_mask(reset: Tensor) -> BlockMask:
    """The block-causal :class:`BlockMask` of ``reset`` (B, T): query t sees key s <= t of its own document."""
    ids = document_ids(reset)

    def same_document_causal_mod(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        return (q >= kv) & (ids[b, q] == ids[b, kv])

    bsz, seqlen = reset.shape
    return _create_block_mask(same_document_causal_mod, bsz, None, seqlen, seqlen, device=reset.device)


def flex_document_attention(q: Tensor, k: Tensor, v: Tensor, reset: Tensor) -> Tensor:
    """Block-causal attention of q, k, v (B, H, T, d) over the documents of ``reset`` (B, T), with flex_attention.

    The same function as SDPA with ``attn_mask=same_document_causal(reset)``, without the (T, T) mask.
    """
    return _flex_attention(q, k, v, block_mask=document_block_mask(reset))


def _document_mask(reset: Tensor | None, visible: Tensor | None, bsz: int, seqlen: int,
                   past: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """The (B, 1, T, past + T) bool mask over the cached and new keys, and the keys visible afterwards.

    Without ``reset`` the new tokens are one document that continues the cache's; with it,
    the mask over them is block-causal and only the tokens before a row's first start see
    the cache. Of the cache, only the ``visible`` keys are seen (all when None).
    """
    if reset is None:
        new = torch.ones(seqlen, seqlen, dtype=torch.bool, device=device).tril().expand(bsz, 1, -1, -1)
        first = torch.ones(bsz, seqlen, dtype=torch.bool, device=device)
        last = first
    else:
        new, ids = same_document_causal(reset), document_ids(reset)
        first, last = ids == 0, ids == ids[:, -1:]
    seen = torch.ones(bsz, past, dtype=torch.bool, device=device) if visible is None else visible
    cached = first[:, None, :, None] & seen[:, None, None, :]
    kept = seen & first[:, -1:]  # the cache stays visible while the row's last document is its first
    return torch.cat([cached, new], dim=-1), torch.cat([kept, last], dim=-1)


class Attention(nn.Module):
    def __init__(self, args: MixerArgs) -> None:
        super().__init__()
        self.n_heads = int(args.options["n_heads"])
        if args.dim % self.n_heads:
            raise ValueError(f"llama: dim {args.dim} is not divisible by model.mixer.n_heads {self.n_heads}")
        self.head_dim = args.dim // self.n_heads
        self.rope_theta = float(args.options["rope_theta"])
        # The angles of positions 0 .. max_seq_len - 1, computed once (init_weights) rather than in
        # every layer's forward; positions past the table (longer evaluation, generation) are computed.
        self.register_buffer("rope", self._table(0, args.max_seq_len), persistent=False)
        self.wqkv = nn.Linear(args.dim, 3 * args.dim, bias=False)
        self.wo = nn.Linear(args.dim, args.dim, bias=False)
        self.out_std = 0.02 / math.sqrt(2 * args.n_layers)

    def forward(self, x: Tensor, state: KVCache | None = None, *, return_state: bool = False,
                reset: Tensor | None = None) -> Any:
        bsz, seqlen, dim = x.shape
        q, k, v = self.wqkv(x).view(bsz, seqlen, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        past = 0 if state is None else state[0].shape[2]
        visible = None if state is None else state[2]
        table = self.rope[:, past : past + seqlen] if past + seqlen <= self.rope.shape[1] else \
            self._table(past, past + seqlen, x.device)
        q, k = rotate(q, table), rotate(k, table)
        if state is not None:
            k = torch.cat([state[0].to(k.dtype), k], dim=2)
            v = torch.cat([state[1].to(v.dtype), v], dim=2)
        if reset is not None and state is None and q.is_cuda and get_backend_preference() != REFERENCE:
            out = flex_document_attention(q, k, v, reset)
            ids = document_ids(reset)
            visible = ids == ids[:, -1:]
        elif reset is None and visible is None:
            if state is None:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                mask = torch.ones(seqlen, past + seqlen, dtype=torch.bool, device=x.device).tril(past)
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            mask, visible = _document_mask(reset, visible, bsz, seqlen, past, x.device)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = self.wo(out.transpose(1, 2).reshape(bsz, seqlen, dim))
        return (out, (k, v, visible)) if return_state else out

    def _table(self, start: int, end: int, device: torch.device | None = None) -> Tensor:
        """Angles of positions start .. end - 1 (on the default device when None)."""
        return rope_table(torch.arange(start, end, device=device), self.head_dim, self.rope_theta)

    def step(self, x: Tensor, state: KVCache | None) -> tuple[Tensor, KVCache]:
        out, state = self.forward(x.unsqueeze(1), state, return_state=True)
        return out.squeeze(1), state

    def init_weights(self) -> None:
        self.rope.copy_(self._table(0, self.rope.shape[1], self.rope.device))
        nn.init.trunc_normal_(self.wqkv.weight, std=0.02)
        nn.init.trunc_normal_(self.wo.weight, std=self.out_std)
