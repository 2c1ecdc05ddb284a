"""Running a module's Triton kernels in Triton's interpreter on CPU, for tests on machines without a GPU.

The interpreter is chosen when a kernel is decorated, so :func:`import_interpreted` imports the kernel
module with ``TRITON_INTERPRET=1`` set just for that import (only without CUDA, and only if nothing
imported it before); a test then asks :func:`is_interpreted` and uses the :func:`use_interpreter` patch.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import pytest
import torch


def import_interpreted(module: str) -> None:
    """Import ``module`` (a kernels module) under the interpreter when there is no CUDA and Triton is installed."""
    if torch.cuda.is_available() or importlib.util.find_spec("triton") is None or module in sys.modules:
        return
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        importlib.import_module(module)
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved


def is_interpreted(module: str, kernel: str) -> bool:
    """True when ``module`` is imported and its kernel ``kernel`` runs in the interpreter."""
    if module not in sys.modules:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(getattr(sys.modules[module], kernel), InterpretedFunction)


def use_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Set ``TRITON_INTERPRET`` for the launches, and make triton 3.6's interpreter work with numpy >= 2.4
    (``int()`` of a 1-element array)."""
    import triton.runtime.interpreter as interp

    original = interp._patch_lang_tensor

    def patch(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    monkeypatch.setattr(interp, "_patch_lang_tensor", patch)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # Triton consults it again when launching
