"""What the checkpoint checksums cost: writing with and without them, and verifying, on a 1.3B-sized state.

Usage: ``python benchmarks/checkpoint_checksum.py [--params 1.3e9] [--folder /fast/disk] [--repeats 2]``.

The state dict is what a checkpoint of a model with ``--params`` fp32 parameters holds:
the weights and AdamW's two moments (3 x 4 bytes per parameter, 15.6 GB for 1.3B),
as CPU tensors in chunks of 64M elements, as DCP's writer gets them after staging.
It is saved with DCP's plain ``FileSystemWriter`` and with the trainer's
:class:`~longhorn_zoo.manifest.ChecksumWriter` (the same writer, CRC-32 computed as the
bytes pass), alternately, ``--repeats`` times; then :func:`~longhorn_zoo.manifest.verify`
reads the checkpoint back twice: from the page cache, and cold (each file's pages
dropped with ``posix_fadvise``). Last, ``zlib.crc32`` alone on a 1 GiB buffer in memory.
The folder needs room for two checkpoints (about 2 x 15.6 GB for 1.3B).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
import warnings
import zlib
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from longhorn_zoo.manifest import ChecksumWriter, verify

CHUNK = 64 << 20  # elements per tensor
warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # one process, on purpose


def state_of(params: int) -> dict[str, dict[str, torch.Tensor]]:
    """Weights and two AdamW moments of ``params`` fp32 parameters, random, in tensors of CHUNK elements."""
    sizes = [CHUNK] * (params // CHUNK) + ([params % CHUNK] if params % CHUNK else [])
    gen = torch.Generator().manual_seed(0)
    return {part: {f"t{i}": torch.rand(n, generator=gen) for i, n in enumerate(sizes)}
            for part in ("model", "exp_avg", "exp_avg_sq")}


def drop_cache(folder: Path) -> None:
    """Evict ``folder``'s files from the page cache (their pages are clean after the save's fsync)."""
    for f in folder.iterdir():
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--params", type=float, default=1.3e9, help="fp32 parameters (default 1.3e9)")
    p.add_argument("--folder", default=None, help="where to write (default: the temporary folder)")
    p.add_argument("--repeats", type=int, default=2, help="saves with each writer")
    a = p.parse_args(argv)
    state = state_of(int(a.params))
    gb = sum(t.numel() * 4 for part in state.values() for t in part.values()) / 1e9
    print(f"state: {int(a.params):,} parameters, weights and 2 AdamW moments = {gb:.2f} GB")
    with tempfile.TemporaryDirectory(dir=a.folder) as tmp:
        root = Path(tmp)
        plain, checked = [], []
        for r in range(a.repeats):
            for name, times, make in (("plain", plain, dcp.FileSystemWriter),
                                      ("checksum", checked, lambda path, r=r: ChecksumWriter(path, step=r))):
                folder = root / name
                shutil.rmtree(folder, ignore_errors=True)
                times.append(timed(lambda f=folder, m=make: dcp.save(state, storage_writer=m(f), checkpoint_id=f,
                                                                     no_dist=True)))
        folder = root / "checksum"
        assert verify(folder) is None
        warm = timed(lambda: verify(folder))
        drop_cache(folder)
        cold = timed(lambda: verify(folder))
    buf = torch.rand(min(1 << 28, int(gb * 1e9) // 4)).numpy().tobytes()  # 1 GiB, or the state's size if smaller
    crc = timed(lambda: zlib.crc32(buf)) / (len(buf) / 1e9)
    rows = [("save, DCP FileSystemWriter", min(plain)), ("save, ChecksumWriter (CRC-32 as written)", min(checked)),
            ("verify, from the page cache", warm), ("verify, cold (pages dropped)", cold)]
    print(f"{'what':45s} {'seconds':>8s} {'GB/s':>6s}")
    for what, seconds in rows:
        print(f"{what:45s} {seconds:8.2f} {gb / seconds:6.2f}")
    print(f"{'zlib.crc32 in memory, per GB':45s} {crc:8.3f} {1 / crc:6.2f}")
    print(f"checksum overhead on the save: {min(checked) - min(plain):+.2f} s "
          f"({100 * (min(checked) / min(plain) - 1):+.1f}%), best of {a.repeats}")


if __name__ == "__main__":
    main()
