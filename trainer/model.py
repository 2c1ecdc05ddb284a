"""The generic causal language model: embedding, N pre-norm blocks, final norm, LM head.

Each block is ``x + mixer(norm(x))``, followed by ``x + mlp(norm(x))`` when the
block has an MLP (SwiGLU). The mixer comes from a plugin (:mod:`longhorn_zoo.hookspecs`):
one mixer in every block, or a hybrid stack (``model.pattern``) where each block is
one of several :class:`BlockKind` s, each a plugin with its own options and MLP.
Build the model on the meta device and call :meth:`LM.init_weights` after
``to_empty`` so that FSDP can shard it before any memory is touched.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from longhorn_zoo.config import Model as ModelConfig
from longhorn_zoo.hookspecs import MixerArgs, MixerSpec


@dataclass(frozen=True)
class ModelArgs:
    """The resolved shape of a model."""

    dim: int
    n_layers: int
    vocab_size: int
    max_seq_len: int
    norm_eps: float = 1e-5
    mlp: bool = True
    mlp_ratio: float = 8 / 3
    tie_embeddings: bool = False

    @classmethod
    def from_config(cls, cfg: ModelConfig, max_seq_len: int) -> ModelArgs:
        return cls(cfg.dim, cfg.n_layers, cfg.vocab_size, max_seq_len, cfg.norm_eps, cfg.mlp, cfg.mlp_ratio,
                   cfg.tie_embeddings)

    @property
    def mlp_hidden(self) -> int:
        return 64 * math.ceil(self.mlp_ratio * self.dim / 64)


@dataclass(frozen=True)
class BlockKind:
    """What a block is: a mixer plugin with its resolved options, and whether a SwiGLU MLP follows it."""

    spec: MixerSpec
    options: Mapping[str, Any]
    mlp: bool
    mlp_ratio: float

    def block_args(self, args: ModelArgs) -> ModelArgs:
        """The model's shape with this kind's MLP, as :class:`Block` reads it."""
        return dataclasses.replace(args, mlp=self.mlp, mlp_ratio=self.mlp_ratio)

    def mixer_args(self, args: ModelArgs, layer_id: int) -> MixerArgs:
        """What this kind's mixer factory gets in block ``layer_id``."""
        return MixerArgs(args.dim, layer_id, args.n_layers, args.max_seq_len, dict(self.options))


class SwiGLU(nn.Module):
    """out = W2 (SiLU(W1 x) * W3 x)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def init_weights(self, out_std: float) -> None:
        nn.init.trunc_normal_(self.w1.weight, std=0.02)
        nn.init.trunc_normal_(self.w3.weight, std=out_std)
        nn.init.trunc_normal_(self.w2.weight, std=out_std)


class Block(nn.Module):
    """Pre-norm residual block: mixer, then the optional SwiGLU MLP."""

    def __init__(self, mixer: nn.Module, args: ModelArgs) -> None:
        super().__init__()
        self.mixer_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.mixer = mixer
        if args.mlp:
            self.mlp_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
            self.mlp = SwiGLU(args.dim, args.mlp_hidden)
        else:
            self.mlp_norm = None
            self.mlp = None
        self.out_std = 0.02 / math.sqrt(2 * args.n_layers)

    def forward(self, x: Tensor, state: Any = None, return_state: bool = False,
                reset: Tensor | None = None) -> Tensor | tuple[Tensor, Any]:
        docs = {} if reset is None else {"reset": reset}  # mixers written before document resets still work
        if return_state:
            h, state = self.mixer(self.mixer_norm(x), state, return_state=True, **docs)
        else:
            h = self.mixer(self.mixer_norm(x), state, **docs)
        x = x + h
        if self.mlp is not None:
            x = x + self.mlp(self.mlp_norm(x))
        return (x, state) if return_state else x

    def step(self, x: Tensor, state: Any) -> tuple[Tensor, Any]:
        h, state = self.mixer.step(self.mixer_norm(x), state)
        x = x + h
        if self.mlp is not None:
            x = x + self.mlp(self.mlp_norm(x))
        return x, state

    def init_weights(self) -> None:
        self.mixer_norm.reset_parameters()
        self.mixer.init_weights()
        if self.mlp is not None:
            self.mlp_norm.reset_parameters()
            self.mlp.init_weights(self.out_std)


def forward_blocks(blocks: Iterable[nn.Module], h: Tensor, states: Sequence[Any] | None = None,
                   return_states: bool = False, reset: Tensor | None = None) -> Tensor | tuple[Tensor, list[Any]]:
    """``h`` (B, T, D) through ``blocks`` in order; with ``return_states`` also each block's final state."""
    new_states = []
    for i, block in enumerate(blocks):
        state = None if states is None else states[i]
        if return_states:
            h, state = block(h, state, return_state=True, reset=reset)
            new_states.append(state)
        else:
            h = block(h, state, reset=reset)
    return (h, new_states) if return_states else h


def step_blocks(blocks: Iterable[nn.Module], h: Tensor, states: Sequence[Any] | None) -> tuple[Tensor, list[Any]]:
    """One token ``h`` (B, D) through ``blocks``, each with its own state (None: a fresh sequence)."""
    new_states = []
    for i, block in enumerate(blocks):
        h, s = block.step(h, None if states is None else states[i])
        new_states.append(s)
    return h, new_states


class LM(nn.Module):
    """Causal LM over plugin mixers. ``forward(tokens)`` gives logits (B, T, vocab).

    ``LM(args, spec, mixer_options)`` puts one mixer in every block, with the MLP of ``args``;
    ``LM(args, kinds=...)`` builds a hybrid stack, block i of kind ``kinds[i]``.
    """

    def __init__(self, args: ModelArgs, spec: MixerSpec | None = None, mixer_options: Mapping[str, Any] | None = None,
                 *, kinds: Sequence[BlockKind] | None = None) -> None:
        super().__init__()
        if (spec is None) == (kinds is None):
            raise ValueError("LM takes a spec (one mixer in every block) or kinds (one per block), not both")
        if kinds is None:
            kinds = [BlockKind(spec, dict(mixer_options or {}), args.mlp, args.mlp_ratio)] * args.n_layers
        if len(kinds) != args.n_layers:
            raise ValueError(f"LM: {len(kinds)} block kinds for n_layers = {args.n_layers}")
        self.args = args
        self.kinds = tuple(kinds)
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleDict()
        for i, kind in enumerate(self.kinds):
            self.layers[str(i)] = Block(kind.spec.build(kind.mixer_args(args, i)), kind.block_args(args))
        self.norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def forward(self, tokens: Tensor, states: list[Any] | None = None, return_states: bool = False,
                reset: Tensor | None = None) -> Tensor | tuple[Tensor, list[Any]]:
        """Logits for ``tokens`` (B, T); with ``return_states`` also each layer's final state.

        ``reset`` (B, T) bool marks document starts in a packed batch: every mixer then
        keeps each document apart from the ones before it (see :mod:`longhorn_zoo.hookspecs`).
        """
        out = forward_blocks(self.layers.values(), self.tok_embeddings(tokens), states, return_states, reset)
        if return_states:
            return self.output(self.norm(out[0])), out[1]
        return self.output(self.norm(out))

    def step(self, token: Tensor, states: list[Any] | None) -> tuple[Tensor, list[Any]]:
        """One decoding step: ``token`` (B,) to logits (B, vocab), with the updated states (one per block:
        a KV cache for attention, a fixed-size state for recurrent mixers)."""
        h, new_states = step_blocks(self.layers.values(), self.tok_embeddings(token), states)
        return self.output(self.norm(h)), new_states

    def to_empty(self, *, device: torch.device | str | None, recurse: bool = True) -> LM:
        super().to_empty(device=device, recurse=recurse)
        if self.args.tie_embeddings and self.output.weight is not self.tok_embeddings.weight:
            # Module.to_empty (meta -> device) gives every module a new Parameter, which unties them
            self.output.weight = self.tok_embeddings.weight
        return self

    @torch.no_grad()
    def init_weights(self) -> None:
        nn.init.normal_(self.tok_embeddings.weight, std=0.02)
        for layer in self.layers.values():
            layer.init_weights()
        self.norm.reset_parameters()
        if not self.args.tie_embeddings:
            nn.init.trunc_normal_(self.output.weight, std=self.args.dim**-0.5)

    def num_params(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding:
            n -= self.tok_embeddings.weight.numel()
        return n


def block_kinds(cfg: ModelConfig) -> list[BlockKind]:
    """The kind of each block of a resolved config (:func:`longhorn_zoo.config.load_config`)."""
    from longhorn_zoo.registry import get_registry

    names = cfg.block_mixers()
    if len(names) != cfg.n_layers:
        raise ValueError(f"model.n_layers = {cfg.n_layers} is not a multiple of model.pattern's {len(cfg.pattern)}")
    if not cfg.pattern:
        return [BlockKind(get_registry().get(cfg.name).spec, dict(cfg.mixer), cfg.mlp, cfg.mlp_ratio)] * cfg.n_layers
    kinds = {}
    for name in dict.fromkeys(names):
        options = dict(cfg.mixers[name])
        mlp, ratio = options.pop("mlp"), options.pop("mlp_ratio")
        kinds[name] = BlockKind(get_registry().get(name).spec, options, mlp, ratio)
    return [kinds[name] for name in names]


def build_model(cfg: ModelConfig, max_seq_len: int, device: torch.device | str = "meta") -> LM:
    """Build the LM for ``cfg`` (one mixer or a hybrid stack) on ``device`` (meta by default, uninitialised)."""
    kinds = block_kinds(cfg)
    with torch.device(device):
        return LM(ModelArgs.from_config(cfg, max_seq_len), kinds=kinds)


def flops_per_token(model: LM, seq_len: int) -> float:
    """Forward FLOPs per token: each block's mixer (from its plugin) and MLP, and the LM head.

    Training FLOPs are about three times this (forward plus backward).
    """
    a = model.args
    total = 0.0
    for i, (kind, layer) in enumerate(zip(model.kinds, model.layers.values())):
        if kind.spec.flops_per_token is not None:
            total += kind.spec.flops_per_token(kind.mixer_args(a, i), seq_len)
        else:
            total += 2.0 * sum(p.numel() for p in layer.mixer.parameters())
        if kind.mlp:
            total += 2.0 * 3 * a.dim * kind.block_args(a).mlp_hidden
    return total + 2.0 * a.dim * a.vocab_size
