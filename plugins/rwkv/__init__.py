"""rwkv: RWKV-6 "Finch" (and the RWKV-5 static-decay form) as a longhorn-zoo plugin."""

from __future__ import annotations

from pathlib import Path

from longhorn_zoo.hookspecs import MixerSpec, hookimpl


@hookimpl
def longhorn_zoo_mixers() -> list[MixerSpec]:
    from longhorn_zoo.plugins.linear_attention.layer import flops_per_token
    from longhorn_zoo.plugins.linear_attention.ops import linear_attn_scan
    from longhorn_zoo.plugins.rwkv.mixer import RWKV

    return [
        MixerSpec(
            name="rwkv",
            build=RWKV,
            defaults=Path(__file__).with_name("defaults.toml"),
            ops=(linear_attn_scan,),
            flops_per_token=flops_per_token(RWKV),
        )
    ]
