"""Shared code of the selective-scan family (Longhorn, Mamba): the diagonal scan and the block.

This package is a library used by the ``longhorn`` and ``mamba`` plugins; it is not a
mixer and registers nothing itself.
"""
