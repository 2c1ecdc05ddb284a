"""mamba: the Mamba-1 selective state-space mixer (arXiv 2312.00752) as a longhorn-zoo plugin."""

from __future__ import annotations

from pathlib import Path

from trainer.hookspecs import MixerSpec, hookimpl


@hookimpl
def longhorn_zoo_mixers() -> list[MixerSpec]:
    from plugins.mamba.mixer import Mamba
    from plugins.mamba.ops import mamba_scan
    from plugins.selective_scan.block import flops_per_token

    return [
        MixerSpec(
            name="mamba",
            build=Mamba,
            defaults=Path(__file__).with_name("defaults.toml"),
            ops=(mamba_scan,),
            flops_per_token=flops_per_token,
        )
    ]
