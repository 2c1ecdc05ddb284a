"""rwkv: RWKV-6 "Finch" (and the RWKV-5 static-decay form) as a longhorn-zoo plugin."""

from __future__ import annotations

from pathlib import Path

from trainer.hookspecs import MixerSpec, hookimpl


@hookimpl
def longhorn_zoo_mixers() -> list[MixerSpec]:
    from plugins.linear_attention.layer import flops_per_token
    from plugins.linear_attention.ops import linear_attn_scan
    from plugins.rwkv.mixer import RWKV

    return [
        MixerSpec(
            name="rwkv",
            build=RWKV,
            defaults=Path(__file__).with_name("defaults.toml"),
            ops=(linear_attn_scan,),
            flops_per_token=flops_per_token(RWKV),
        )
    ]
