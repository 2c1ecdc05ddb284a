"""gla: Gated Linear Attention (Yang et al. 2023, arXiv 2312.06635) as a longhorn-zoo plugin."""

from __future__ import annotations

from pathlib import Path

from longhorn_zoo.hookspecs import MixerSpec, hookimpl


@hookimpl
def longhorn_zoo_mixers() -> list[MixerSpec]:
    from longhorn_zoo.plugins.gla.mixer import GLA
    from longhorn_zoo.plugins.linear_attention.layer import flops_per_token
    from longhorn_zoo.plugins.linear_attention.ops import linear_attn_scan
    from longhorn_zoo.plugins.selective_scan.conv import causal_conv1d

    return [
        MixerSpec(
            name="gla",
            build=GLA,
            defaults=Path(__file__).with_name("defaults.toml"),
            ops=(linear_attn_scan, causal_conv1d),
            flops_per_token=flops_per_token(GLA),
        )
    ]
