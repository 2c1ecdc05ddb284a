"""Discovery of mixer plugins through the ``longhorn_zoo.mixers`` entry points.

Every installed plugin, built-in or not, is loaded one entry point at a time and
registered with pluggy, so a plugin that fails to import, raises in its hook or
returns an invalid spec is reported by name and distribution while the other
mixers stay usable. Two plugins that register the same mixer name (a third-party
``llama`` next to the built-in one, say) make that name an error naming both
distributions.

``python -m longhorn_zoo.registry`` lists the installed mixers.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import importlib.metadata
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pluggy

from longhorn_zoo import hookspecs
from longhorn_zoo.hookspecs import ENTRY_POINT_GROUP, PROJECT, MixerSpec
from longhorn_zoo.ops import ScanOp
from longhorn_zoo.tomlcompat import tomllib


class PluginError(Exception):
    """A plugin is broken, or a mixer name is unknown or registered twice."""


@dataclass(frozen=True)
class Source:
    """Where a mixer comes from: the entry point and its distribution."""

    entry_point: str
    dist: str
    version: str

    def __str__(self) -> str:
        return f"plugin {self.entry_point!r} from {self.dist} {self.version}"


@dataclass(frozen=True)
class MixerEntry:
    """A validated mixer spec and the plugin that registered it."""

    spec: MixerSpec
    source: Source


@dataclass
class Registry:
    """All mixers found, plus the problems met while finding them."""

    mixers: dict[str, MixerEntry] = field(default_factory=dict)
    duplicates: dict[str, list[Source]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def names(self) -> list[str]:
        return sorted(self.mixers)

    def get(self, name: str) -> MixerEntry:
        """The mixer called ``name``; raises :class:`PluginError` with the valid choices."""
        if name in self.duplicates:
            who = "; ".join(str(s) for s in self.duplicates[name])
            raise PluginError(
                f"mixer {name!r} is registered by more than one plugin ({who}); uninstall one of them"
            )
        if name in self.mixers:
            return self.mixers[name]
        msg = f"unknown mixer {name!r}; installed mixers: {', '.join(self.names()) or '(none)'}"
        close = difflib.get_close_matches(name, self.names(), n=1)
        if close:
            msg += f". Did you mean {close[0]!r}?"
        if self.errors:
            msg += "\nSome plugins failed to load:\n  " + "\n  ".join(self.errors)
        raise PluginError(msg)


def validate_spec(spec: object) -> MixerSpec:
    """Check that a hook result is a usable :class:`MixerSpec`; raise ``PluginError`` if not."""
    if not isinstance(spec, MixerSpec):
        raise PluginError(f"returned {type(spec).__name__}, expected longhorn_zoo.hookspecs.MixerSpec")
    if not isinstance(spec.name, str) or not spec.name.isidentifier():
        raise PluginError(f"mixer name {spec.name!r} must be a Python-identifier-like string")
    if not callable(spec.build):
        raise PluginError(f"mixer {spec.name!r}: build is not callable")
    path = Path(spec.defaults)
    if not path.is_file():
        raise PluginError(f"mixer {spec.name!r}: defaults file {path} does not exist")
    try:
        with path.open("rb") as f:
            table = tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise PluginError(f"mixer {spec.name!r}: defaults file {path} is not valid TOML: {e}") from e
    if not isinstance(table.get("mixer", {}), dict):
        raise PluginError(f"mixer {spec.name!r}: [mixer] in {path} must be a table")
    from longhorn_zoo.config import option_checks  # config imports the registry lazily too

    try:
        option_checks(table.get("valid", {}), table.get("mixer", {}))
    except ValueError as e:
        raise PluginError(f"mixer {spec.name!r}: {path}: {e}") from None
    for op in spec.ops:
        if not isinstance(op, ScanOp):
            raise PluginError(f"mixer {spec.name!r}: ops must be longhorn_zoo.ops.ScanOp, got {type(op).__name__}")
    return spec


def build_registry(group: str = ENTRY_POINT_GROUP) -> Registry:
    """Load every plugin of ``group`` and collect its mixers."""
    registry = Registry()
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    eps = sorted(importlib.metadata.entry_points(group=group), key=lambda e: (e.name, e.value))
    seen: dict[str, Source] = {}
    for ep in eps:
        dist = ep.dist
        source = Source(ep.name, dist.name, dist.version) if dist else Source(ep.name, "an unknown distribution", "")
        where = f"plugin {ep.name!r} ({ep.value}) from {source.dist} {source.version}".rstrip()
        # Loaded and registered one by one, under a name unique to the distribution: pluggy's
        # load_setuptools_entrypoints skips an entry point whose name is already taken, so a
        # third-party plugin named like a built-in one would be dropped without a word.
        try:
            plugin = ep.load()
        except Exception as e:  # any import-time failure of a third-party plugin
            registry.errors.append(f"{where} failed to import: {type(e).__name__}: {e}")
            continue
        try:
            pm.register(plugin, name=f"{source.dist}:{ep.name}")
        except (ValueError, pluggy.PluginValidationError) as e:  # one module behind two entry points, a bad hook
            registry.errors.append(f"{where} cannot be registered: {e}")
            continue
        impl = getattr(plugin, "longhorn_zoo_mixers", None)
        if impl is None:
            registry.errors.append(f"{where} implements no longhorn_zoo_mixers hook")
            continue
        try:
            specs = impl()
            if not isinstance(specs, list | tuple):
                raise PluginError(f"returned {type(specs).__name__}, expected a list of MixerSpec")
            specs = [validate_spec(s) for s in specs]
        except Exception as e:
            registry.errors.append(f"{where} returned an invalid spec: {type(e).__name__}: {e}")
            continue
        for spec in specs:
            if spec.name in seen:
                registry.duplicates.setdefault(spec.name, [seen[spec.name]]).append(source)
                registry.mixers.pop(spec.name, None)
                registry.errors.append(f"mixer {spec.name!r} registered twice: by {seen[spec.name]} and by {source}")
                continue
            seen[spec.name] = source
            registry.mixers[spec.name] = MixerEntry(spec, source)
    return registry


@functools.cache
def get_registry() -> Registry:
    """The process-wide registry, built on first use."""
    return build_registry()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m longhorn_zoo.registry",
        description="List the installed longhorn-zoo mixer plugins and the op backends available here.",
    )
    parser.parse_args(argv)
    reg = get_registry()
    rows = []
    for name in reg.names():
        e = reg.mixers[name]
        backends: list[str] = []
        for op in e.spec.ops:
            for b in op.available_backends():
                if b not in backends:
                    backends.append(b)
        rows.append((name, f"{e.source.dist} {e.source.version}", ", ".join(backends) or "-"))
    header = ("mixer", "distribution", "op backends")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    for r in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    for err in reg.errors:
        print(f"error: {err}", file=sys.stderr)
    return 1 if reg.errors else 0


if __name__ == "__main__":
    sys.exit(main())
