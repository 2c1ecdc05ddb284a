"""The document-boundary check: with ``reset``, a document's outputs ignore the documents before it.

Packed rows hold several documents; the loaders mark each start with ``reset`` and
the trainer passes it to every mixer when ``data.document_boundaries`` is on (see
:mod:`longhorn_zoo.hookspecs`). Row 0 of the check holds two documents, row 1 three.
"""

from __future__ import annotations

import torch
from torch import Tensor

from longhorn_zoo.conformance.harness import FP32_TOL, Conformance, describe_mismatch, error_ratio


def _starts(c: Conformance) -> tuple[Tensor, list[int]]:
    """The check's ``reset`` (2, T) and each row's last document start."""
    t = c.seq_len
    reset = torch.zeros(c.batch, t, dtype=torch.bool)
    last = [t // 3, t // 2 + 1]
    reset[0, last[0]] = reset[1, 3] = reset[1, last[1]] = True
    return reset, last


def _compare(c: Conformance, got: Tensor, want: Tensor, what: str) -> None:
    if error_ratio(got, want) > FP32_TOL:
        raise c.fail("documents", f"{what}: {describe_mismatch(got, want)}")


def check_documents(c: Conformance) -> None:
    """With document starts in ``reset``: a document's outputs do not change with the documents before it
    or with the state passed in, equal those of the document alone, and the state returned continues it."""
    mixer = c.mixer()
    x = c.inputs()
    reset, last = _starts(c)
    hint = "; forward must take reset=None, a (B, T) bool of document starts (docs/plugins.md)"
    with c.checking("documents", f"forward(x, reset=...){hint}"), torch.no_grad():
        y = mixer(x, reset=reset)
        plain = mixer(x, reset=torch.zeros_like(reset))
        other = x.clone()
        for b, start in enumerate(last):
            other[b, :start] = c.inputs(seed=7)[b, :start]
        y_other = mixer(other, reset=reset)
        alone = [mixer(x[b : b + 1, start:]) for b, start in enumerate(last)]
    _compare(c, plain, mixer(x), "forward with reset all False differs from reset=None")
    for b, start in enumerate(last):
        _compare(c, y_other[b, start:], y[b, start:],
                 f"row {b}: the outputs from a document start at token {start} change when only earlier tokens do")
        _compare(c, y[b, start:], alone[b][0], f"row {b}: the document from token {start} gives other outputs "
                                               "in the packed row than alone")

    split = c.seq_len // 2 + 3
    with c.checking("documents", "forward with a state and reset"), torch.no_grad():
        _, state = mixer(c.inputs(seed=8), return_state=True)
        first = torch.zeros_like(reset)
        first[:, 0] = True
        fresh = mixer(x, state, reset=first)
        y1, state = mixer(x[:, :split], return_state=True, reset=reset[:, :split])
        y2 = mixer(x[:, split:], state, reset=reset[:, split:])
    _compare(c, fresh, mixer(x), "a reset at token 0 does not discard the state passed in")
    _compare(c, torch.cat([y1, y2], dim=1), y, f"splitting the packed rows after {split} tokens and passing the "
                                               "state changes the output")
