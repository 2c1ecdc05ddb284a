"""CUDA backend of the selective scans (Longhorn, Mamba-1): JIT build, backends, backward ops.

The kernels live in ``csrc/`` (one templated code path for both scans, see
``csrc/selective_scan.cuh``), installed as the package ``longhorn_zoo.csrc`` and read from
there wherever the package is installed; an installation without them is an error
(:class:`MissingSourcesError`), never a silent fallback. They are built on first use with
``torch.utils.cpp_extension.load`` (ninja) for the arch of the current GPU and cached under
``$LONGHORN_ZOO_BUILD_DIR`` (default ``~/.cache/longhorn_zoo/torch_extensions``), keyed by a
hash of the sources, the torch version and the arch. Without a GPU or nvcc, the backends
report themselves unavailable and the ops run their reference.

Each scan's ``ops.py`` registers its backend (:func:`longhorn_backend`, :func:`mamba_backend`). Ahead-of-time
build on a GPU machine: ``python -m longhorn_zoo.plugins.selective_scan.cuda --build``.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib.resources
import math
import os
import shutil
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from longhorn_zoo.ops import Backend, ScanOp

__all__ = ["load_extension", "is_available", "longhorn_backend", "mamba_backend", "chunk_lengths", "fwd_lanes",
           "TUNING", "MissingSourcesError", "source_files"]


def _csrc() -> Path:
    """The installed ``longhorn_zoo/csrc`` folder (where it should be, if the package lacks it)."""
    try:
        return Path(str(importlib.resources.files("longhorn_zoo.csrc")))
    except ModuleNotFoundError:
        return Path(str(importlib.resources.files("longhorn_zoo"))) / "csrc"


CSRC = _csrc()
SOURCES = ("binding.cpp", "combine.cu", "longhorn_fwd.cu", "longhorn_bwd.cu", "mamba_fwd.cu", "mamba_bwd.cu")
HEADERS = ("scan_params.h", "selective_scan.cuh")
LONGHORN, MAMBA = 0, 1
STATE_SIZE, TILE = 16, 16  # kStateSize and kTile in csrc/scan_params.h

# Launch shape. fwd_lanes: threads sharing one channel's 16 states in the forward (2 or 4; 0 picks
# per call: 2, whose blocks hold 64 channels, where those blocks fill the GPU in one chunk, as at
# B x C = 8 x 4096, where it measured 12% faster; else 4, which keeps B x C = 4 x 4096 in one chunk).
# fwd_blocks_per_sm / bwd_blocks_per_sm: time is split into chunks until about this many
# 128-thread blocks per SM exist (more chunks = more parallelism, one more pass per chunk).
# fwd_blocks_per_sm 4 keeps one chunk at B x C = 4 x 4096 and splits B = 1 into 4 (sweep in docs/benchmarks.md);
# bwd_blocks_per_sm 4 is the backward's launch bounds: one chunk at B x C = 8 x 4096, two at 4 x 4096 (its
# blocks hold 64 channels). entry_states 1: where the backward runs in chunks, the forward saves the state
# entering each (the op's residual), so the backward needs no summary pass; 0: it runs one.
TUNING: dict[str, float] = {"fwd_lanes": 0, "fwd_blocks_per_sm": 4.0, "bwd_blocks_per_sm": 4.0, "entry_states": 1}


class MissingSourcesError(RuntimeError):
    """The CUDA sources are not in the installed package, so the kernels cannot be built."""


def source_files() -> list[Path]:
    """The CUDA sources and headers the JIT build reads, from the installed package.

    Raises:
        MissingSourcesError: some are missing; the message names them and the fix.
    """
    files = [CSRC / name for name in SOURCES + HEADERS]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise MissingSourcesError(
            f"the selective-scan CUDA sources {', '.join(missing)} are missing from {CSRC}, so the CUDA kernels "
            "cannot be built: this longhorn-zoo was built without its csrc package data. Reinstall it from a "
            "complete wheel or sdist (pip install --force-reinstall longhorn-zoo), or train on the reference "
            "scan, about 1,000x slower, with --model.op_backend reference")
    return files


def _build_dir(tag: str) -> Path:
    root = os.environ.get("LONGHORN_ZOO_BUILD_DIR") or Path.home() / ".cache" / "longhorn_zoo" / "torch_extensions"
    path = Path(root) / tag
    path.mkdir(parents=True, exist_ok=True)
    return path


def _source_hash() -> str:
    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        h.update((CSRC / name).read_bytes())
    return h.hexdigest()[:12]


@functools.cache
def load_extension(verbose: bool = False) -> ModuleType:
    """Build (once, cached on disk) and import the extension for the current GPU.

    Raises:
        MissingSourcesError: the installed package lacks the CUDA sources.
        RuntimeError: no CUDA device, or no nvcc (CUDA toolkit) to build with.
    """
    from torch.utils import cpp_extension

    source_files()
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device")
    if cpp_extension.CUDA_HOME is None and shutil.which("nvcc") is None:
        raise RuntimeError("nvcc not found: install the CUDA toolkit or set CUDA_HOME")
    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}{minor}"
    tag = f"ss_{_source_hash()}_sm{arch}_torch{torch.__version__.replace('+', '_').replace('.', '_')}"
    cuda_flags = ["-O3", "-std=c++17", f"-gencode=arch=compute_{arch},code=sm_{arch}", "-lineinfo"]
    if verbose:
        cuda_flags.append("-Xptxas=-v")
    old_arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"  # no extra gencode flags from torch
    try:
        return cpp_extension.load(
            name=f"longhorn_zoo_{tag}",
            sources=[str(CSRC / s) for s in SOURCES],
            extra_cflags=["-O3"],
            extra_cuda_cflags=cuda_flags,
            extra_include_paths=[str(CSRC)],
            build_directory=str(_build_dir(tag)),
            verbose=verbose,
        )
    finally:
        if old_arch_list is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = old_arch_list


@functools.cache
def is_available() -> bool:
    """True when the extension builds and loads here; warns once with the reason otherwise.

    On a machine with no CUDA device it is simply False, without a warning.

    Raises:
        MissingSourcesError: on a CUDA machine, when the installed package lacks the sources
            (a broken installation is an error, not a silent fallback to the slow reference).
    """
    if not torch.cuda.is_available():
        return False
    try:
        load_extension()
    except MissingSourcesError:
        raise
    except Exception as e:  # no GPU, no nvcc, a failed build: use the reference
        warnings.warn(f"selective-scan CUDA kernels unavailable ({e}); the reference scan runs instead", stacklevel=2)
        return False
    return True


def _sms() -> int:
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


def _nchunks(batch: int, seqlen: int, channels: int, channels_per_block: int, blocks_per_sm: float, sms: int) -> int:
    """Time chunks that bring the blocks of this many channels to about blocks_per_sm per SM."""
    blocks = batch * math.ceil(channels / channels_per_block)
    return max(1, min(math.ceil(seqlen / TILE), round(blocks_per_sm * sms / max(blocks, 1))))


def _chunk_length(seqlen: int, nchunks: int) -> int:
    return TILE * math.ceil(math.ceil(max(seqlen, 1) / nchunks) / TILE)


def _fwd_launch(batch: int, seqlen: int, channels: int, sms: int) -> tuple[int, int]:
    """The forward's (threads per channel, chunk length). Threads per channel: TUNING's, or where that
    is 0, 2 if its blocks (64 channels) fill the GPU in one chunk, else 4 (32 channels a block)."""
    lanes = int(TUNING["fwd_lanes"])
    if not lanes:
        lanes = 2 if _nchunks(batch, seqlen, channels, 64, TUNING["fwd_blocks_per_sm"], sms) == 1 else 4
    nchunks = _nchunks(batch, seqlen, channels, 128 // lanes, TUNING["fwd_blocks_per_sm"], sms)
    return lanes, _chunk_length(seqlen, nchunks)


def fwd_lanes(batch: int, seqlen: int, channels: int) -> int:
    """The forward's threads per channel at this shape (see TUNING)."""
    return _fwd_launch(batch, seqlen, channels, _sms())[0]


def _bwd_len(batch: int, seqlen: int, channels: int, sms: int) -> int:
    """The backward's chunk length (its blocks hold kBwdBlockChannels = 64 channels)."""
    return _chunk_length(seqlen, _nchunks(batch, seqlen, channels, 64, TUNING["bwd_blocks_per_sm"], sms))


def chunk_lengths(batch: int, seqlen: int, channels: int) -> tuple[int, int]:
    """(forward, backward) chunk lengths in steps: enough chunks to fill the GPU, multiples of the tile."""
    sms = _sms()
    return _fwd_launch(batch, seqlen, channels, sms)[1], _bwd_len(batch, seqlen, channels, sms)


def _supported(x: Tensor, kin: Tensor) -> bool:
    return x.is_cuda and x.dtype in (torch.float32, torch.float16, torch.bfloat16) and kin.shape[-1] == STATE_SIZE


def _entry_len(batch: int, seqlen: int, channels: int, sms: int) -> int:
    """The backward's chunk length where it splits time (the forward then saves the state entering each
    of its chunks, so the backward needs no summary pass), else 0."""
    bwd_len = _bwd_len(batch, seqlen, channels, sms)
    return bwd_len if bwd_len < seqlen and TUNING["entry_states"] else 0


def entry_states_like(x: Tensor, kin: Tensor) -> Tensor:
    """An empty tensor like the entry states that the forward saves for the backward (the backend's
    residual): (B, chunks, C, N) float32, or no elements where the backward runs in one chunk."""
    b, t, c = (int(d) for d in x.shape)
    entry = _entry_len(b, t, c, _sms()) if _supported(x, kin) else 0
    shape = (b, -(-t // entry), c, STATE_SIZE) if entry else (0,)
    return x.new_empty(shape, dtype=torch.float32)


def _prep(x: Tensor, dt: Tensor, kin: Tensor, qout: Tensor, D: Tensor, z: Tensor | None,
          h0: Tensor | None, reset: Tensor | None) -> tuple[Any, ...]:  # fmt: skip
    """x, dt and z are read through their strides, whatever the view (the block passes x transposed
    from the convolution and z a slice of in_proj); only the small tensors are made contiguous.
    Reading a transposed x in place measured faster than copying it first (see docs/benchmarks.md)."""
    return (
        x,
        dt.to(x.dtype),
        kin.float().contiguous(),
        qout.float().contiguous(),
        D.float().contiguous(),
        None if z is None else z.to(x.dtype),
        None if h0 is None else h0.float().contiguous(),
        None if reset is None else reset.bool().contiguous(),
    )


def _run_fwd(kind: int, x, dt, kin, qout, A, D, z, h0, reset) -> tuple[Tensor, Tensor, Tensor]:
    """(y, final state, entry states for the backward: see entry_states_like)."""
    x, dt, kin, qout, D, z, h0, reset = _prep(x, dt, kin, qout, D, z, h0, reset)
    A = None if A is None else A.float().contiguous()
    b, t, c = x.shape
    sms = _sms()
    lanes, fwd_len = _fwd_launch(b, t, c, sms)
    return tuple(load_extension().scan_fwd(kind, x, dt, kin, qout, A, D, z, h0, reset, lanes, fwd_len,
                                           _entry_len(b, t, c, sms)))


def _run_bwd(kind: int, x, dt, kin, qout, A, D, z, h0, reset, dy, dhT, entry_states=None) -> list[Tensor]:
    """entry_states: the forward's, or None (or a tensor of another chunking, as when TUNING changed in
    between, or empty): then the backward finds them by a summary pass."""
    x, dt, kin, qout, D, z, h0, reset = _prep(x, dt, kin, qout, D, z, h0, reset)
    A = None if A is None else A.float().contiguous()
    b, t, c = x.shape
    bwd_len = _bwd_len(b, t, c, _sms())
    if entry_states is not None and tuple(entry_states.shape) != (b, -(-t // bwd_len), c, STATE_SIZE):
        entry_states = None
    dy = dy.to(x.dtype)
    dhT = dhT.float().contiguous()
    return load_extension().scan_bwd(kind, x, dt, kin, qout, A, D, z, h0, reset, dy, dhT, bwd_len, entry_states)


# ---------------------------------------------------------------------------------------------
# Backward custom ops: opaque nodes for torch.compile, so the CUDA backward traces without a break.


def _like(t: Tensor) -> Tensor:
    """A contiguous empty tensor of t's shape and dtype: the extension's outputs are contiguous whatever
    the strides of its inputs (``empty_like`` would copy those strides, and Inductor checks them)."""
    return t.new_empty(t.shape)


@torch.library.custom_op("longhorn_zoo::longhorn_scan_cuda_bwd", mutates_args=())
def longhorn_scan_cuda_bwd(
    x: Tensor, dt: Tensor, k: Tensor, q: Tensor, D: Tensor, z: Tensor | None, initial_state: Tensor | None,
    reset: Tensor | None, dy: Tensor, d_final_state: Tensor, entry_states: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """Gradients (dx, ddt, dk, dq, dD, dz, d_initial_state) of the Longhorn scan; dz is empty without z.
    entry_states: the forward's (its residual), or None."""
    dx, ddt, dk, dq, _, dD, dz, dh0 = _run_bwd(
        LONGHORN, x, dt, k, q, None, D, z, initial_state, reset, dy, d_final_state, entry_states
    )
    return dx.to(x.dtype), ddt.to(dt.dtype), dk.to(k.dtype), dq.to(q.dtype), dD.to(D.dtype), dz, dh0


@longhorn_scan_cuda_bwd.register_fake
def _(x, dt, k, q, D, z, initial_state, reset, dy, d_final_state, entry_states=None):
    dz = _like(x) if z is not None else x.new_empty(0)
    dh0 = x.new_empty(x.shape[0], x.shape[2], k.shape[-1], dtype=torch.float32)
    return _like(x), _like(dt), _like(k), _like(q), _like(D), dz, dh0


@torch.library.custom_op("longhorn_zoo::mamba_scan_cuda_bwd", mutates_args=())
def mamba_scan_cuda_bwd(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor, z: Tensor | None,
    initial_state: Tensor | None, reset: Tensor | None, dy: Tensor, d_final_state: Tensor,
    entry_states: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """Gradients (dx, ddt, dA, dB, dC, dD, dz, d_initial_state) of the Mamba scan; dz is empty without z.
    entry_states: the forward's (its residual), or None."""
    dx, ddt, dB, dC, dA, dD, dz, dh0 = _run_bwd(MAMBA, x, dt, B, C, A, D, z, initial_state, reset, dy, d_final_state,
                                                entry_states)
    return (dx.to(x.dtype), ddt.to(dt.dtype), dA.to(A.dtype), dB.to(B.dtype), dC.to(C.dtype), dD.to(D.dtype), dz,
            dh0)  # fmt: skip


@mamba_scan_cuda_bwd.register_fake
def _(x, dt, A, B, C, D, z, initial_state, reset, dy, d_final_state, entry_states=None):
    dz = _like(x) if z is not None else x.new_empty(0)
    dh0 = x.new_empty(x.shape[0], x.shape[2], B.shape[-1], dtype=torch.float32)
    return _like(x), _like(dt), _like(A), _like(B), _like(C), _like(D), dz, dh0


# ---------------------------------------------------------------------------------------------
# Backends


def _grads_or_zeros(outputs: tuple[Tensor, ...], grads: tuple[Tensor | None, ...]) -> tuple[Tensor, Tensor]:
    dy, dhT = grads
    return (torch.zeros_like(outputs[0]) if dy is None else dy, torch.zeros_like(outputs[1]) if dhT is None else dhT)


def _given(entry_states: Tensor) -> Tensor | None:
    """The residual as the backward op takes it: None where the forward saved no entry states."""
    return entry_states if entry_states.numel() else None


def longhorn_backend(op: ScanOp) -> Backend:
    """The "cuda" backend of ``longhorn_zoo::longhorn_scan``; ``plugins/longhorn/ops.py`` registers it."""

    def forward(x, dt, k, q, D, z, initial_state, reset):
        if not _supported(x, k):
            return (*op.reference(x, dt, k, q, D, z, initial_state, reset), entry_states_like(x, k))
        return _run_fwd(LONGHORN, x, dt, k, q, None, D, z, initial_state, reset)

    def backward(inputs, outputs, grads):
        x, dt, k, q, D, z, h0, reset = inputs
        *outputs, entry_states = outputs
        if not _supported(x, k):
            return op._reference_vjp(list(inputs), tuple(outputs), grads)
        dy, dhT = _grads_or_zeros(outputs, grads)
        dx, ddt, dk, dq, dD, dz, dh0 = longhorn_scan_cuda_bwd(x, dt, k, q, D, z, h0, reset, dy, dhT,
                                                              _given(entry_states))
        return dx, ddt, dk, dq, dD, (None if z is None else dz), (None if h0 is None else dh0), None

    return Backend(name="cuda", device_type="cuda", is_available=is_available, forward=forward, backward=backward,
                   residual=lambda x, dt, k, *_: entry_states_like(x, k))


def mamba_backend(op: ScanOp) -> Backend:
    """The "cuda" backend of ``longhorn_zoo::mamba_scan``; ``plugins/mamba/ops.py`` registers it."""

    def forward(x, dt, A, B, C, D, z, initial_state, reset):
        if not _supported(x, B):
            return (*op.reference(x, dt, A, B, C, D, z, initial_state, reset), entry_states_like(x, B))
        return _run_fwd(MAMBA, x, dt, B, C, A, D, z, initial_state, reset)

    def backward(inputs, outputs, grads):
        x, dt, A, B, C, D, z, h0, reset = inputs
        *outputs, entry_states = outputs
        if not _supported(x, B):
            return op._reference_vjp(list(inputs), tuple(outputs), grads)
        dy, dhT = _grads_or_zeros(outputs, grads)
        dx, ddt, dA, dB, dC, dD, dz, dh0 = mamba_scan_cuda_bwd(x, dt, A, B, C, D, z, h0, reset, dy, dhT,
                                                               _given(entry_states))
        return dx, ddt, dA, dB, dC, dD, (None if z is None else dz), (None if h0 is None else dh0), None

    return Backend(name="cuda", device_type="cuda", is_available=is_available, forward=forward, backward=backward,
                   residual=lambda x, dt, A, B, *_: entry_states_like(x, B))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", action="store_true", help="build the extension for the current GPU now")
    parser.add_argument("--verbose", action="store_true", help="show the compiler output (registers, spills)")
    args = parser.parse_args()
    if args.build:
        ext = load_extension(verbose=args.verbose)
        print(f"built {ext.__name__} from {ext.__file__}")


if __name__ == "__main__":
    main()
