"""lz-deltanet: DeltaNet's delta rule as a longhorn-zoo mixer plugin (``[model] name = "deltanet"``)."""

from __future__ import annotations

from pathlib import Path

from longhorn_zoo import MixerArgs, MixerSpec, hookimpl


def _flops_per_token(args: MixerArgs, seq_len: int) -> float:
    """Projections (2 per weight) plus 6 flops per state element per token (S k, the update, S q)."""
    head_dim = args.dim // int(args.options["n_heads"])
    weights = 4 * args.dim * args.dim + args.dim * int(args.options["n_heads"])
    return 2.0 * weights + 6.0 * args.dim * head_dim


@hookimpl
def longhorn_zoo_mixers() -> list[MixerSpec]:
    from lz_deltanet.mixer import DeltaNet
    from lz_deltanet.ops import delta_rule

    return [
        MixerSpec(
            name="deltanet",
            build=DeltaNet,
            defaults=Path(__file__).with_name("defaults.toml"),
            ops=(delta_rule,),
            flops_per_token=_flops_per_token,
        )
    ]
