"""The manifest of a complete checkpoint: every file's size and CRC-32, and the check before loading.

The checksums are computed from the bytes as DCP writes them (:class:`ChecksumWriter`
wraps each output stream), in whichever thread writes them, so an async save stays
async and no file is read back. Each rank records its own shards in
``__<rank>_checksums.json``; the coordinator, which writes DCP's ``.metadata`` last,
merges them with the checksum of ``.metadata`` into ``manifest.json``::

    {"step": 200, "files": {"__0_0.distcp": {"bytes": 1234, "crc32": 305419896}, ".metadata": {...}}}

:func:`verify` checks a folder against its manifest: every file present, at its size,
with its CRC-32 (a manifest of an older version, with sizes only, is checked on sizes).
Verifying reads every byte once; ``part`` spreads the files over the ranks.
"""

from __future__ import annotations

import json
import os
import re
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem

MANIFEST = "manifest.json"
_SUMS = "checksums.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_CHUNK = 16 << 20


def step_dirs(folder: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``step-N`` folder (saved complete), newest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return sorted(found, reverse=True)


def file_crc32(path: Path) -> int:
    """The CRC-32 of a file's bytes, read in chunks."""
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


class _HashingStream:
    """A write stream that keeps the CRC-32 and the count of the bytes written through it."""

    def __init__(self, raw: Any) -> None:
        self.raw, self.crc, self.written = raw, 0, 0

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.crc = zlib.crc32(view, self.crc)
        self.written += view.nbytes
        return self.raw.write(data)

    def __getattr__(self, name: str) -> Any:  # tell, flush, fileno, close, ... of the file
        return getattr(self.raw, name)


class _HashingFileSystem(FileSystem):
    """DCP's local file system, recording ``{name: {"bytes", "crc32"}}`` of every file it writes."""

    def __init__(self) -> None:
        super().__init__()
        self.sums: dict[str, dict[str, int]] = {}
        self._lock = threading.Lock()

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Iterator[Any]:
        with super().create_stream(path, mode) as raw:
            if "w" not in mode:
                yield raw
                return
            stream = _HashingStream(raw)
            yield stream
        path = Path(path)
        size = path.stat().st_size
        # The streams are written front to back; should a writer ever seek, hash the file as written.
        crc = stream.crc if stream.written == size else file_crc32(path)
        with self._lock:
            self.sums[path.name] = {"bytes": size, "crc32": crc}


class ChecksumWriter(FileSystemWriter):
    """DCP's ``FileSystemWriter`` that also writes the checkpoint's manifest (see the module docstring).

    Args:
        path: The folder the checkpoint is written to.
        step: The training step, recorded in the manifest.
    """

    def __init__(self, path: str | os.PathLike, step: int) -> None:
        super().__init__(path)
        self.fs = _HashingFileSystem()
        self.step = step

    def write_data(self, plan: Any, planner: Any) -> Any:
        result = super().write_data(plan, planner)  # written by the time it returns (its future is done)
        sums = dict(self.fs.sums)
        (Path(self.path) / f"{plan.storage_data.prefix}{_SUMS}").write_text(json.dumps(sums))
        return result

    def finish(self, metadata: Any, results: Any) -> None:
        super().finish(metadata, results)  # writes .metadata.tmp, then renames it to .metadata
        folder = Path(self.path)
        files = {}
        for part in sorted(folder.glob(f"__*_{_SUMS}")):
            files.update(json.loads(part.read_text()))
            part.unlink()
        files[".metadata"] = self.fs.sums.pop(".metadata.tmp")
        (folder / MANIFEST).write_text(json.dumps({"step": self.step, "files": files}, indent=1))


def verify(path: Path, part: tuple[int, int] = (0, 1)) -> str | None:
    """None if ``path`` holds every file its manifest lists, at the listed size and CRC-32, else what is wrong.

    Args:
        path: A ``step-N`` folder.
        part: ``(i, n)``: compute the checksums of every n-th file from the i-th only (the sizes of all
            are checked), so that n ranks share the reading.
    """
    manifest = path / MANIFEST
    if not manifest.is_file():
        return f"no {MANIFEST} (not written by a finished save)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError) as e:
        return f"unreadable {MANIFEST}: {e}"
    for i, (name, entry) in enumerate(sorted(files.items())):
        f = path / name
        want = entry if isinstance(entry, int) else entry["bytes"]  # older manifests: sizes only
        if not f.is_file():
            return f"missing file {name}"
        if f.stat().st_size != want:
            return f"file {name} has {f.stat().st_size} bytes, the manifest says {want}"
        if isinstance(entry, dict) and i % part[1] == part[0] and (crc := file_crc32(f)) != entry["crc32"]:
            return (f"file {name} has CRC-32 {crc:08x}, the manifest says {entry['crc32']:08x} (its bytes changed "
                    "after the save)")
    return None
