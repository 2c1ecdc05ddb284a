"""longhorn: the Longhorn state-space mixer (arXiv 2407.14207) as a longhorn-zoo plugin."""

from __future__ import annotations

from pathlib import Path

from longhorn_zoo.hookspecs import MixerSpec, hookimpl


@hookimpl
def longhorn_zoo_mixers() -> list[MixerSpec]:
    from longhorn_zoo.plugins.longhorn.mixer import Longhorn
    from longhorn_zoo.plugins.longhorn.ops import longhorn_scan
    from longhorn_zoo.plugins.selective_scan.block import flops_per_token
    from longhorn_zoo.plugins.selective_scan.conv import causal_conv1d

    return [
        MixerSpec(
            name="longhorn",
            build=Longhorn,
            defaults=Path(__file__).with_name("defaults.toml"),
            ops=(longhorn_scan, causal_conv1d),
            flops_per_token=flops_per_token,
        )
    ]
