"""The linear-attention scan (GLA, RetNet, RWKV-6) and its three mixers.

The op is checked against an independent float64 token-by-token loop written
here, for the three decay forms: per-key (GLA), per-head (RetNet) and per-key
with a bonus (RWKV-6). The mixers are checked for recurrent consistency:
``step`` and a split ``forward`` with state reproduce one full ``forward``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from longhorn_zoo.config import load_config
from longhorn_zoo.model import build_model
from longhorn_zoo.plugins.linear_attention.ops import CHUNK_PER_HEAD, CHUNK_PER_KEY, linear_attn_scan, linear_attn_step

VARIANTS = ("gla", "retnet", "rwkv")
B, H, K, V = 2, 3, 8, 5


def loop_oracle(q, k, v, log_decay, bonus, scale, initial_state, reset):
    """The recurrence one token at a time, in float64."""
    bsz, seqlen, nh, dk = q.shape
    state = q.new_zeros(bsz, nh, dk, v.shape[-1]) if initial_state is None else initial_state
    outs = []
    for t in range(seqlen):
        if reset is not None:
            state = state * (~reset[:, t]).to(state.dtype)[:, None, None, None]
        g = log_decay[:, t] if log_decay.dim() == 4 else log_decay[None, :, None].expand(bsz, nh, dk)
        kv = k[:, t, :, :, None] * v[:, t, :, None, :]
        if bonus is None:
            state = g.exp()[..., None] * state + kv
            outs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], state))
        else:
            outs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], state + bonus[None, :, :, None] * kv))
            state = g.exp()[..., None] * state + kv
    return torch.stack(outs, 1), state


def make_inputs(variant: str, seqlen: int, with_state: bool, with_reset: bool, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    q, k, v = rnd(B, seqlen, H, K), rnd(B, seqlen, H, K), rnd(B, seqlen, H, V)
    bonus = None
    if variant == "gla":
        log_decay = F.logsigmoid(rnd(B, seqlen, H, K) * 2) / 4
    elif variant == "retnet":
        log_decay = torch.log(1 - 2.0 ** (-5 - torch.arange(H, dtype=torch.float64))).to(dtype)
    else:  # rwkv: w = exp(-exp(d)); d up to ~3 gives decays as strong as exp(-20) in one step
        log_decay = -torch.exp(rnd(B, seqlen, H, K) - 0.5)
        bonus = rnd(H, K)
    state = rnd(B, H, K, V) if with_state else None
    reset = (torch.rand(B, seqlen, generator=gen) < 0.1) if with_reset else None
    return q, k, v, log_decay, bonus, K**-0.5, state, reset


def _grads(fn, inputs, seed=1):
    """Outputs of fn and gradients of a random projection of them w.r.t. every float input."""
    leaves = [x.detach().requires_grad_() if isinstance(x, Tensor) and x.is_floating_point() else x for x in inputs]
    o, s = fn(*leaves)
    gen = torch.Generator().manual_seed(seed)
    loss = (o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() + (
        s * torch.randn(s.shape, generator=gen, dtype=s.dtype)).sum()
    diff = [x for x in leaves if isinstance(x, Tensor) and x.requires_grad]
    return (o, s), torch.autograd.grad(loss, diff)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("seqlen", [1, 17, 70])
@pytest.mark.parametrize("with_state_and_reset", [False, True])
def test_chunked_scan_matches_token_loop_forward_and_gradients(variant, seqlen, with_state_and_reset):
    inputs = make_inputs(variant, seqlen, with_state_and_reset, with_state_and_reset)
    (o, s), grads = _grads(linear_attn_scan, inputs)
    (o_ref, s_ref), grads_ref = _grads(loop_oracle, inputs)
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(s, s_ref)
    assert len(grads) == len(grads_ref)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize("variant", VARIANTS)
def test_step_form_matches_full_form(variant):
    q, k, v, log_decay, bonus, scale, state, _ = make_inputs(variant, 23, True, False)
    o_full, s_full = linear_attn_scan(q, k, v, log_decay, bonus, scale, state, None)
    outs = []
    for t in range(q.shape[1]):
        g = log_decay[:, t] if log_decay.dim() == 4 else log_decay
        o, state = linear_attn_step(q[:, t], k[:, t], v[:, t], g, bonus, scale, state)
        outs.append(o)
    torch.testing.assert_close(torch.stack(outs, 1), o_full)
    torch.testing.assert_close(state, s_full)


@pytest.mark.parametrize("variant", VARIANTS)
def test_split_sequence_with_state_equals_one_pass(variant):
    q, k, v, log_decay, bonus, scale, _, reset = make_inputs(variant, 50, False, True)
    o, s = linear_attn_scan(q, k, v, log_decay, bonus, scale, None, reset)
    cut = 29
    g1, g2 = (log_decay[:, :cut], log_decay[:, cut:]) if log_decay.dim() == 4 else (log_decay, log_decay)
    o1, s1 = linear_attn_scan(q[:, :cut], k[:, :cut], v[:, :cut], g1, bonus, scale, None, reset[:, :cut])
    o2, s2 = linear_attn_scan(q[:, cut:], k[:, cut:], v[:, cut:], g2, bonus, scale, s1, reset[:, cut:])
    torch.testing.assert_close(torch.cat([o1, o2], 1), o)
    torch.testing.assert_close(s2, s)


def test_strong_decays_stay_finite():
    q, k, v, _, bonus, scale, state, reset = make_inputs("rwkv", 40, True, True)
    log_decay = torch.full((B, 40, H, K), -200.0, dtype=torch.float64)
    log_decay[:, ::3] = -1e-4
    (o, s), grads = _grads(linear_attn_scan, (q, k, v, log_decay, bonus, scale, state, reset))
    (o_ref, s_ref), _ = _grads(loop_oracle, (q, k, v, log_decay, bonus, scale, state, reset))
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(s, s_ref)
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_output_dtype_follows_q_and_state_is_float32(dtype):
    q, k, v, log_decay, bonus, scale, state, reset = make_inputs("gla", 20, True, True, dtype=dtype)
    o, s = linear_attn_scan(q, k, v, log_decay, bonus, scale, state.float(), reset)
    assert o.dtype == dtype and s.dtype == torch.float32
    o_ref, s_ref = loop_oracle(*[x.double() if isinstance(x, Tensor) and x.is_floating_point() else x
                                 for x in (q, k, v, log_decay, bonus, scale, state, reset)])
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(o.double(), o_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(s.double(), s_ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("variant", VARIANTS)
def test_opcheck(variant):
    """Schema, fake tensor, autograd registration and static tracing. Dynamic-shape tracing (~15 s) is left
    to the conformance suite (``python -m longhorn_zoo.conformance gla``), which runs the full opcheck."""
    seqlen = (CHUNK_PER_HEAD if variant == "retnet" else CHUNK_PER_KEY) + 3
    inputs = make_inputs(variant, seqlen, True, True, dtype=torch.float32)
    args = tuple(x.requires_grad_() if isinstance(x, Tensor) and x.is_floating_point() else x for x in inputs)
    utils = ["test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_static"]
    torch.library.opcheck(linear_attn_scan.op, args, test_utils=utils)


# -- mixers -------------------------------------------------------------------

MIXER_CASES = [("gla", []), ("retnet", []), ("rwkv", []), ("rwkv", ["--model.mixer.decay", "static"]),
               ("gla", ["--model.mixer.short_conv", "4"]), ("retnet", ["--model.mixer.short_conv", "3"])]


def _tiny_model(name: str, extra: list[str]):
    overrides = ["--model.name", name, "--model.dim", "64", "--model.n_layers", "2"]
    if name == "rwkv":
        overrides += ["--model.mixer.head_size", "16"]
    cfg = load_config(None, overrides + extra)
    torch.manual_seed(0)
    model = build_model(cfg.model, 64, "meta").to_empty(device="cpu")
    model.init_weights()
    return model.double()


@pytest.mark.parametrize(("name", "extra"), MIXER_CASES)
def test_mixer_step_reproduces_forward(name, extra):
    model = _tiny_model(name, extra)
    tokens = torch.randint(0, 256, (2, 21))
    logits = model(tokens)
    states, steps = None, []
    for t in range(tokens.shape[1]):
        out, states = model.step(tokens[:, t], states)
        steps.append(out)
    torch.testing.assert_close(torch.stack(steps, 1), logits)


@pytest.mark.parametrize(("name", "extra"), MIXER_CASES)
def test_mixer_forward_split_with_state_equals_one_pass(name, extra):
    model = _tiny_model(name, extra)
    tokens = torch.randint(0, 256, (2, 37))
    logits = model(tokens)
    first, states = model(tokens[:, :20], return_states=True)
    second, _ = model(tokens[:, 20:], states, return_states=True)
    torch.testing.assert_close(torch.cat([first, second], 1), logits)


@pytest.mark.parametrize(("name", "extra"), [("rwkv", []), ("rwkv", ["--model.mixer.decay", "static"]), ("gla", [])])
def test_mixer_log_decay_is_bounded_for_the_chunked_kernels(name, extra):
    """An unbounded decay (RWKV's -exp(d) with a large d, GLA's logsigmoid of a very negative logit) is
    clamped at MIN_LOG_DECAY in the model, so that every backend computes the same bounded function."""
    from longhorn_zoo.plugins.linear_attention.layer import MIN_LOG_DECAY

    model = _tiny_model(name, extra)
    mixer = model.layers["0"].mixer
    mixer = mixer.time_mix if name == "rwkv" else mixer
    with torch.no_grad():
        if name == "rwkv":
            mixer.decay_base.fill_(6.0)  # -exp(6) = -403 per step before the clamp
        else:
            mixer.gk_up.bias.fill_(-500.0)  # logsigmoid(-500) / 16 = -31 per step
    x = torch.randn(2, 9, 64, dtype=torch.float64)
    log_decay = mixer.features(x, None, None).log_decay
    assert log_decay.min().item() == pytest.approx(MIN_LOG_DECAY)
