"""What every conformance check needs: a tiny model of one mixer, inputs, comparisons, errors.

A :class:`Conformance` names one installed mixer, or a hybrid stack of several
(``"longhorn+llama"``: one block of each, in that order), and the tiny sizes it is
checked at (dim 64, 2 layers, 24 tokens by default). It builds the mixer alone, a
block, or the whole LM exactly as the trainer does (meta device, ``to_empty``,
``init_weights``) and raises :class:`ConformanceError` naming the mixer and the
property that broke. For a stack, "the mixer" of the mixer-level checks is the stack's
blocks in order (:class:`StackMixer`), which honour the same contract.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from longhorn_zoo.config import ConfigError, JobConfig, load_config
from longhorn_zoo.hookspecs import MixerArgs, MixerSpec
from longhorn_zoo.model import LM, BlockKind, block_kinds, build_model, forward_blocks, step_blocks
from longhorn_zoo.ops import ScanOp
from longhorn_zoo.registry import PluginError, get_registry

FP32_TOL = 1e-4
"""Largest error ratio (RMS of the difference over RMS of the reference) between two fp32 paths."""


class ConformanceError(AssertionError):
    """A mixer breaks a property of the plugin contract.

    Attributes:
        mixer: The mixer's name.
        property: The property that broke, e.g. ``"causality"``.
        detail: What was observed.
    """

    def __init__(self, mixer: str, property: str, detail: str) -> None:
        super().__init__(f"mixer {mixer!r} breaks {property}: {detail}")
        self.mixer = mixer
        self.property = property
        self.detail = detail


def error_ratio(actual: Tensor, expected: Tensor) -> float:
    """RMS of ``actual - expected`` over RMS of ``expected`` (flash-linear-attention's test metric)."""
    a, e = actual.detach().double(), expected.detach().double()
    return float((a - e).pow(2).mean().sqrt() / e.pow(2).mean().sqrt().clamp_min(1e-12))


def describe_mismatch(actual: Tensor, expected: Tensor) -> str:
    """Error ratio, max abs difference and the first index that differs by more than ``FP32_TOL`` of the scale."""
    diff = (actual.detach().double() - expected.detach().double()).abs()
    bad = (diff > FP32_TOL * expected.detach().double().abs().max().clamp_min(1e-12)).nonzero()
    where = f", first at index {tuple(int(i) for i in bad[0])}" if len(bad) else ""
    return f"error ratio {error_ratio(actual, expected):.2e}, max abs diff {float(diff.max()):.2e}{where}"


class StackMixer(nn.Module):
    """A hybrid stack's blocks as one mixer, (B, T, D) -> (B, T, D), with one state per block."""

    def __init__(self, layers: nn.ModuleDict) -> None:
        super().__init__()
        self.layers = layers

    def forward(self, x: Tensor, state: list[Any] | None = None, *, return_state: bool = False,
                reset: Tensor | None = None) -> Tensor | tuple[Tensor, list[Any]]:
        return forward_blocks(self.layers.values(), x, state, return_state, reset)

    def step(self, x: Tensor, state: list[Any] | None) -> tuple[Tensor, list[Any]]:
        return step_blocks(self.layers.values(), x, state)

    def init_weights(self) -> None:
        for block in self.layers.values():
            block.init_weights()


class Conformance:
    """One mixer, or a hybrid stack, at conformance-test size.

    Args:
        mixer: The mixer's registered name, or a stack's pattern as names joined by ``+``
            (``"longhorn+llama"``), repeated over ``n_layers``.
        dim: Model width.
        n_layers: Blocks of the LM-level checks; for a stack, rounded up to a multiple of its pattern.
        seq_len: Longest sequence used (and ``max_seq_len`` of the mixer).
        options: ``[model.mixer]`` overrides, e.g. ``{"n_heads": 2}``; for a stack, one table per
            mixer (``[model.mixers.<name>]``), e.g. ``{"llama": {"n_heads": 2, "mlp": False}}``.
        compile_backend: ``torch.compile`` backend of the compile check: ``"aot_eager"``
            (graph capture and AOT autograd, fast) or ``"inductor"`` (also code generation).
    """

    batch = 2

    def __init__(self, mixer: str, dim: int = 64, n_layers: int = 2, seq_len: int = 24,
                 options: Mapping[str, Any] | None = None, compile_backend: str = "aot_eager") -> None:
        self.name = mixer
        self.pattern = mixer.split("+") if "+" in mixer else []
        if self.pattern:
            n_layers = len(self.pattern) * -(-n_layers // len(self.pattern))
        self.dim, self.n_layers, self.seq_len = dim, n_layers, seq_len
        self.options = dict(options or {})
        self.compile_backend = compile_backend

    def settings(self) -> dict[str, Any]:
        """The constructor arguments (to rebuild this object in another process)."""
        return {"mixer": self.name, "dim": self.dim, "n_layers": self.n_layers, "seq_len": self.seq_len,
                "options": self.options, "compile_backend": self.compile_backend}

    def fail(self, property: str, detail: str) -> ConformanceError:
        """The error to raise when ``property`` breaks."""
        return ConformanceError(self.name, property, detail)

    @contextlib.contextmanager
    def checking(self, property: str, doing: str) -> Iterator[None]:
        """Turn any exception raised while ``doing`` into a :class:`ConformanceError` for ``property``."""
        try:
            yield
        except ConformanceError:
            raise
        except Exception as e:
            raise self.fail(property, f"{doing} raised {type(e).__name__}: {e}") from e

    # -- building ---------------------------------------------------------------
    @property
    def spec(self) -> MixerSpec:
        """The mixer's spec (one mixer only; a stack has :attr:`specs`)."""
        if self.pattern:
            raise TypeError(f"{self.name!r} is a stack of several mixers: use Conformance.specs or .kinds")
        return self._spec(self.name)

    def _spec(self, name: str) -> MixerSpec:
        try:
            return get_registry().get(name).spec
        except PluginError as e:
            raise self.fail("contract", str(e)) from None

    @property
    def specs(self) -> list[MixerSpec]:
        """The spec of each mixer checked: the one mixer's, or each of a stack's, in pattern order."""
        return [self._spec(name) for name in dict.fromkeys(self.pattern or [self.name])]

    @property
    def ops(self) -> list[ScanOp]:
        """The scan ops of every mixer checked, each once."""
        return list({op.qualname: op for spec in self.specs for op in spec.ops}.values())

    def mixer_overrides(self, defaults_only: bool = False) -> list[str]:
        """The command-line overrides that name the mixer (or stack) and, unless ``defaults_only``, its options."""
        if not self.pattern:
            names, tables = ["--model.name", self.name], {"mixer": self.options}
        else:
            names = ["--model.pattern", json.dumps(self.pattern)]
            if defaults_only:
                names += ["--model.n_layers", str(len(self.pattern))]
            bad = [k for k, v in self.options.items() if not isinstance(v, Mapping)]
            if bad:
                raise self.fail("contract", f"options of a stack are one table per mixer, {{name: {{key: value}}}}; "
                                            f"got {bad[0]!r} = {self.options[bad[0]]!r}")
            tables = {f"mixers.{name}": table for name, table in self.options.items()}
        if defaults_only:
            return names
        for table, options in tables.items():
            for key, value in options.items():
                text = ("true" if value else "false") if isinstance(value, bool) else str(value)
                names += [f"--model.{table}.{key}", text]
        return names

    @functools.cached_property
    def config(self) -> JobConfig:
        """The job config of the tiny model, through the same path as a TOML file."""
        overrides = [*self.mixer_overrides(), "--model.dim", str(self.dim), "--model.n_layers", str(self.n_layers),
                     "--training.seq_len", str(self.seq_len)]
        try:
            return load_config(None, overrides)
        except ConfigError as e:
            raise self.fail("contract", f"the defaults file does not give a valid config: {e}") from None

    def kinds(self) -> list[tuple[int, BlockKind]]:
        """Each kind of block of the tiny LM with the first block of that kind: one for one mixer."""
        firsts: dict[str, tuple[int, BlockKind]] = {}
        for i, kind in enumerate(block_kinds(self.config.model)):
            firsts.setdefault(kind.spec.name, (i, kind))
        return list(firsts.values())

    def mixer_args(self, layer_id: int = 0) -> MixerArgs:
        return MixerArgs(self.dim, layer_id, self.n_layers, self.seq_len, dict(self.config.model.mixer))

    def mixer(self, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
        """The mixer alone (for a stack, its blocks), built on meta, moved to CPU and initialised with ``seed``."""
        if self.pattern:
            return StackMixer(self.model(seed=seed).layers).to(dtype)
        with self.checking("contract", "building the mixer on the meta device"), torch.device("meta"):
            module = self.spec.build(self.mixer_args())
        module.to_empty(device="cpu")
        with self.checking("contract", "init_weights()"), torch.random.fork_rng(), torch.no_grad():
            torch.manual_seed(seed)
            module.init_weights()
        return module.to(dtype)

    def model(self, seed: int = 0, init: bool = True) -> LM:
        """The tiny LM on CPU, initialised with ``seed`` (or left as ``to_empty`` gives it)."""
        with self.checking("contract", "building the model on the meta device"):
            model = build_model(self.config.model, self.seq_len, "meta")
        model.to_empty(device="cpu")
        if init:
            self.init(model, seed)
        return model

    def init(self, model: nn.Module, seed: int) -> None:
        with self.checking("contract", "init_weights()"), torch.random.fork_rng():
            torch.manual_seed(seed)
            model.init_weights()

    # -- inputs -----------------------------------------------------------------
    def inputs(self, seqlen: int | None = None, dtype: torch.dtype = torch.float32, seed: int = 1) -> Tensor:
        """Mixer inputs (B, T, D) of unit scale, as after the block's RMSNorm."""
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(self.batch, seqlen or self.seq_len, self.dim, generator=gen).to(dtype)

    def tokens(self, batch: int | None = None, seed: int = 2) -> tuple[Tensor, Tensor]:
        """Random ``inputs`` and next-token ``labels`` (B, T) for the LM-level checks."""
        gen = torch.Generator().manual_seed(seed)
        vocab = self.config.model.vocab_size
        seq = torch.randint(0, vocab, (batch or self.batch, self.seq_len + 1), generator=gen)
        return seq[:, :-1], seq[:, 1:]

    def loss(self, model: nn.Module, inputs: Tensor, labels: Tensor) -> Tensor:
        logits = model(inputs)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
