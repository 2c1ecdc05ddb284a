"""The generic causal language model: embedding, N pre-norm blocks, final norm, LM head.

Each block is ``x + mixer(norm(x))``, followed by ``x + mlp(norm(x))`` when the
model has an MLP (SwiGLU). The mixer comes from a plugin (:mod:`longhorn_zoo.hookspecs`).
Build the model on the meta device and call :meth:`LM.init_weights` after
``to_empty`` so that FSDP can shard it before any memory is touched.
"""

from __future__ import annotations

import math
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


class LM(nn.Module):
    """Causal LM over a plugin mixer. ``forward(tokens)`` gives logits (B, T, vocab)."""

    def __init__(self, args: ModelArgs, spec: MixerSpec, mixer_options: dict[str, Any]) -> None:
        super().__init__()
        self.args = args
        self.spec = spec
        self.mixer_options = dict(mixer_options)
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleDict()
        for i in range(args.n_layers):
            margs = MixerArgs(args.dim, i, args.n_layers, args.max_seq_len, dict(mixer_options))
            self.layers[str(i)] = Block(spec.build(margs), args)
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
        h = self.tok_embeddings(tokens)
        new_states = []
        for i, layer in enumerate(self.layers.values()):
            if return_states:
                h, s = layer(h, None if states is None else states[i], return_state=True, reset=reset)
                new_states.append(s)
            else:
                h = layer(h, None if states is None else states[i], reset=reset)
        logits = self.output(self.norm(h))
        return (logits, new_states) if return_states else logits

    def step(self, token: Tensor, states: list[Any] | None) -> tuple[Tensor, list[Any]]:
        """One decoding step: ``token`` (B,) to logits (B, vocab), with the updated states."""
        h = self.tok_embeddings(token)
        new_states = []
        for i, layer in enumerate(self.layers.values()):
            h, s = layer.step(h, None if states is None else states[i])
            new_states.append(s)
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


def build_model(cfg: ModelConfig, max_seq_len: int, device: torch.device | str = "meta") -> LM:
    """Build the LM for ``cfg`` on ``device`` (meta by default, uninitialised)."""
    from longhorn_zoo.registry import get_registry

    spec = get_registry().get(cfg.name).spec
    with torch.device(device):
        return LM(ModelArgs.from_config(cfg, max_seq_len), spec, cfg.mixer)


def flops_per_token(model: LM, seq_len: int) -> float:
    """Forward FLOPs per token: the mixers' (from their plugin), the MLPs' and the LM head's.

    Training FLOPs are about three times this (forward plus backward).
    """
    a = model.args
    per_mixer = model.spec.flops_per_token
    total = 0.0
    for i, layer in enumerate(model.layers.values()):
        if per_mixer is not None:
            total += per_mixer(MixerArgs(a.dim, i, a.n_layers, a.max_seq_len, model.mixer_options), seq_len)
        else:
            total += 2.0 * sum(p.numel() for p in layer.mixer.parameters())
        if a.mlp:
            total += 2.0 * 3 * a.dim * a.mlp_hidden
    return total + 2.0 * a.dim * a.vocab_size
