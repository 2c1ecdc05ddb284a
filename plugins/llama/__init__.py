"""llama: multi-head causal attention with RoPE as a longhorn-zoo plugin."""

from __future__ import annotations

from pathlib import Path

from longhorn_zoo.hookspecs import MixerArgs, MixerSpec, hookimpl


def _flops_per_token(args: MixerArgs, seq_len: int) -> float:
    """QKV and output projections, plus scores and weighted sum over the causal half of the context."""
    return 2.0 * 4 * args.dim * args.dim + 2.0 * args.dim * seq_len


@hookimpl
def longhorn_zoo_mixers() -> list[MixerSpec]:
    from longhorn_zoo.plugins.llama.attention import Attention

    return [MixerSpec(name="llama", build=Attention, defaults=Path(__file__).with_name("defaults.toml"),
                      flops_per_token=_flops_per_token)]
