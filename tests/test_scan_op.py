"""ScanOp's plumbing (trainer/ops.py): a backend's residual goes from its forward to its backward,
eagerly and under torch.compile, and never reaches the op's callers. Runs on CPU with a CPU backend."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from longhorn_zoo.ops import Backend, define_scan_op, set_backend_preference


def cumsum_reference(x: Tensor, initial_state: Tensor | None) -> tuple[Tensor, Tensor]:
    """y_t = h0 + x_1 + ... + x_t along dim 1, and the final state y_T."""
    y = x.cumsum(1) if initial_state is None else x.cumsum(1) + initial_state.unsqueeze(1)
    return y, y[:, -1].clone()


def cumsum_fake(x: Tensor, initial_state: Tensor | None) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape), x.new_empty(x.shape[0], x.shape[2])


SEEN: list[Tensor] = []  # the residuals the backend's backward got


def _forward(x: Tensor, initial_state: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    y, h = cumsum_reference(x, initial_state)
    return y, h, y[:, ::2].clone()  # every other state, as a scan backend might keep its chunk states


def _residual(x: Tensor, initial_state: Tensor | None) -> Tensor:
    return x.new_empty(x.shape[0], (x.shape[1] + 1) // 2, x.shape[2])


@torch.library.custom_op("longhorn_zoo_test::cumsum_bwd", mutates_args=())
def _cumsum_bwd(dy: Tensor, dh: Tensor, residual: Tensor) -> tuple[Tensor, Tensor]:
    SEEN.append(residual.clone())
    g = dy.flip(1).cumsum(1).flip(1) + dh.unsqueeze(1)
    return g, g[:, 0].clone()


@_cumsum_bwd.register_fake
def _(dy, dh, residual):
    return dy.new_empty(dy.shape), dy.new_empty(dy.shape[0], dy.shape[2])


def _backward(inputs, outputs, grads):
    y, h, residual = outputs
    dy, dh = (torch.zeros_like(o) if g is None else g for o, g in zip((y, h), grads))
    dx, dh0 = _cumsum_bwd(dy, dh, residual)
    return dx, (None if inputs[1] is None else dh0)


OP = define_scan_op("longhorn_zoo_test::residual_cumsum", cumsum_reference, cumsum_fake)
OP.register_backend(Backend(name="test", device_type="cpu", is_available=lambda: True, forward=_forward,
                            backward=_backward, residual=_residual))


@pytest.fixture(autouse=True)
def _fresh():
    SEEN.clear()
    yield
    set_backend_preference("auto")


def _inputs() -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(2, 7, 3, generator=gen, dtype=torch.float64, requires_grad=True),
            torch.randn(2, 3, generator=gen, dtype=torch.float64, requires_grad=True))


@pytest.mark.parametrize("compiled", [False, True])
def test_the_backward_gets_the_forward_residual_and_callers_never_see_it(compiled: bool) -> None:
    x, h0 = _inputs()
    fn = torch.compile(OP, fullgraph=True, backend="aot_eager") if compiled else OP
    out = fn(x, h0)
    assert len(out) == 2  # the reference's results only
    y, h = out
    dy, dh = torch.randn_like(y), torch.randn_like(h)
    got = torch.autograd.grad((y, h), (x, h0), (dy, dh))
    assert len(SEEN) == 1 and torch.equal(SEEN[0], _forward(x.detach(), h0.detach())[2])
    y_ref, h_ref = cumsum_reference(x, h0)
    want = torch.autograd.grad((y_ref, h_ref), (x, h0), (dy, dh))
    for g, w in zip((y, h, *got), (y_ref, h_ref, *want)):
        torch.testing.assert_close(g, w)


def test_the_reference_keeps_an_empty_residual() -> None:
    set_backend_preference("reference")
    x, h0 = _inputs()
    *outs, residual = OP.op(x, h0)
    assert residual.numel() == 0 and residual.dtype == torch.float32
    y, h = outs
    assert torch.equal(y, cumsum_reference(x, h0)[0])
    (y.sum() + h.sum()).backward()  # the reference's VJP: the backend's backward is not selected
    assert not SEEN and x.grad is not None


def test_opcheck_with_the_residual() -> None:
    """The fake gives the residual's shape (Backend.residual); opcheck compares it with the real one."""
    x, h0 = _inputs()
    torch.library.opcheck(OP.op, (x, h0))
    torch.library.opcheck(OP.op, (x, None))
