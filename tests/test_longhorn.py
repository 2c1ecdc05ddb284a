"""The Longhorn scan op and mixer against an independent float64 token-by-token loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from longhorn_zoo.config import load_config
from longhorn_zoo.model import build_model
from longhorn_zoo.plugins.longhorn.ops import longhorn_scan, longhorn_step


def naive_longhorn(x, dt, k, q, D, z, h0, reset):
    """The recurrence exactly as the paper writes it, one token at a time, in float64."""
    bsz, seqlen, chans = x.shape
    h = torch.zeros(bsz, chans, k.shape[-1], dtype=torch.float64) if h0 is None else h0
    ys = []
    for t in range(seqlen):
        if reset is not None:
            h = h * (~reset[:, t]).double()[:, None, None]
        beta = torch.sigmoid(dt[:, t])  # (B, C)
        delta = beta / (1 + beta * (k[:, t] ** 2).sum(-1, keepdim=True))
        kt = k[:, t, None, :]
        h = (1 - delta[..., None] * kt**2) * h + (delta * x[:, t])[..., None] * kt
        y = (h * q[:, t, None, :]).sum(-1) + D * x[:, t]
        ys.append(y * F.silu(z[:, t]) if z is not None else y)
    return torch.stack(ys, 1), h


def random_inputs(bsz, seqlen, chans, nstate, gen, with_state=True, with_reset=True, with_gate=True):
    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)

    return [
        r(bsz, seqlen, chans), r(bsz, seqlen, chans), r(bsz, seqlen, nstate), r(bsz, seqlen, nstate), r(chans),
        r(bsz, seqlen, chans) if with_gate else None,
        r(bsz, chans, nstate) if with_state else None,
        (torch.rand(bsz, seqlen, generator=gen) < 0.15) if with_reset else None,
    ]


@pytest.mark.parametrize("seqlen", [1, 17, 33])
@pytest.mark.parametrize("variant", ["full", "no_state_no_reset", "no_gate"])
def test_op_matches_float64_loop_forward_states_and_gradients(seqlen, variant):
    gen = torch.Generator().manual_seed(seqlen)
    args = random_inputs(2, seqlen, 5, 4, gen, with_state=variant != "no_state_no_reset",
                         with_reset=variant != "no_state_no_reset", with_gate=variant != "no_gate")
    y, h = longhorn_scan(*args)
    y_ref, h_ref = naive_longhorn(*args)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h, h_ref, rtol=1e-10, atol=1e-10)
    gy, gh = torch.randn_like(y), torch.randn_like(h)
    diff = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    grads = torch.autograd.grad((y * gy).sum() + (h * gh).sum(), diff)
    grads_ref = torch.autograd.grad((y_ref * gy).sum() + (h_ref * gh).sum(), diff)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-9)


def test_op_gradcheck_and_opcheck():
    gen = torch.Generator().manual_seed(0)
    args = random_inputs(1, 6, 3, 2, gen)
    torch.autograd.gradcheck(lambda *a: longhorn_scan(*a, args[-1]), args[:-1])
    torch.library.opcheck(longhorn_scan.op, args)


def test_float32_op_is_close_to_float64():
    gen = torch.Generator().manual_seed(1)
    args = random_inputs(2, 40, 8, 16, gen)
    y64, h64 = longhorn_scan(*args)
    y32, h32 = longhorn_scan(*[a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args])
    assert (y32.double() - y64).norm() / y64.norm() < 1e-5
    assert (h32.double() - h64).norm() / h64.norm() < 1e-5


def test_step_form_matches_full_sequence():
    gen = torch.Generator().manual_seed(2)
    x, dt, k, q, D, z, h0, _ = random_inputs(2, 9, 5, 4, gen)
    y_full, h_full = longhorn_scan(x, dt, k, q, D, z, h0, None)
    h = h0
    for t in range(9):
        y_t, h = longhorn_step(x[:, t], dt[:, t], k[:, t], q[:, t], D, z[:, t], h)
        torch.testing.assert_close(y_t, y_full[:, t])
    torch.testing.assert_close(h, h_full)


def test_mixer_step_and_split_reproduce_forward():
    cfg = load_config(None, ["--model.name", "longhorn", "--model.dim", "32", "--model.n_layers", "2"])
    torch.manual_seed(0)
    model = build_model(cfg.model, 16, "cpu").double()
    model.init_weights()
    tokens = torch.randint(0, 256, (2, 13))
    logits, _ = model(tokens, return_states=True)
    _, states = model(tokens[:, :6], return_states=True)
    rest, _ = model(tokens[:, 6:], states, return_states=True)
    torch.testing.assert_close(rest, logits[:, 6:])
    states = None
    for t in range(13):
        step_logits, states = model.step(tokens[:, t], states)
        torch.testing.assert_close(step_logits, logits[:, t])
