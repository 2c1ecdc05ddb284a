"""What every conformance check needs: a tiny model of one mixer, inputs, comparisons, errors.

A :class:`Conformance` names one installed mixer and the tiny sizes it is checked
at (dim 64, 2 layers, 24 tokens by default). It builds the mixer alone, a block,
or the whole LM exactly as the trainer does (meta device, ``to_empty``,
``init_weights``) and raises :class:`ConformanceError` naming the mixer and the
property that broke.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from longhorn_zoo.config import ConfigError, JobConfig, load_config
from longhorn_zoo.hookspecs import MixerArgs, MixerSpec
from longhorn_zoo.model import LM, build_model
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


class Conformance:
    """One mixer at conformance-test size.

    Args:
        mixer: The mixer's registered name.
        dim: Model width.
        n_layers: Blocks of the LM-level checks.
        seq_len: Longest sequence used (and ``max_seq_len`` of the mixer).
        options: ``[model.mixer]`` overrides, e.g. ``{"n_heads": 2}``.
        compile_backend: ``torch.compile`` backend of the compile check: ``"aot_eager"``
            (graph capture and AOT autograd, fast) or ``"inductor"`` (also code generation).
    """

    batch = 2

    def __init__(self, mixer: str, dim: int = 64, n_layers: int = 2, seq_len: int = 24,
                 options: Mapping[str, Any] | None = None, compile_backend: str = "aot_eager") -> None:
        self.name = mixer
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
        try:
            return get_registry().get(self.name).spec
        except PluginError as e:
            raise self.fail("contract", str(e)) from None

    @functools.cached_property
    def config(self) -> JobConfig:
        """The job config of the tiny model, through the same path as a TOML file."""
        overrides = ["--model.name", self.name, "--model.dim", str(self.dim), "--model.n_layers",
                     str(self.n_layers), "--training.seq_len", str(self.seq_len)]
        for key, value in self.options.items():
            text = ("true" if value else "false") if isinstance(value, bool) else str(value)
            overrides += [f"--model.mixer.{key}", text]
        try:
            return load_config(None, overrides)
        except ConfigError as e:
            raise self.fail("contract", f"the defaults file does not give a valid config: {e}") from None

    def mixer_args(self, layer_id: int = 0) -> MixerArgs:
        return MixerArgs(self.dim, layer_id, self.n_layers, self.seq_len, dict(self.config.model.mixer))

    def mixer(self, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
        """The mixer alone, built on meta, moved to CPU and initialised with ``seed``."""
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
