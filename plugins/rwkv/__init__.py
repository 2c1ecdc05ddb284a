"""rwkv: RWKV-6 "Finch" (and the RWKV-5 static-decay form) and rwkv5, the seed's RWKV "x051a", as a
longhorn-zoo plugin."""

from __future__ import annotations

from pathlib import Path

from longhorn_zoo.hookspecs import MixerSpec, hookimpl


@hookimpl
def longhorn_zoo_mixers() -> list[MixerSpec]:
    from longhorn_zoo.plugins.linear_attention.layer import flops_per_token
    from longhorn_zoo.plugins.linear_attention.ops import linear_attn_scan
    from longhorn_zoo.plugins.rwkv.mixer import RWKV
    from longhorn_zoo.plugins.rwkv.x051a import RWKV5

    here = Path(__file__).parent
    return [
        MixerSpec(name="rwkv", build=RWKV, defaults=here / "defaults.toml", ops=(linear_attn_scan,),
                  flops_per_token=flops_per_token(RWKV)),
        MixerSpec(name="rwkv5", build=RWKV5, defaults=here / "defaults_rwkv5.toml", ops=(linear_attn_scan,),
                  flops_per_token=flops_per_token(RWKV5)),
    ]
