"""The plugin contract of longhorn-zoo: everything a mixer plugin supplies, in one file.

A mixer plugin is any installed distribution that declares an entry point in the
group ``longhorn_zoo.mixers``; the entry point names a module (or object) that
implements the hooks below with the :data:`hookimpl` marker::

    # pyproject.toml of the plugin
    [project.entry-points."longhorn_zoo.mixers"]
    my_mixer = "my_package.plugin"

    # my_package/plugin.py
    from longhorn_zoo import MixerSpec, hookimpl

    @hookimpl
    def longhorn_zoo_mixers() -> list[MixerSpec]:
        return [MixerSpec(name="my_mixer", build=MyMixer.from_args,
                          defaults=Path(__file__).with_name("defaults.toml"),
                          ops=(my_scan,))]

The trainer treats built-in and third-party plugins the same way. See
``docs/plugins.md`` for a walk-through and the conformance suite.

The mixer module contract (what ``MixerSpec.build`` returns) is an ``nn.Module``:

* ``forward(x, state=None, *, return_state=False, reset=None)``: ``x`` is (B, T, D)
  and the result is (B, T, D). With ``return_state=True`` it returns ``(y, new_state)``,
  where ``new_state`` continues the sequence; ``state`` is a state returned
  earlier (or None for a fresh sequence). Outputs at position t depend only on
  inputs at positions <= t (causality).
* ``reset``: None, or a (B, T) bool tensor that is True where a new document
  starts in a packed batch (the data loaders' ``reset``). With a reset at t, the
  outputs at t and after (up to the next reset) must not depend on anything before
  t, neither earlier inputs nor the ``state`` passed in: recurrent mixers zero
  their state and short-convolution windows there, attention masks across
  documents. The state returned continues the last document. The trainer passes
  ``reset`` only when ``data.document_boundaries`` is on, so ``reset=None`` must
  stay the fast path; a reset at t = 0 of every row is the same as ``state=None``.
  ``step`` never gets one (generation is one document).
* ``step(x, state) -> (y, new_state)``: one token, ``x`` of shape (B, D); the
  recurrent form used for generation. ``state=None`` starts a fresh sequence.
  Feeding tokens one by one through ``step`` must reproduce ``forward``.
* ``init_weights()``: (re)initialises every parameter and buffer in place. Models
  are built on the meta device, moved with ``to_empty`` and then initialised, so
  ``__init__`` must not rely on parameter values.
* ``residual_input`` (optional attribute, default False): True hands the mixer the
  residual stream x itself instead of ``norm(x)``; the block then has no norm before
  the mixer, and the mixer applies its own (RWKV x051a, whose channel mix reads
  ``norm(x + time_mix(norm(x)))``). The block still adds the output to x.
* ``no_weight_decay`` (optional attribute): names of the module's own parameters
  that get no weight decay although they have two or more dimensions (by default
  only parameters of two or more dimensions are decayed), e.g. ``("A_log",)``.
  It is a module attribute, not a flag on the parameter, because parameters are
  replaced when the model is sharded (FSDP) and moved off the meta device.
  ``optimizer.weight_decay_exemptions = false`` ignores these lists (the seed's rule).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pluggy
from torch import nn

from longhorn_zoo.ops import ScanOp

PROJECT = "longhorn_zoo"
ENTRY_POINT_GROUP = "longhorn_zoo.mixers"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@dataclass(frozen=True)
class MixerArgs:
    """What a mixer factory receives.

    Attributes:
        dim: Model width D; the mixer maps (B, T, D) to (B, T, D).
        layer_id: Index of this block, 0-based (for depth-dependent init).
        n_layers: Number of blocks in the model.
        max_seq_len: Training context length (for RoPE tables and the like).
        options: The mixer's own options: its ``[mixer]`` defaults table merged
            with the user's ``[model.mixer]`` table (in a hybrid stack, its
            ``[model.mixers.<name>]`` table), already type-checked.
    """

    dim: int
    layer_id: int
    n_layers: int
    max_seq_len: int
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MixerSpec:
    """Everything a plugin registers for one mixer.

    Attributes:
        name: Unique mixer name used as ``[model] name`` in configs, e.g. "longhorn".
        build: Factory ``MixerArgs -> nn.Module`` honouring the module contract above.
        defaults: Path of a TOML file shipped in the plugin package. Its top-level
            keys are defaults for the ``[model]`` section (e.g. ``mlp = false``);
            its ``[mixer]`` table declares every mixer option with its default
            value, whose type is the option's type; an optional ``[valid]`` table
            gives an option's choices (strings) or bounds (numbers), checked when
            the config is read (docs/plugins.md). A user config overrides only
            what it changes.
        ops: The scan ops of this mixer (see :mod:`longhorn_zoo.ops`); listed with their
            available backends and checked by the conformance suite, which runs
            gradcheck and opcheck on each op's ``example_inputs``.
        flops_per_token: Optional ``(MixerArgs, seq_len) -> float``: forward FLOPs
            per token of one mixer layer, counting the sequence-length-dependent
            work (attention scores, state updates) as well as the matmuls. Used
            for MFU; when None, 2 x the mixer's parameter count is used.
    """

    name: str
    build: Callable[[MixerArgs], nn.Module]
    defaults: Path
    ops: Sequence[ScanOp] = ()
    flops_per_token: Callable[[MixerArgs, int], float] | None = None


@hookspec
def longhorn_zoo_mixers() -> list[MixerSpec]:
    """Return the mixers this plugin provides.

    Called once per plugin when the registry is built (all results are
    collected, none is ``firstresult``). Return a list of :class:`MixerSpec`.
    Importing the plugin module should be cheap: import heavy optional
    dependencies (triton, CUDA extensions) lazily, inside backends.

    Returns:
        One :class:`MixerSpec` per mixer; names must be unique across all
        installed plugins.
    """
    raise NotImplementedError
