"""``python -m longhorn_zoo.conformance [NAME ...] [PYTEST OPTIONS]``: run the conformance suite.

With no names it checks every installed mixer. Options after the names go to
pytest, e.g. ``-m "not conformance_distributed"`` or ``-x``.
"""

from __future__ import annotations

import sys

import pytest

from longhorn_zoo.conformance.pytest_plugin import SUITE


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    names = []
    while argv and not argv[0].startswith("-"):
        names.append(argv.pop(0))
    # trainer is imported before pytest starts, so pytest cannot rewrite its asserts; the suite raises its own errors
    quiet = ["-W", "ignore::pytest.PytestAssertRewriteWarning"]
    return int(pytest.main([str(SUITE), *(f"--mixer={n}" for n in names), *quiet, *argv]))


if __name__ == "__main__":
    sys.exit(main())
