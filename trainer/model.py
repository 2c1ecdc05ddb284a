"""The generic causal language model: embedding, N pre-norm blocks, final norm, LM head.

Each block is ``x + mixer(norm(x))``, followed by ``x + mlp(norm(x))`` when the
block has an MLP (SwiGLU or GeGLU, :mod:`longhorn_zoo.layers`). The mixer comes from a
plugin (:mod:`longhorn_zoo.hookspecs`): one mixer in every block, or a hybrid stack
(``model.pattern``) where each block is one of several :class:`BlockKind` s, each a plugin
with its own options and MLP. With ``position_embedding`` a learned position embedding is
added to the token embedding; its position then travels in the last entry of the states
that ``forward(return_states=True)`` and ``step`` return.
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
from torch import Tensor, nn

from longhorn_zoo.config import BLOCK_KEYS
from longhorn_zoo.config import Model as ModelConfig
from longhorn_zoo.documents import document_positions
from longhorn_zoo.hookspecs import MixerArgs, MixerSpec
from longhorn_zoo.layers import GatedMLP, build_norm


@dataclass(frozen=True)
class ModelArgs:
    """The resolved shape of a model (the ``[model]`` options of :class:`longhorn_zoo.config.Model`)."""

    dim: int
    n_layers: int
    vocab_size: int
    max_seq_len: int
    norm_eps: float = 1e-5
    mlp: bool = True
    mlp_ratio: float = 8 / 3
    tie_embeddings: bool = False
    norm: str = "rmsnorm"
    mlp_activation: str = "silu"
    mlp_multiple_of: int = 64
    mlp_hidden_size: int = 0
    mlp_depth_scaled_init: bool = True
    position_embedding: bool = False

    @classmethod
    def from_config(cls, cfg: ModelConfig, max_seq_len: int) -> ModelArgs:
        return cls(cfg.dim, cfg.n_layers, cfg.vocab_size, max_seq_len, cfg.norm_eps, cfg.mlp, cfg.mlp_ratio,
                   cfg.tie_embeddings, cfg.norm, cfg.mlp_activation, cfg.mlp_multiple_of, cfg.mlp_hidden,
                   cfg.mlp_depth_scaled_init, cfg.position_embedding)

    @property
    def mlp_hidden(self) -> int:
        """``mlp_hidden_size``, or int(mlp_ratio x dim) rounded up to a multiple of ``mlp_multiple_of`` (the seed's)."""
        if self.mlp_hidden_size:
            return self.mlp_hidden_size
        return self.mlp_multiple_of * math.ceil(int(self.mlp_ratio * self.dim) / self.mlp_multiple_of)


@dataclass(frozen=True)
class BlockKind:
    """What a block is: a mixer plugin with its resolved options, and the gated MLP that follows it
    (the block keys of :data:`longhorn_zoo.config.BLOCK_KEYS`)."""

    spec: MixerSpec
    options: Mapping[str, Any]
    mlp: bool
    mlp_ratio: float
    mlp_activation: str = "silu"
    mlp_multiple_of: int = 64
    mlp_hidden: int = 0
    mlp_depth_scaled_init: bool = True

    @classmethod
    def of(cls, spec: MixerSpec, options: Mapping[str, Any], keys: Any) -> BlockKind:
        """The kind of ``spec`` with ``options`` and the block keys read from ``keys`` (a mapping or a config)."""
        get = keys.__getitem__ if isinstance(keys, Mapping) else lambda k: getattr(keys, k)
        return cls(spec, dict(options), *(get(k) for k in BLOCK_KEYS))

    def block_args(self, args: ModelArgs) -> ModelArgs:
        """The model's shape with this kind's MLP, as :class:`Block` reads it."""
        return dataclasses.replace(args, mlp=self.mlp, mlp_ratio=self.mlp_ratio, mlp_activation=self.mlp_activation,
                                   mlp_multiple_of=self.mlp_multiple_of, mlp_hidden_size=self.mlp_hidden,
                                   mlp_depth_scaled_init=self.mlp_depth_scaled_init)

    def mixer_args(self, args: ModelArgs, layer_id: int) -> MixerArgs:
        """What this kind's mixer factory gets in block ``layer_id``."""
        return MixerArgs(args.dim, layer_id, args.n_layers, args.max_seq_len, dict(self.options))


class Block(nn.Module):
    """Pre-norm residual block: mixer, then the optional gated MLP.

    A mixer with ``residual_input = True`` (see :mod:`longhorn_zoo.hookspecs`) gets the
    residual stream itself and normalises it on its own; the block then has no mixer norm.
    """

    def __init__(self, mixer: nn.Module, args: ModelArgs) -> None:
        super().__init__()
        own_norm = getattr(mixer, "residual_input", False)
        self.mixer_norm = None if own_norm else build_norm(args.norm, args.dim, args.norm_eps)
        self.mixer = mixer
        if args.mlp:
            self.mlp_norm = build_norm(args.norm, args.dim, args.norm_eps)
            self.mlp = GatedMLP(args.dim, args.mlp_hidden, args.mlp_activation)
        else:
            self.mlp_norm = None
            self.mlp = None
        self.out_std = 0.02 / math.sqrt(2 * args.n_layers) if args.mlp_depth_scaled_init else 0.02

    def forward(self, x: Tensor, state: Any = None, return_state: bool = False,
                reset: Tensor | None = None) -> Tensor | tuple[Tensor, Any]:
        docs = {} if reset is None else {"reset": reset}  # mixers written before document resets still work
        u = x if self.mixer_norm is None else self.mixer_norm(x)
        if return_state:
            h, state = self.mixer(u, state, return_state=True, **docs)
        else:
            h = self.mixer(u, state, **docs)
        x = x + h
        if self.mlp is not None:
            x = x + self.mlp(self.mlp_norm(x))
        return (x, state) if return_state else x

    def step(self, x: Tensor, state: Any) -> tuple[Tensor, Any]:
        h, state = self.mixer.step(x if self.mixer_norm is None else self.mixer_norm(x), state)
        x = x + h
        if self.mlp is not None:
            x = x + self.mlp(self.mlp_norm(x))
        return x, state

    def init_weights(self) -> None:
        if self.mixer_norm is not None:
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
    ``LM(args, kinds=...)`` builds a hybrid stack, block i of kind ``kinds[i]``. ``states``
    are opaque: one entry per block, plus (with a position embedding) each row's next position (B,).
    """

    def __init__(self, args: ModelArgs, spec: MixerSpec | None = None, mixer_options: Mapping[str, Any] | None = None,
                 *, kinds: Sequence[BlockKind] | None = None) -> None:
        super().__init__()
        if (spec is None) == (kinds is None):
            raise ValueError("LM takes a spec (one mixer in every block) or kinds (one per block), not both")
        if kinds is None:
            keys = {**dataclasses.asdict(args), "mlp_hidden": args.mlp_hidden_size}
            kinds = [BlockKind.of(spec, mixer_options or {}, keys)] * args.n_layers
        if len(kinds) != args.n_layers:
            raise ValueError(f"LM: {len(kinds)} block kinds for n_layers = {args.n_layers}")
        self.args = args
        self.kinds = tuple(kinds)
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.pos_embeddings = nn.Embedding(args.max_seq_len, args.dim) if args.position_embedding else None
        self.layers = nn.ModuleDict()
        for i, kind in enumerate(self.kinds):
            self.layers[str(i)] = Block(kind.spec.build(kind.mixer_args(args, i)), kind.block_args(args))
        self.norm = build_norm(args.norm, args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def forward(self, tokens: Tensor, states: list[Any] | None = None, return_states: bool = False,
                reset: Tensor | None = None) -> Tensor | tuple[Tensor, list[Any]]:
        """Logits for ``tokens`` (B, T); with ``return_states`` also each layer's final state.

        ``reset`` (B, T) bool marks document starts in a packed batch: every mixer then
        keeps each document apart from the ones before it (see :mod:`longhorn_zoo.hookspecs`).
        """
        h, pos = self._embed(tokens, states, reset)
        out = forward_blocks(self.layers.values(), h, states, return_states, reset)
        if not return_states:
            return self.output(self.norm(out))
        h, new_states = out
        if pos is not None:
            new_states.append(pos[:, -1] + 1)
        return self.output(self.norm(h)), new_states

    def _embed(self, tokens: Tensor, states: list[Any] | None, reset: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Token (and position) embeddings of ``tokens`` (B, T), and the positions used (or None)."""
        h = self.tok_embeddings(tokens)
        if self.pos_embeddings is None:
            return h, None
        bsz, seqlen = tokens.shape
        if states is None:
            if seqlen > self.args.max_seq_len:
                raise ValueError(f"{seqlen} tokens, but the learned position embedding has {self.args.max_seq_len} "
                                 "positions (training.seq_len); feed at most that many per document")
            offset = torch.zeros(bsz, dtype=torch.long, device=tokens.device)
        else:
            offset = states[-1]
        pos = (offset[:, None] + torch.arange(seqlen, device=tokens.device) if reset is None
               else document_positions(reset, offset))
        if states is not None and int(pos.max()) >= self.args.max_seq_len:
            raise ValueError(f"position {int(pos.max())} is past the {self.args.max_seq_len} positions of the learned "
                             "position embedding (training.seq_len); a document cannot grow longer")
        return h + self.pos_embeddings(pos), pos

    def step(self, token: Tensor, states: list[Any] | None) -> tuple[Tensor, list[Any]]:
        """One decoding step: ``token`` (B,) to logits (B, vocab), with the updated states (one per block:
        a KV cache for attention, a fixed-size state for recurrent mixers; then the position, if learned)."""
        h, pos = self._embed(token.unsqueeze(1), states, None)
        h, new_states = step_blocks(self.layers.values(), h.squeeze(1), states)
        if pos is not None:
            new_states.append(pos[:, -1] + 1)
        return self.output(self.norm(h)), new_states

    @property
    def max_positions(self) -> int | None:
        """The longest document the model can read: ``max_seq_len`` with a learned position embedding, else None."""
        return self.args.max_seq_len if self.pos_embeddings is not None else None

    def to_empty(self, *, device: torch.device | str | None, recurse: bool = True) -> LM:
        super().to_empty(device=device, recurse=recurse)
        if self.args.tie_embeddings and self.output.weight is not self.tok_embeddings.weight:
            # Module.to_empty (meta -> device) gives every module a new Parameter, which unties them
            self.output.weight = self.tok_embeddings.weight
        return self

    @torch.no_grad()
    def init_weights(self) -> None:
        nn.init.normal_(self.tok_embeddings.weight, std=0.02)
        if self.pos_embeddings is not None:
            nn.init.normal_(self.pos_embeddings.weight, std=0.02)
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
        return [BlockKind.of(get_registry().get(cfg.name).spec, cfg.mixer, cfg)] * cfg.n_layers
    kinds = {}
    for name in dict.fromkeys(names):
        options = dict(cfg.mixers[name])
        keys = {k: options.pop(k) for k in BLOCK_KEYS}
        kinds[name] = BlockKind.of(get_registry().get(name).spec, options, keys)
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
