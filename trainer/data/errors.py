"""Errors of the data path. Each message names what is wrong and how to fix it."""

from __future__ import annotations

import os
import socket

OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


class DataError(ValueError):
    """Bad data input: a missing path, an empty file, a wrong text field, a corrupt shard."""


class DataUnavailableError(DataError):
    """A hub dataset or tokenizer file that is not cached while the network is unreachable."""


def offline(host: str) -> bool:
    """True if an offline variable is set, or ``host`` cannot be reached within 3 s (no proxy set)."""
    if any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on") for v in OFFLINE_VARS):
        return True
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return False
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError:
        return True
    return False
