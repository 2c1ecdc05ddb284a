"""longhorn: the Longhorn state-space mixer (arXiv 2407.14207) as a longhorn-zoo plugin."""

from __future__ import annotations

from pathlib import Path

from trainer.hookspecs import MixerSpec, hookimpl


@hookimpl
def longhorn_zoo_mixers() -> list[MixerSpec]:
    from plugins.longhorn.mixer import Longhorn
    from plugins.longhorn.ops import longhorn_scan
    from plugins.selective_scan.block import flops_per_token

    return [
        MixerSpec(
            name="longhorn",
            build=Longhorn,
            defaults=Path(__file__).with_name("defaults.toml"),
            ops=(longhorn_scan,),
            flops_per_token=flops_per_token,
        )
    ]
