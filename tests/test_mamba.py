"""The mamba plugin: its scan op against an independent float64 token-by-token loop, and its mixer."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from longhorn_zoo.config import Optimizer as OptimizerConfig
from longhorn_zoo.hookspecs import MixerArgs
from longhorn_zoo.optim import build_optimizer
from longhorn_zoo.plugins.mamba.mixer import Mamba
from longhorn_zoo.plugins.mamba.ops import mamba_scan, mamba_step

CHANNELS, STATE = 6, 4
NAMES = ("x", "dt", "A", "B", "C", "D", "z", "initial_state", "reset")


def loop_oracle(x, dt, A, B, C, D, z, initial_state, reset) -> tuple[Tensor, Tensor]:
    """Mamba-1 written out one token at a time, straight from the paper's recurrence."""
    bsz, seqlen, chans = x.shape
    h = torch.zeros(bsz, chans, A.shape[-1], dtype=x.dtype) if initial_state is None else initial_state
    ys = []
    for t in range(seqlen):
        if reset is not None:
            h = torch.where(reset[:, t, None, None], torch.zeros_like(h), h)
        delta = torch.log1p(torch.exp(dt[:, t]))  # softplus
        h = torch.exp(delta[:, :, None] * A) * h + (delta * x[:, t])[:, :, None] * B[:, t, None, :]
        y = (h * C[:, t, None, :]).sum(-1) + D * x[:, t]
        if z is not None:
            y = y * z[:, t] * torch.sigmoid(z[:, t])
        ys.append(y)
    return torch.stack(ys, 1), h


def make_inputs(
    bsz: int, seqlen: int, seed: int, *, gate: bool = True, state: bool = True, reset: bool = True
) -> dict[str, Tensor | None]:
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int, scale: float = 1.0, shift: float = 0.0) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift

    return {
        "x": r(bsz, seqlen, CHANNELS), "dt": r(bsz, seqlen, CHANNELS, shift=-1.0),
        "A": -torch.exp(r(CHANNELS, STATE, scale=0.5)), "B": r(bsz, seqlen, STATE, scale=0.5),
        "C": r(bsz, seqlen, STATE, scale=0.5), "D": r(CHANNELS), "z": r(bsz, seqlen, CHANNELS) if gate else None,
        "initial_state": r(bsz, CHANNELS, STATE) if state else None,
        "reset": (torch.rand(bsz, seqlen, generator=g) < 0.15) if reset else None,
    }  # fmt: skip


def outputs_and_grads(fn, inputs: dict[str, Tensor | None], seed: int) -> tuple[list[Tensor], dict[str, Tensor]]:
    """Outputs of ``fn`` and the gradients of a random projection of them w.r.t. every float input."""
    leaves = {n: v.clone().requires_grad_(True) for n, v in inputs.items() if v is not None and v.is_floating_point()}
    args = [leaves.get(n, inputs[n]) for n in NAMES]
    y, h = fn(*args)
    g = torch.Generator().manual_seed(seed + 1)
    dy, dh = torch.randn(y.shape, generator=g, dtype=y.dtype), torch.randn(h.shape, generator=g, dtype=h.dtype)
    grads = torch.autograd.grad((y, h), list(leaves.values()), (dy, dh))
    return [y.detach(), h.detach()], dict(zip(leaves, grads))


@pytest.mark.parametrize("seqlen", [1, 17, 33])
@pytest.mark.parametrize("gate,state,reset", [(True, True, True), (False, False, False), (True, False, True)])
def test_scan_matches_token_loop_forward_grads_and_states(seqlen: int, gate: bool, state: bool, reset: bool) -> None:
    inputs = make_inputs(2, seqlen, seed=seqlen, gate=gate, state=state, reset=reset)
    (y, h), grads = outputs_and_grads(mamba_scan, inputs, seed=seqlen)
    (y_ref, h_ref), grads_ref = outputs_and_grads(loop_oracle, inputs, seed=seqlen)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h, h_ref, rtol=1e-10, atol=1e-10)
    expected = {"x", "dt", "A", "B", "C", "D"} | ({"z"} if gate else set()) | ({"initial_state"} if state else set())
    assert set(grads) == expected
    for name in expected:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-9, atol=1e-10, msg=f"d{name}")


def test_float32_scan_is_close_to_float64_loop() -> None:
    inputs = make_inputs(2, 33, seed=3)
    ref = loop_oracle(**inputs)
    f32 = {n: (v.float() if v is not None and v.is_floating_point() else v) for n, v in inputs.items()}
    y, h = mamba_scan(*f32.values())
    assert y.dtype == torch.float32 and h.dtype == torch.float32
    torch.testing.assert_close(y.double(), ref[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(h.double(), ref[1], rtol=1e-4, atol=1e-5)


def test_reset_restarts_the_sequence_from_a_zero_state() -> None:
    inputs = make_inputs(1, 17, seed=4, reset=False)
    inputs["reset"] = torch.zeros(1, 17, dtype=torch.bool)
    inputs["reset"][0, 9] = True
    y, h = mamba_scan(*inputs.values())
    tail = {n: (v[:, 9:] if v is not None and v.dim() == 3 and n not in ("A", "initial_state") else v)
            for n, v in inputs.items()}  # fmt: skip
    tail["initial_state"], tail["reset"] = None, None
    y_tail, h_tail = mamba_scan(*tail.values())
    torch.testing.assert_close(y[:, 9:], y_tail)
    torch.testing.assert_close(h, h_tail)


def test_final_state_continues_the_sequence() -> None:
    inputs = make_inputs(2, 33, seed=5, reset=False)
    y, h = mamba_scan(*inputs.values())
    first = {n: (v[:, :20] if v is not None and v.dim() == 3 and n not in ("A", "initial_state") else v)
             for n, v in inputs.items()}  # fmt: skip
    second = {n: (v[:, 20:] if v is not None and v.dim() == 3 and n not in ("A", "initial_state") else v)
              for n, v in inputs.items()}  # fmt: skip
    y1, h1 = mamba_scan(*first.values())
    second["initial_state"] = h1
    y2, h2 = mamba_scan(*second.values())
    torch.testing.assert_close(torch.cat([y1, y2], 1), y)
    torch.testing.assert_close(h2, h)


def test_step_form_matches_full_form() -> None:
    inputs = make_inputs(2, 17, seed=6, reset=False)
    y, h = mamba_scan(*inputs.values())
    state = inputs["initial_state"]
    for t in range(17):
        x, dt, B, C, z = (inputs[n][:, t] for n in ("x", "dt", "B", "C", "z"))
        y_t, state = mamba_step(x, dt, inputs["A"], B, C, inputs["D"], z, state)
        torch.testing.assert_close(y_t, y[:, t])
    torch.testing.assert_close(state, h)


def test_opcheck() -> None:
    inputs = make_inputs(2, 5, seed=7)
    args = [v.float().requires_grad_(True) if v is not None and v.is_floating_point() else v for v in inputs.values()]
    torch.library.opcheck(mamba_scan.op, tuple(args))


def _mixer(seed: int = 0) -> Mamba:
    torch.manual_seed(seed)
    mixer = Mamba(
        MixerArgs(
            dim=16,
            layer_id=0,
            n_layers=2,
            max_seq_len=64,
            options={"d_state": STATE, "expand": 2, "conv_kernel": 4, "dt_rank": 0},
        )
    )
    mixer.init_weights()
    return mixer.double()


def test_mixer_init_follows_mamba() -> None:
    mixer = _mixer()
    assert mixer.A_log.shape == (32, STATE)
    torch.testing.assert_close(mixer.A().detach(), -torch.arange(1.0, STATE + 1, dtype=torch.float64).expand(32, STATE))
    dt = torch.nn.functional.softplus(mixer.dt_proj.bias.detach())
    assert float(dt.min()) >= 1e-3 * (1 - 1e-6) and float(dt.max()) <= 0.1 * (1 + 1e-6)
    assert torch.equal(mixer.D, torch.ones_like(mixer.D))


def test_mixer_step_reproduces_forward_and_states_continue() -> None:
    mixer = _mixer()
    u = torch.randn(2, 11, 16, dtype=torch.float64)
    y, (conv_state, h) = mixer(u, return_state=True)
    state = None
    for t in range(11):
        y_t, state = mixer.step(u[:, t], state)
        torch.testing.assert_close(y_t, y[:, t])
    torch.testing.assert_close(state[0], conv_state)
    torch.testing.assert_close(state[1], h)
    y1, s1 = mixer(u[:, :4], return_state=True)
    y2 = mixer(u[:, 4:], s1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y)


def test_a_log_gets_no_weight_decay() -> None:
    mixer = _mixer()
    opt = build_optimizer(mixer, OptimizerConfig(weight_decay=0.1))
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(mixer.A_log) not in decayed and id(mixer.D) not in decayed
    assert id(mixer.in_proj.weight) in decayed
    assert math.isclose(
        sum(p.numel() for g in opt.param_groups for p in g["params"]), sum(p.numel() for p in mixer.parameters())
    )
