"""Scan ops: ``torch.library`` custom ops built from a reference function.

A plugin writes its recurrence once, as a plain PyTorch *reference* function with
type annotations (``Tensor``, ``Tensor | None``, ``float``, ``int``, ``bool``) that
returns a tuple of fresh tensors. :func:`define_scan_op` turns it into a custom op
that

* runs the reference on every device where no fast backend is selected (CPU and CUDA
  backends dispatch through it);
* has autograd: the backward pass is the vector-Jacobian product of the reference
  (``torch.func.vjp``), unless a fast backend supplies its own backward;
* has a fake (meta) implementation, so ``torch.compile(fullgraph=True)`` treats
  the op as one opaque node with no graph break;
* can take fast backends later (:meth:`ScanOp.register_backend`), for example a
  CUDA extension or Triton kernels, without changing any caller; a backend may
  keep one tensor of its own from its forward for its backward (a *residual*);
* carries tiny example inputs (``example_inputs``) on which the conformance suite
  (:mod:`longhorn_zoo.conformance`) runs gradcheck and ``torch.library.opcheck``.

Which backend runs is chosen per call from the device of the first tensor
argument and the process-wide preference set by :func:`set_backend_preference`
(``"auto"`` picks the first available fast backend for that device).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "Backend",
    "ExampleInputs",
    "ScanOp",
    "define_scan_op",
    "set_backend_preference",
    "get_backend_preference",
    "scan_op_names",
    "REFERENCE",
]

REFERENCE = "reference"
_SCAN_OP_NAMES: set[str] = set()
"""The qualname of every scan op defined in this process; see :func:`scan_op_names`."""
BackwardFn = Callable[[tuple[Any, ...], tuple[Tensor, ...], tuple[Tensor | None, ...]], tuple[Tensor | None, ...]]
_preference: str = "auto"

ExampleInputs = Callable[[torch.dtype, torch.Generator], Sequence[tuple[Any, ...]]]
"""``example_inputs(dtype, generator) -> [args, ...]``: argument tuples for a scan op.

Each tuple is one call of the op on CPU, with floating-point tensors of ``dtype``
drawn from ``generator``. Keep them tiny (gradcheck runs in float64 on each) and
cover the optional arguments: one call with them None and one with them given.
"""


def set_backend_preference(name: str) -> None:
    """Choose which backend scan ops use: ``"auto"``, ``"reference"`` or a backend name.

    ``"auto"`` uses the first available fast backend registered for the input's
    device and falls back to the reference. A named backend that is unavailable
    for a call's device also falls back to the reference.
    """
    global _preference
    _preference = name


def get_backend_preference() -> str:
    """Return the backend preference set by :func:`set_backend_preference`."""
    return _preference


def scan_op_names() -> frozenset[str]:
    """The qualnames of every scan op defined so far in this process (by any plugin)."""
    return frozenset(_SCAN_OP_NAMES)


@dataclass(frozen=True)
class Backend:
    """A fast implementation of a scan op for one device type.

    Attributes:
        name: Short name shown by ``python -m longhorn_zoo.registry``, e.g. ``"cuda"``
            or ``"triton"``.
        device_type: The device type it runs on, e.g. ``"cuda"``.
        is_available: Returns True when the backend can run in this process
            (its compiler, extension or GPU is present). Called lazily and may
            be slow the first time (a JIT build); cache the answer.
        forward: Same signature and outputs as the op's reference function.
        backward: ``backward(inputs, outputs, grad_outputs) -> grads``, where
            ``inputs`` are the op's arguments in order, ``outputs`` its results
            and ``grads`` one entry per argument (None where not differentiable).
            It must itself be traceable by ``torch.compile`` (call a custom op).
            If None, the reference's VJP is used for the backward pass.
        residual: Optional. ``residual(*args) -> Tensor``: an empty tensor of the
            shape, dtype and device of one extra tensor that ``forward`` computes
            for ``backward`` (say, states it would otherwise recompute); it must
            work on fake tensors (it serves the op's fake). With it, ``forward``
            returns the op's outputs followed by that tensor, and ``backward``
            gets it after the outputs: ``outputs[-1]``. It is empty (no elements)
            when the forward that ran was not this backend's.
    """

    name: str
    device_type: str
    is_available: Callable[[], bool]
    forward: Callable[..., tuple[Tensor, ...]]
    backward: BackwardFn | None = None
    residual: Callable[..., Tensor] | None = None


def _with_residual(schema: str) -> str:
    """The schema with one more Tensor result, the backend's residual."""
    args, returns = schema.rsplit(" -> ", 1)
    while returns.startswith("(") and returns.endswith(")"):  # "(Tensor, Tensor)"; a 1-tuple is "((Tensor))"
        returns = returns[1:-1]
    return f"{args} -> ({returns}, Tensor)"


class ScanOp:
    """A scan op: a custom op, its reference function and its fast backends.

    Call it like the reference function. Create it with :func:`define_scan_op`.

    The custom op itself (``self.op``) returns the reference's results plus one
    tensor: the selected backend's residual (see :class:`Backend`), empty when
    that backend keeps none or the reference ran. Calling the ScanOp drops it.
    """

    def __init__(
        self,
        qualname: str,
        reference: Callable[..., tuple[Tensor, ...]],
        fake: Callable[..., tuple[Tensor, ...]],
        example_inputs: ExampleInputs | None = None,
    ) -> None:
        self.qualname = qualname
        self.reference = reference
        self.example_inputs = example_inputs
        self.backends: list[Backend] = []
        self._params = list(inspect.signature(reference).parameters)
        schema = _with_residual(torch.library.infer_schema(reference, mutates_args=()))

        def fake_and_residual(*args: Any, **kwargs: Any) -> tuple[Tensor, ...]:
            backend = self.select_backend(self._device_type(args))
            if backend is not None and backend.residual is not None:
                return (*fake(*args, **kwargs), backend.residual(*args, **kwargs))
            return (*fake(*args, **kwargs), _no_residual(args))

        # One implementation for every device: the selected backend, else the reference.
        self.op = torch.library.custom_op(qualname, self._dispatch, mutates_args=(), schema=schema)
        self.op.register_fake(fake_and_residual)
        self.op.register_autograd(self._backward, setup_context=self._setup_context)
        _SCAN_OP_NAMES.add(qualname)

    def __call__(self, *args: Any, **kwargs: Any) -> tuple[Tensor, ...]:
        return self.op(*args, **kwargs)[:-1]

    def __repr__(self) -> str:
        return f"ScanOp({self.qualname}, backends={self.available_backends()})"

    def register_backend(self, backend: Backend) -> None:
        """Add a fast backend. Backends registered first are preferred by ``"auto"``."""
        if any(b.name == backend.name and b.device_type == backend.device_type for b in self.backends):
            raise ValueError(f"{self.qualname}: backend {backend.name!r} for {backend.device_type} "
                             "is already registered")
        self.backends.append(backend)

    def available_backends(self) -> list[str]:
        """Names of the backends that can run here, the CPU reference first."""
        names = ["cpu-reference"]
        for b in self.backends:
            try:
                ok = b.is_available()
            except Exception:  # a broken toolchain means "not available", never a crash
                ok = False
            if ok:
                names.append(b.name)
        return names

    def select_backend(self, device_type: str) -> Backend | None:
        """The fast backend that a call on ``device_type`` would use, or None for the reference."""
        if _preference == REFERENCE:
            return None
        for b in self.backends:
            if b.device_type != device_type:
                continue
            if _preference not in ("auto", b.name):
                continue
            if b.is_available():
                return b
        return None

    def _device_type(self, args: Sequence[Any]) -> str:
        for a in args:
            if isinstance(a, Tensor):
                return a.device.type
        return "cpu"

    def _dispatch(self, *args: Any) -> tuple[Tensor, ...]:
        backend = self.select_backend(self._device_type(args))
        if backend is None:
            return (*self.reference(*args), _no_residual(args))
        if backend.residual is None:
            return (*backend.forward(*args), _no_residual(args))
        return tuple(backend.forward(*args))

    def _setup_context(self, ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        tensor_idx = [i for i, a in enumerate(inputs) if isinstance(a, Tensor)]
        ctx.tensor_idx = tensor_idx
        ctx.inputs_template = [None if isinstance(a, Tensor) else a for a in inputs]
        ctx.save_for_backward(*[inputs[i] for i in tensor_idx], *output)
        ctx.n_outputs = len(output)

    def _backward(self, ctx: Any, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
        saved = ctx.saved_tensors
        n_in = len(ctx.tensor_idx)
        inputs = list(ctx.inputs_template)
        for j, i in enumerate(ctx.tensor_idx):
            inputs[i] = saved[j]
        outputs = tuple(saved[n_in:])  # the results, then the residual
        grads = grads[:-1]  # the residual's (None: nothing outside the op sees it)
        backend = self.select_backend(self._device_type(inputs))
        if backend is not None and backend.backward is not None:
            return tuple(backend.backward(tuple(inputs), outputs if backend.residual else outputs[:-1], grads))
        return self._reference_vjp(inputs, outputs[:-1], grads)

    def _reference_vjp(
        self, inputs: list[Any], outputs: tuple[Tensor, ...], grads: tuple[Tensor | None, ...]
    ) -> tuple[Tensor | None, ...]:
        diff = [i for i, a in enumerate(inputs) if isinstance(a, Tensor) and a.is_floating_point()]

        def fn(*primals: Tensor) -> tuple[Tensor, ...]:
            full = list(inputs)
            for i, p in zip(diff, primals):
                full[i] = p
            return self.reference(*full)

        _, vjp = torch.func.vjp(fn, *[inputs[i] for i in diff])
        cotangents = tuple(torch.zeros_like(o) if g is None else g for g, o in zip(grads, outputs))
        diff_grads = vjp(cotangents)
        result: list[Tensor | None] = [None] * len(inputs)
        for i, g in zip(diff, diff_grads):
            result[i] = g
        return tuple(result)


def _no_residual(args: Sequence[Any]) -> Tensor:
    """The residual of a forward that keeps none: an empty float32 tensor on the inputs' device."""
    device = next((a.device for a in args if isinstance(a, Tensor)), torch.device("cpu"))
    return torch.empty(0, dtype=torch.float32, device=device)


def define_scan_op(
    qualname: str,
    reference: Callable[..., tuple[Tensor, ...]],
    fake: Callable[..., tuple[Tensor, ...]],
    *,
    example_inputs: ExampleInputs | None = None,
) -> ScanOp:
    """Register ``reference`` as the custom op ``qualname`` and return its :class:`ScanOp`.

    Args:
        qualname: ``"namespace::name"``, e.g. ``"longhorn_zoo::longhorn_scan"``.
            Use your distribution's name as the namespace to avoid clashes.
        reference: The readable implementation. Annotated arguments; returns a
            tuple of new tensors (never views of its inputs). It must be written
            with out-of-place PyTorch ops so that ``torch.func.vjp`` can
            differentiate it; it runs on any device.
        fake: Same signature; returns empty tensors of the outputs' shapes and
            dtypes (``torch.empty`` / ``new_empty``), used under ``torch.compile``.
        example_inputs: Optional :data:`ExampleInputs`, tiny argument tuples for
            the conformance suite's gradcheck and opcheck; the suite fails an op
            that has none, since it cannot check it.

    Returns:
        The op, callable like ``reference``.
    """
    return ScanOp(qualname, reference, fake, example_inputs)
