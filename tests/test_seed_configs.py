"""The ``*_125m`` configs are the seed's models (the official Longhorn repo): parameter counts and the
distinctive choices of each mixer, so that neither can drift."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from longhorn_zoo.config import ConfigError, load_config
from longhorn_zoo.hookspecs import MixerArgs
from longhorn_zoo.model import LM, build_model
from longhorn_zoo.optim import build_optimizer

CONFIGS = Path(__file__).resolve().parents[1] / "train_configs"

SEED_PARAMS = {  # counted by instantiating the seed's models/*.py at its OpenWebText setting
    "llama": 123_587_328,
    "gla": 123_822_336,
    "retnet": 129_116_928,
    "rwkv": 124_447_776,  # including the learned position embedding (1024 x 768)
    "mamba": 129_153_792,
    "longhorn": 128_563_968,
}


@pytest.mark.parametrize("name", sorted(SEED_PARAMS))
def test_125m_config_has_the_seeds_parameter_count(name: str) -> None:
    cfg = load_config(CONFIGS / f"{name}_125m.toml")
    assert build_model(cfg.model, cfg.training.seq_len, "meta").num_params() == SEED_PARAMS[name]


def small(name: str, *extra: str) -> LM:
    """The 125m config of ``name`` with 2 layers and a small vocabulary, initialised on CPU."""
    cfg = load_config(CONFIGS / f"{name}_125m.toml", ["--model.n_layers", "2", "--model.vocab_size", "512",
                                                      *extra])
    model = build_model(cfg.model, 64, "meta")
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    return model


def std(t: torch.Tensor) -> float:
    return float(t.detach().float().std())


def test_llama_125m_mlp_is_the_seeds() -> None:
    model = small("llama")
    mlp = model.layers["0"].mlp
    assert mlp.w1.out_features == 2048 and mlp.act is F.silu
    assert std(mlp.w3.weight) == pytest.approx(0.02, rel=0.02)  # the seed's up-projection: not depth-scaled
    assert std(mlp.w2.weight) == pytest.approx(0.02 / math.sqrt(2 * 2), rel=0.02)
    cfg = load_config(CONFIGS / "llama_1b.toml")
    assert build_model(cfg.model, 2048, "meta").args.mlp_hidden == 5632  # int(8/3 x 2048) rounded up to 256


def test_gla_125m_is_the_seeds_block() -> None:
    model = small("gla")
    attn, mlp = model.layers["0"].mixer, model.layers["0"].mlp
    assert (attn.n_heads, attn.head_k, attn.head_v) == (12, 32, 64)
    assert attn.scale == pytest.approx((32 * 64) ** -0.5)  # fla's 1/sqrt(K/H) times the seed's 1/sqrt(D/H)
    assert attn.head_norm == "layernorm_noaffine" and attn.norm_weight is None and attn.head_norm_eps == 1e-5
    assert attn.g_bias is not None and attn.g_bias.shape == (768,)
    assert mlp.w1.out_features == 2048
    k = attn.key_dim
    q_bound = 2**-2.5 * math.sqrt(6 / (k + 768))  # Xavier-uniform, gain 2^-2.5
    assert float(attn.in_proj.weight[: 2 * k].detach().abs().max()) <= q_bound
    assert std(attn.in_proj.weight[: 2 * k]) == pytest.approx(q_bound / math.sqrt(3), rel=0.02)
    assert std(attn.in_proj.weight[2 * k :]) == pytest.approx(0.02, rel=0.02)
    for w in (attn.o_proj.weight, mlp.w1.weight, mlp.w2.weight, mlp.w3.weight):
        assert std(w) == pytest.approx(0.02, rel=0.02)  # no depth scaling in the seed's GLA


def test_retnet_125m_is_the_seeds_block() -> None:
    model = small("retnet")
    block = model.layers["0"]
    ret, mlp = block.mixer, block.mlp
    assert (ret.n_heads, ret.head_k, ret.value_dim) == (12, 64, 1380)
    assert mlp.w1.out_features == 1380 and mlp.act is F.gelu
    assert ret.head_norm == "rmsnorm_noaffine" and ret.norm_weight is None and ret.head_norm_eps == 1e-6
    assert block.mixer_norm.eps == 1e-6 and model.norm.eps == 1e-6
    for w in (ret.in_proj.weight, ret.o_proj.weight, mlp.w1.weight, mlp.w2.weight, mlp.w3.weight):
        assert std(w) == pytest.approx(0.02, rel=0.02)
    # the seed's rotary turns adjacent channel pairs, with frequencies theta^(-linspace(0, 1, d/2))
    x = torch.zeros(1, 1, 1, 64, dtype=torch.float64)
    x[..., 0] = 1.0
    pos = torch.tensor([3])
    y = ret.rotate(x, pos)
    torch.testing.assert_close(y[0, 0, 0, :2], torch.tensor([math.cos(3), math.sin(3)], dtype=torch.float64))
    x = torch.zeros_like(x)
    x[..., 62] = 1.0  # the last pair turns at theta^-1
    y = ret.rotate(x, pos)
    torch.testing.assert_close(y[0, 0, 0, 62:], torch.tensor([math.cos(3e-4), math.sin(3e-4)], dtype=torch.float64))


def test_rwkv_125m_is_the_seeds_x051a() -> None:
    model = small("rwkv")
    assert model.kinds[0].spec.name == "rwkv5" and model.pos_embeddings is not None
    assert isinstance(model.norm, torch.nn.LayerNorm) and model.norm.bias is None
    block = model.layers["0"]
    assert block.mixer_norm is None and block.mlp is None
    tm, cm = block.mixer.time_mix, block.mixer.channel_mix
    assert tm.n_heads == 12 and tm.decay_base.shape == (12, 1) and tm.bonus.shape == (12, 1)
    assert tm.head_norm == "groupnorm" and tm.norm_weight.shape == tm.norm_bias.shape == (768,)
    assert cm.key.out_features == 3 * 768
    assert std(tm.in_proj.weight) == pytest.approx(0.02, rel=0.02)
    assert std(tm.o_proj.weight) == pytest.approx(0.02 / math.sqrt(2 * 2), rel=0.02)
    assert std(cm.value.weight) == pytest.approx(0.02, rel=0.02)


def test_selective_blocks_use_mamba_ssm_init() -> None:
    for name in ("mamba", "longhorn"):
        mixer = small(name).layers["0"].mixer
        for lin in (mixer.in_proj, mixer.x_proj):  # PyTorch's default: uniform within 1/sqrt(fan_in)
            bound = lin.in_features**-0.5
            assert float(lin.weight.abs().max()) <= bound and std(lin.weight) > 0.9 * bound / math.sqrt(3)
        bound = mixer.out_proj.in_features**-0.5 / math.sqrt(2)  # then divided by sqrt(n_layers)
        assert float(mixer.out_proj.weight.abs().max()) <= bound



def test_selective_blocks_normal_init_is_std_002() -> None:
    """``model.mixer.init = "normal"`` (the MQAR configs' choice): std 0.02, out_proj 0.02 / sqrt(2 L)."""
    for name in ("mamba", "longhorn"):
        mixer = small(name, "--model.mixer.init", "normal").layers["0"].mixer
        assert std(mixer.in_proj.weight) == pytest.approx(0.02, rel=0.02)
        assert std(mixer.x_proj.weight) == pytest.approx(0.02, rel=0.05)
        assert std(mixer.out_proj.weight) == pytest.approx(0.02 / math.sqrt(2 * 2), rel=0.02)
    with pytest.raises(ConfigError, match="model.mixer.init = 'xavier' is not valid; choose one of mamba_ssm, normal"):
        small("longhorn", "--model.mixer.init", "xavier")
    mixer = small("longhorn").layers["0"].mixer
    with pytest.raises(ValueError, match="model.mixer.init = 'xavier'; choose one of mamba_ssm, normal"):
        type(mixer)(MixerArgs(64, 0, 2, 64, {"d_state": 4, "expand": 2, "conv_kernel": 4, "dt_rank": 0,
                                             "init": "xavier"}))  # a MixerArgs built by hand: the block checks

def test_mamba_125m_decays_a_log_as_the_seed_does() -> None:
    def decayed(config: str) -> tuple[LM, set[int]]:
        cfg = load_config(CONFIGS / config, ["--model.n_layers", "1", "--model.vocab_size", "512"])
        model = build_model(cfg.model, 64, "cpu")
        groups = build_optimizer(model, cfg.optimizer).param_groups
        return model, {id(p) for g in groups if g["weight_decay"] for p in g["params"]}

    model, ids = decayed("mamba_125m.toml")
    assert id(model.layers["0"].mixer.A_log) in ids
    assert {id(p) for p in model.parameters() if p.ndim >= 2} == ids
    model, ids = decayed("mamba_350m.toml")
    assert id(model.layers["0"].mixer.A_log) not in ids  # larger configs keep Mamba's exemption


def test_rwkv5_block_is_x051a_step_by_step() -> None:
    """The rwkv5 mixer against a token loop of the x051a block, in float64, on random weights."""
    from longhorn_zoo.hookspecs import MixerArgs
    from longhorn_zoo.plugins.rwkv.x051a import RWKV5

    dim, heads, bsz, seqlen = 32, 4, 2, 11
    mixer = RWKV5(MixerArgs(dim, 1, 3, 64, {"head_size": dim // heads, "ffn_ratio": 3.0})).double()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in mixer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.3)
        mixer.time_mix.decay_base.uniform_(-3.0, 0.0, generator=gen)  # decays inside the clamp
    x = torch.randn(bsz, seqlen, dim, generator=gen, dtype=torch.float64)
    tm, cm = mixer.time_mix, mixer.channel_mix

    def ln(mod, t):
        return F.layer_norm(t, (dim,), mod.weight, None, 1e-5)

    def shift(t):
        return F.pad(t, (0, 0, 1, -1))

    a = ln(mixer.ln_1, x)
    r, k, v, g = (F.linear(a + (shift(a) - a) * tm.mu[i], w) for i, w in enumerate(tm.in_proj.weight.chunk(4)))
    w_h, u_h = torch.exp(-torch.exp(tm.decay_base)), tm.bonus  # (H, 1)
    n = dim // heads
    state = torch.zeros(bsz, heads, n, n, dtype=torch.float64)
    ys = []
    for t in range(seqlen):
        rt, kt, vt = (z[:, t].view(bsz, heads, n) for z in (r, k, v))
        kv = kt.unsqueeze(-1) * vt.unsqueeze(-2)
        ys.append(torch.einsum("bhk,bhkv->bhv", rt, state + u_h[..., None] * kv).reshape(bsz, dim))
        state = w_h[..., None] * state + kv
    y = torch.stack(ys, 1)
    y = F.group_norm(y.reshape(-1, dim), heads, tm.norm_weight, tm.norm_bias, 64e-5).view(bsz, seqlen, dim)
    h = F.linear(y * F.silu(g), tm.o_proj.weight)
    b = ln(mixer.ln_2, x + h)
    bk, br = (b + (shift(b) - b) * cm.mu[i] for i in range(2))
    c = torch.sigmoid(cm.receptance(br)) * cm.value(F.relu(cm.key(bk)).square())
    torch.testing.assert_close(mixer(x), h + c)
