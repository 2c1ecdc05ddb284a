"""longhorn: the Longhorn state-space mixer (arXiv 2407.14207) as a longhorn-zoo plugin."""

from __future__ import annotations

from pathlib import Path

from trainer.hookspecs import MixerArgs, MixerSpec, hookimpl


def _flops_per_token(args: MixerArgs, seq_len: int) -> float:
    """Matmuls (2 per weight) plus about 6 flops per state element per token in the scan."""
    o = args.options
    e, n = int(o["expand"]) * args.dim, int(o["d_state"])
    r = int(o["dt_rank"]) or -(-args.dim // 16)
    weights = args.dim * 2 * e + e * (r + 2 * n) + r * e + e * args.dim + e * int(o["conv_kernel"])
    return 2.0 * weights + 6.0 * e * n


@hookimpl
def longhorn_zoo_mixers() -> list[MixerSpec]:
    from plugins.longhorn.mixer import Longhorn
    from plugins.longhorn.ops import longhorn_scan

    return [
        MixerSpec(
            name="longhorn",
            build=Longhorn,
            defaults=Path(__file__).with_name("defaults.toml"),
            ops=(longhorn_scan,),
            flops_per_token=_flops_per_token,
        )
    ]
