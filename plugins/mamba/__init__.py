"""mamba: the Mamba-1 selective state-space mixer (arXiv 2312.00752) as a longhorn-zoo plugin."""

from __future__ import annotations

from pathlib import Path

from longhorn_zoo.hookspecs import MixerSpec, hookimpl


@hookimpl
def longhorn_zoo_mixers() -> list[MixerSpec]:
    from longhorn_zoo.plugins.mamba.mixer import Mamba
    from longhorn_zoo.plugins.mamba.ops import mamba_scan
    from longhorn_zoo.plugins.selective_scan.block import flops_per_token
    from longhorn_zoo.plugins.selective_scan.conv import causal_conv1d

    return [
        MixerSpec(
            name="mamba",
            build=Mamba,
            defaults=Path(__file__).with_name("defaults.toml"),
            ops=(mamba_scan, causal_conv1d),
            flops_per_token=flops_per_token,
        )
    ]
