"""The properties every mixer must have, one function each.

Each ``check_*`` takes a :class:`~longhorn_zoo.conformance.harness.Conformance` and
returns None when the mixer has the property, or raises
:class:`~longhorn_zoo.conformance.harness.ConformanceError` naming the mixer, the
property and what was observed. The distributed check lives in
:mod:`longhorn_zoo.conformance.distributed` because it spawns processes.
"""

from __future__ import annotations

import inspect
import io
import math
from typing import Any

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from longhorn_zoo.config import load_config
from longhorn_zoo.conformance.harness import FP32_TOL, Conformance, ConformanceError, describe_mismatch, error_ratio
from longhorn_zoo.model import Block, ModelArgs, build_model
from longhorn_zoo.ops import ScanOp, scan_op_names

BF16_TOL = 5e-2
"""Largest error ratio of a bf16 forward against the fp32 forward of the same weights."""


def check_contract(c: Conformance) -> None:
    """The spec is valid, the defaults build a model on meta, and ``init_weights`` sets every tensor."""
    for spec in c.specs:
        qualnames = [op.qualname for op in spec.ops]
        if len(set(qualnames)) != len(qualnames):
            raise c.fail("contract", f"MixerSpec.ops of {spec.name!r} lists an op twice: {qualnames}")
    with c.checking("contract", "building the model from the TOML defaults alone on the meta device"):
        build_model(load_config(None, c.mixer_overrides(defaults_only=True)).model, 128, "meta")
    args = ModelArgs.from_config(c.config.model, c.seq_len)
    for i, kind in c.kinds():
        if kind.spec.flops_per_token is None:
            continue
        with c.checking("contract", f"flops_per_token of {kind.spec.name!r}"):
            flops = kind.spec.flops_per_token(kind.mixer_args(args, i), c.seq_len)
        if not (isinstance(flops, int | float) and math.isfinite(flops) and flops > 0):
            raise c.fail("contract", f"flops_per_token of {kind.spec.name!r} returned {flops!r}, expected a "
                                     "positive number")

    with c.checking("contract", "building the model on the meta device"):
        meta = build_model(c.config.model, c.seq_len, "meta")
    on_device = [n for n, t in [*meta.named_parameters(), *meta.named_buffers()] if t.device.type != "meta"]
    if on_device:
        raise c.fail("contract", f"__init__ allocates real tensors under torch.device('meta'): {on_device[:5]}; "
                                 "create parameters and buffers without an explicit device")
    model = c.model(init=False)
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_floating_point():
                t.fill_(float("nan"))
    c.init(model, seed=0)
    stale = [n for n, t in [*model.named_parameters(), *model.named_buffers()]
             if t.is_floating_point() and not torch.isfinite(t).all()]
    if stale:
        raise c.fail("contract", f"init_weights() after to_empty() leaves {stale[:5]} uninitialised (NaN); "
                                 "init_weights must set every parameter and buffer")
    again = c.model(seed=0)
    differ = [n for (n, a), b in zip(model.state_dict().items(), again.state_dict().values()) if not torch.equal(a, b)]
    if differ:
        raise c.fail("contract", f"init_weights() is not reproducible from torch.manual_seed: {differ[:5]} differ; "
                                 "draw random numbers only from torch's global generator")


def check_shapes(c: Conformance) -> None:
    """(B, T, D) in gives (B, T, D) out in the input's dtype, finite, for fp32 and bf16, odd T and T = 1."""
    fp32_out = None
    for dtype in (torch.float32, torch.bfloat16):
        mixer = c.mixer(dtype)
        for seqlen in (c.seq_len, 7, 1):
            x = c.inputs(seqlen, dtype)
            with c.checking("shapes", f"forward on {dtype} input of shape {tuple(x.shape)}"), torch.no_grad():
                y = mixer(x)
                y_state, _ = mixer(x, return_state=True)
            for what, out in (("forward", y), ("forward(return_state=True)", y_state)):
                if not isinstance(out, Tensor) or out.shape != x.shape or out.dtype != dtype:
                    got = f"{tuple(out.shape)} {out.dtype}" if isinstance(out, Tensor) else type(out).__name__
                    raise c.fail("shapes", f"{what} maps {tuple(x.shape)} {dtype} to {got}")
                if not torch.isfinite(out).all():
                    raise c.fail("shapes", f"{what} gives non-finite values for {dtype} input, T={seqlen}")
            if not torch.equal(y, y_state):
                raise c.fail("shapes", f"forward output changes with return_state=True ({dtype}, T={seqlen})")
            with c.checking("shapes", f"step on {dtype} input of shape {tuple(x[:, 0].shape)}"), torch.no_grad():
                y_step, _ = mixer.step(x[:, 0], None)
            if not isinstance(y_step, Tensor) or y_step.shape != x[:, 0].shape or y_step.dtype != dtype:
                raise c.fail("shapes", f"step maps {tuple(x[:, 0].shape)} {dtype} to "
                                       f"{tuple(y_step.shape)} {y_step.dtype}")
            if seqlen == c.seq_len:
                if fp32_out is None:
                    fp32_out = y
                elif error_ratio(y, fp32_out) > BF16_TOL:
                    raise c.fail("shapes", f"bf16 forward is far from fp32 forward: {describe_mismatch(y, fp32_out)}")


def check_causality(c: Conformance) -> None:
    """Changing tokens after t leaves outputs at positions <= t unchanged, bit for bit."""
    mixer = c.mixer()
    x = c.inputs()
    with c.checking("causality", "forward"), torch.no_grad():
        y = mixer(x)
        for t in sorted({0, 1, c.seq_len // 2, c.seq_len - 2}):
            x2 = x.clone()
            x2[:, t + 1 :] = c.inputs(seed=100 + t)[:, t + 1 :]
            y2 = mixer(x2)
            same = (y2[:, : t + 1] == y[:, : t + 1]).flatten(2).all(-1).all(0)
            if not same.all():
                first = int((~same).nonzero()[0])
                raise c.fail("causality", f"output at position {first} changed when only inputs after position "
                                          f"{t} changed (max abs diff "
                                          f"{float((y2[:, : t + 1] - y[:, : t + 1]).abs().max()):.2e})")


def check_step(c: Conformance) -> None:
    """Feeding tokens one by one through ``step`` reproduces ``forward``, from scratch and after a prefill."""
    mixer = c.mixer()
    x = c.inputs()
    split = c.seq_len // 2 + 1
    with c.checking("step", "step"), torch.no_grad():
        y = mixer(x)
        for start in (0, split):
            state = None
            if start:
                _, state = mixer(x[:, :start], return_state=True)
            outs = []
            for t in range(start, c.seq_len):
                out, state = mixer.step(x[:, t], state)
                outs.append(out)
            y_step = torch.stack(outs, dim=1)
            if error_ratio(y_step, y[:, start:]) > FP32_TOL:
                how = f"after a forward prefill of {start} tokens" if start else "from state None"
                raise c.fail("step", f"step() {how} disagrees with forward(): "
                                     f"{describe_mismatch(y_step, y[:, start:])} (counted from token {start})")


def _compare_states(c: Conformance, got: Any, want: Any, what: str) -> None:
    got_leaves, got_tree = tree_flatten(got)
    want_leaves, want_tree = tree_flatten(want)
    if got_tree != want_tree:
        raise c.fail("state_split", f"{what}: the state's structure differs ({got_tree} vs {want_tree})")
    for i, (g, w) in enumerate(zip(got_leaves, want_leaves)):
        if isinstance(w, Tensor):
            if not isinstance(g, Tensor) or g.shape != w.shape:
                raise c.fail("state_split", f"{what}: state tensor {i} has shape "
                                            f"{getattr(g, 'shape', None)}, expected {tuple(w.shape)}")
            if error_ratio(g, w) > FP32_TOL:
                raise c.fail("state_split", f"{what}: state tensor {i} differs: {describe_mismatch(g, w)}")


def check_state_split(c: Conformance) -> None:
    """Two forward calls passing the state equal one call, in outputs and final state."""
    mixer = c.mixer()
    x = c.inputs()
    with c.checking("state_split", "forward with state"), torch.no_grad():
        y, final = mixer(x, return_state=True)
        for split in sorted({1, c.seq_len // 2 + 1, c.seq_len - 1}):
            y1, state = mixer(x[:, :split], return_state=True)
            y2, state = mixer(x[:, split:], state, return_state=True)
            y_split = torch.cat([y1, y2], dim=1)
            if error_ratio(y_split, y) > FP32_TOL:
                raise c.fail("state_split", f"splitting the sequence after {split} tokens and passing the state "
                                            f"changes the output: {describe_mismatch(y_split, y)}")
            _compare_states(c, state, final, f"split after {split} tokens")


def check_gradients(c: Conformance) -> None:
    """Every parameter of the LM gets a finite gradient from a language-modelling loss."""
    model = c.model()
    inputs, labels = c.tokens()
    with c.checking("gradients", "forward and backward"):
        c.loss(model, inputs, labels).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    if missing:
        raise c.fail("gradients", f"parameters {missing[:5]} get no gradient; remove them or use them")
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    if bad:
        raise c.fail("gradients", f"non-finite gradients in {bad[:5]}")


def _require_grad(args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(a.detach().requires_grad_() if isinstance(a, Tensor) and a.is_floating_point() else a for a in args)


def _transposed_layout(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """The same values with the last two dims of each tensor stored transposed (as a block's x.transpose views)."""
    return tuple(a.detach().mT.contiguous().mT.requires_grad_(a.requires_grad)
                 if isinstance(a, Tensor) and a.dim() >= 2 else a for a in args)


OPCHECK_CHEAP = ("test_schema", "test_autograd_registration", "test_faketensor")
"""The opcheck tests run on examples after the first; the first also gets ``test_aot_dispatch_dynamic`` (slow)."""


_checked_ops: dict[str, tuple[ScanOp, str | None]] = {}
"""qualname -> (op, what broke or None): an op shared by several mixers is checked once per process."""


class _OpRecorder(TorchDispatchMode):
    """Records the name (``namespace::op``) of every op dispatched while it is active."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.names.add(func._schema.name)
        return func(*args, **(kwargs or {}))


def scan_ops_called(c: Conformance) -> set[str]:
    """The scan ops (any plugin's) that the mixer's forward calls, by qualname."""
    mixer = c.mixer()
    recorder = _OpRecorder()
    with c.checking("ops", "forward, recording the ops it calls"), torch.no_grad(), recorder:
        mixer(c.inputs())
    return recorder.names & scan_op_names()


def check_ops(c: Conformance) -> None:
    """The forward calls no scan op that ``MixerSpec.ops`` leaves out, and each listed op passes gradcheck
    and ``torch.library.opcheck`` on its example inputs in float64, and opcheck's fake-tensor test in
    bfloat16 and float16."""
    unlisted = sorted(scan_ops_called(c) - {op.qualname for op in c.ops})
    if unlisted:
        raise c.fail("ops", f"forward calls the scan ops {unlisted}, which MixerSpec.ops does not list; add them "
                            "to ops=(...) so that they are listed and checked")
    for op in c.ops:
        cached = _checked_ops.get(op.qualname)
        if cached is None or cached[0] is not op:
            try:
                _check_op(c, op)
                cached = (op, None)
            except ConformanceError as e:
                cached = (op, e.detail)
            _checked_ops[op.qualname] = cached
        if cached[1] is not None:
            raise c.fail("ops", cached[1])


LOW_PRECISION = (torch.bfloat16, torch.float16)
"""The dtypes of the examples on which opcheck's fake-tensor test also runs: the fake must give each
output the reference's dtype there too (a float32 state for bf16 inputs, say)."""


def _check_op(c: Conformance, op: ScanOp) -> None:
    if op.example_inputs is None:
        raise c.fail("ops", f"op {op.qualname} has no example inputs to check it on; pass "
                            "example_inputs=... to longhorn_zoo.ops.define_scan_op")
    with c.checking("ops", f"{op.qualname}: example_inputs"):
        examples = list(op.example_inputs(torch.float64, torch.Generator().manual_seed(0)))
    for i, args in enumerate(examples):
        args = _require_grad(tuple(args))
        with c.checking("ops", f"{op.qualname}: gradcheck on example {i}"):
            torch.autograd.gradcheck(op, args, eps=1e-6, atol=1e-5, rtol=1e-3, fast_mode=True)
        with c.checking("ops", f"{op.qualname}: torch.library.opcheck on example {i}"):
            torch.library.opcheck(op.op, args, test_utils=OPCHECK_CHEAP if i else "ALL")
        with c.checking("ops", f"{op.qualname}: opcheck on example {i} with non-contiguous inputs (the fake's "
                               "output strides must match the reference's)"):
            torch.library.opcheck(op.op, _transposed_layout(args), test_utils="test_faketensor")
    for dtype in LOW_PRECISION:
        with c.checking("ops", f"{op.qualname}: example_inputs in {dtype}"):
            examples = list(op.example_inputs(dtype, torch.Generator().manual_seed(0)))
        for i, args in enumerate(examples):
            with c.checking("ops", f"{op.qualname}: opcheck on example {i} in {dtype} (the fake's output dtypes "
                                   "must match the reference's)"):
                torch.library.opcheck(op.op, tuple(args), test_utils="test_faketensor")


def resetting_ops(c: Conformance) -> list[ScanOp]:
    """The mixer's ops that support document boundaries: they take ``initial_state`` and ``reset``."""
    return [op for op in c.ops if {"initial_state", "reset"} <= set(inspect.signature(op.reference).parameters)]


def check_resets(c: Conformance) -> None:
    """An op with a ``reset`` (B, T) argument restarts its state there: the outputs from a reset at r
    equal those of a fresh call on the tokens from r on, and so does the final state.

    Per-token arguments are recognised by their leading (B, T) dims, those of the first tensor argument.
    """
    for op in resetting_ops(c):
        if op.example_inputs is None:
            raise c.fail("resets", f"op {op.qualname} has no example inputs to check it on")
        params = list(inspect.signature(op.reference).parameters)
        args = list(op.example_inputs(torch.float64, torch.Generator().manual_seed(0))[0])
        bsz, seqlen = next(a for a in args if isinstance(a, Tensor)).shape[:2]
        r = seqlen // 2
        reset = torch.zeros(bsz, seqlen, dtype=torch.bool)
        reset[:, r] = True
        args[params.index("reset")] = reset
        tail = [a[:, r:] if isinstance(a, Tensor) and a.shape[:2] == (bsz, seqlen) else a for a in args]
        tail[params.index("reset")] = tail[params.index("initial_state")] = None
        with c.checking("resets", f"{op.qualname} with a reset at token {r}"), torch.no_grad():
            got, want = op(*args), op(*tail)
        for i, (g, w) in enumerate(zip(got, want)):
            g = g[:, r:] if g.shape[:2] == (bsz, seqlen) else g
            if error_ratio(g, w) > FP32_TOL:
                raise c.fail("resets", f"{op.qualname}: output {i} after a reset at token {r} differs from a fresh "
                                       f"start at token {r}: {describe_mismatch(g, w)}")


def check_compile(c: Conformance) -> None:
    """``torch.compile(fullgraph=True)`` of a block runs without graph breaks and matches eager, with gradients;
    for a stack, of a block of each kind (each compiles on its own, as the trainer compiles every block)."""
    args = ModelArgs.from_config(c.config.model, c.seq_len)
    for layer_id, kind in c.kinds():
        with c.checking("compile", "building a block on the meta device"), torch.device("meta"):
            block = Block(kind.spec.build(kind.mixer_args(args, layer_id)), kind.block_args(args))
        _check_compiled_block(c, block, f" (a {kind.spec.name} block)" if c.pattern else "")


def _check_compiled_block(c: Conformance, block: Block, which: str) -> None:
    block.to_empty(device="cpu")
    c.init(block, seed=0)
    x = c.inputs().requires_grad_()
    with c.checking("compile", "the eager block's forward and backward (the reference)"):
        y = block(x)
        y.square().mean().backward()
    want = [x.grad, *(p.grad for p in block.parameters())]
    x.grad = None
    block.zero_grad(set_to_none=True)
    torch._dynamo.reset()  # every mixer compiles Block.forward: start clean, never at the recompile limit
    compiled = torch.compile(block, fullgraph=True, backend=c.compile_backend)
    with c.checking("compile", f"torch.compile(block, fullgraph=True, backend={c.compile_backend!r}){which}"):
        y_c = compiled(x)
        y_c.square().mean().backward()
    if error_ratio(y_c, y) > FP32_TOL:
        raise c.fail("compile", f"compiled block{which} output differs from eager: {describe_mismatch(y_c, y)}")
    names = ["input", *(n for n, _ in block.named_parameters())]
    for name, g_c, g in zip(names, [x.grad, *(p.grad for p in block.parameters())], want):
        if g is not None and (g_c is None or error_ratio(g_c, g) > FP32_TOL):
            detail = "missing" if g_c is None else describe_mismatch(g_c, g)
            raise c.fail("compile", f"gradient of {name}{which} under compile differs from eager: {detail}")


def check_checkpoint(c: Conformance) -> None:
    """Saving the state_dict and loading it into a fresh model gives an identical output."""
    model = c.model(seed=0)
    inputs, _ = c.tokens()
    with c.checking("checkpoint", "the LM's forward before saving"), torch.no_grad():
        want = model(inputs)
    buf = io.BytesIO()
    with c.checking("checkpoint", "torch.save(state_dict)"):
        torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = c.model(seed=1)
    with c.checking("checkpoint", "load_state_dict(strict=True)"):
        fresh.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    with c.checking("checkpoint", "the LM's forward after loading"), torch.no_grad():
        got = fresh(inputs)
    if not torch.equal(got, want):
        hidden = [n for n, b in model.named_buffers() if n not in model.state_dict()]
        hint = f"; non-persistent buffers {hidden[:5]} must be a function of the config only" if hidden else ""
        raise c.fail("checkpoint", f"output after save and load differs: {describe_mismatch(got, want)}{hint}")
