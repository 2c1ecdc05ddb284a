"""The shipped TOML configs, installed as package data so that a config can be named without a checkout.

``longhorn-zoo train debug_longhorn`` and ``python -m longhorn_zoo.train debug_longhorn`` read
``debug_longhorn.toml`` from this package, wherever it is installed; a path to any TOML file
works as well (:func:`resolve`).
"""

from __future__ import annotations

import difflib
import importlib.resources
from pathlib import Path


def names() -> list[str]:
    """The names of the shipped configs (file names without ``.toml``), sorted."""
    folder = importlib.resources.files(__name__)
    return sorted(p.name[: -len(".toml")] for p in folder.iterdir() if p.name.endswith(".toml"))


def path_of(name: str) -> Path:
    """The file of the shipped config ``name``.

    Raises:
        FileNotFoundError: no shipped config has that name; the message lists the close ones.
    """
    path = Path(str(importlib.resources.files(__name__).joinpath(f"{name}.toml")))
    if not path.is_file():
        close = difflib.get_close_matches(name, names(), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else f" Shipped configs: {', '.join(names())}."
        raise FileNotFoundError(f"no config file {name!r} and no shipped config named {name!r}.{hint}")
    return path


def resolve(arg: str | Path) -> Path:
    """A config argument as a file: an existing path as given, else the shipped config of that name.

    ``debug_longhorn``, ``debug_longhorn.toml`` and ``train_configs/debug_longhorn.toml`` name the
    shipped file when no such file exists from the working directory.

    Raises:
        FileNotFoundError: neither a file nor a shipped config.
    """
    path = Path(arg)
    if path.is_file():
        return path
    if path.suffix not in ("", ".toml") or (path.parent != Path(".") and path.parent.name != "train_configs"):
        raise FileNotFoundError(f"config file {path} does not exist")
    return path_of(path.stem if path.suffix == ".toml" else path.name)
