"""``python -m longhorn_zoo.conformance [NAME ...] [PYTEST OPTIONS]``: run the conformance suite.

With no names it checks every installed mixer. Options after the names go to
pytest, e.g. ``-q``, ``-x`` or ``-m "not conformance_distributed"`` (the 2-rank check)
and ``-m "not conformance_compile"`` (the torch.compile check). The suite runs on
pytest: ``pip install 'longhorn-zoo[conformance]'``.
"""

from __future__ import annotations

import sys

MISSING_PYTEST = ("the conformance suite runs on pytest, which is not installed here: "
                  "pip install 'longhorn-zoo[conformance]' (or pip install pytest)")


def main(argv: list[str] | None = None) -> int:
    """Run the suite on the named mixers (all when none); returns pytest's exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__.strip().replace("``", ""))
        return 0
    try:
        import pytest
    except ImportError:
        print(f"error: {MISSING_PYTEST}", file=sys.stderr)
        return 1
    from longhorn_zoo.conformance.pytest_plugin import SUITE

    names = []
    while argv and not argv[0].startswith("-"):
        names.append(argv.pop(0))
    # trainer is imported before pytest starts, so pytest cannot rewrite its asserts; the suite raises its own errors
    quiet = ["-W", "ignore::pytest.PytestAssertRewriteWarning"]
    return int(pytest.main([str(SUITE), *(f"--mixer={n}" for n in names), *quiet, *argv]))


if __name__ == "__main__":
    sys.exit(main())
