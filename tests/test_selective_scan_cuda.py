"""CUDA selective-scan kernels (csrc/): installed with the package, they compile (CPU CI) and match the
float64 reference (GPU). The compile check reads the sources the JIT build reads, from the installed package."""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch import Tensor

from longhorn_zoo.plugins.longhorn.ops import longhorn_scan_reference
from longhorn_zoo.plugins.mamba.ops import mamba_scan_reference
from longhorn_zoo.plugins.selective_scan import cuda

CSRC = cuda.CSRC  # the installed package's csrc (the checkout's csrc/ for an editable install)
REPO_CSRC = Path(__file__).resolve().parents[1] / "csrc"
NVCC = shutil.which("nvcc")
CUDA_SUFFIXES = (".cu", ".cuh", ".h", ".cpp")


def test_the_installed_package_holds_every_cuda_source():
    installed = {f.name: f.read_bytes() for f in cuda.source_files()}
    assert set(installed) == {p.name for p in CSRC.iterdir() if p.suffix in CUDA_SUFFIXES}  # the build reads all
    if REPO_CSRC.is_dir():  # tests run from a checkout or an sdist: the package carries the same files
        assert installed == {p.name: p.read_bytes() for p in REPO_CSRC.iterdir() if p.suffix in CUDA_SUFFIXES}


def test_missing_sources_are_an_error_not_a_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "binding.cpp").write_text("")
    monkeypatch.setattr(cuda, "CSRC", tmp_path)
    monkeypatch.setattr(cuda, "load_extension", cuda.load_extension.__wrapped__)  # past any cached build
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(cuda.MissingSourcesError, match=r"sources combine\.cu, .*selective_scan\.cuh are missing "
                                                       r"from .*op_backend reference"):
        cuda.is_available.__wrapped__()


@pytest.mark.parametrize(("batch", "seqlen", "lanes", "chunks"), [
    (8, 2048, 2, (2048, 2048)),  # the 1.3B step: 512 blocks of 64 channels fill 132 SMs in one chunk
    (4, 2048, 4, (2048, 1024)),  # 64-channel blocks would need two chunks; 32-channel ones need one
    (1, 32768, 4, (8192, 4096)),
])
def test_forward_lanes_follow_the_chunks(batch: int, seqlen: int, lanes: int, chunks: tuple[int, int],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """fwd_lanes 0 (the default) takes 2 lanes, 64 channels a block, only where those blocks alone
    fill the GPU: on a 132-SM H200 at C = 4096."""
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _: type("P", (), {"multi_processor_count": 132}))
    assert cuda.TUNING["fwd_lanes"] == 0
    assert (cuda.fwd_lanes(batch, seqlen, 4096), cuda.chunk_lengths(batch, seqlen, 4096)) == (lanes, chunks)
    monkeypatch.setitem(cuda.TUNING, "fwd_lanes", 4)  # a fixed setting wins
    assert cuda.fwd_lanes(8, 2048, 4096) == 4
    assert cuda.chunk_lengths(8, 2048, 4096) == (2048, 2048)


def _nvcc_top() -> Path:
    """The toolkit root that nvcc itself uses (nvcc may be a wrapper script)."""
    out = subprocess.run(
        [NVCC, "-dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull], capture_output=True, text=True
    )
    for line in (out.stdout + out.stderr).splitlines():
        if line.startswith("#$ TOP="):
            return Path(line.split("=", 1)[1].strip()).resolve()
    return Path(os.path.realpath(NVCC)).parents[1]


def _compile(cmd: list[str]) -> tuple[list[str], subprocess.CompletedProcess]:
    return cmd, subprocess.run(cmd, capture_output=True, text=True)


@pytest.mark.slow  # nvcc -O3 of every kernel: about 9 minutes on 2 busy CPU cores
@pytest.mark.skipif(NVCC is None, reason="nvcc not found: the CUDA sources cannot be compiled here")
def test_cuda_sources_compile(tmp_path: Path) -> None:
    from torch.utils.cpp_extension import include_paths

    cmds = [
        [
            NVCC,
            "-c",
            "-std=c++17",
            "-O3",
            "-gencode=arch=compute_90,code=sm_90",
            f"-I{CSRC}",
            str(cu),
            "-o",
            str(tmp_path / f"{cu.stem}.o"),
        ]  # fmt: skip
        for cu in sorted(CSRC.glob("*.cu"))
    ]
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is not None:
        # The CPU wheel lacks one generated CUDA header of c10; an empty stand-in is enough for a syntax check.
        stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
        stub.mkdir(parents=True)
        (stub / "cuda_cmake_macros.h").write_text("")
        cuda_include = _nvcc_top() / "include"
        incs = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}", f"-I{tmp_path / 'stub'}",
                                                      f"-I{cuda_include}", f"-I{CSRC}"]  # fmt: skip
        cmds.append([cxx, "-std=c++20", "-fsyntax-only", "-DTORCH_EXTENSION_NAME=ss", *incs, str(CSRC / "binding.cpp")])
    assert len(cmds) >= 5
    with ThreadPoolExecutor(max_workers=2) as pool:
        for cmd, res in pool.map(_compile, cmds):
            assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stderr[-4000:]}"


# ---------------------------------------------------------------------------------------------
# GPU correctness against float64


def _longhorn_inputs(b: int, t: int, c: int, dtype: torch.dtype, gen: torch.Generator) -> dict[str, Tensor]:
    def r(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device="cuda") * scale).to(dtype)

    return {
        "x": r(b, t, c), "dt": r(b, t, c), "k": r(b, t, 16, scale=0.3), "q": r(b, t, 16, scale=0.3),
        "D": torch.randn(c, generator=gen, device="cuda"), "z": r(b, t, c),
        "initial_state": torch.randn(b, c, 16, generator=gen, device="cuda"),
        "reset": torch.rand(b, t, generator=gen, device="cuda") < 0.01,
    }  # fmt: skip


def _mamba_inputs(b: int, t: int, c: int, dtype: torch.dtype, gen: torch.Generator) -> dict[str, Tensor]:
    def r(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=gen, device="cuda") * scale + shift).to(dtype)

    A = -torch.exp(torch.rand(c, 16, generator=gen, device="cuda") * 2.8)  # A in [-16, -1]
    return {
        "x": r(b, t, c), "dt": r(b, t, c, scale=1.0, shift=-3.0), "A": A, "B": r(b, t, 16, scale=0.5),
        "C": r(b, t, 16, scale=0.5), "D": torch.randn(c, generator=gen, device="cuda"), "z": r(b, t, c),
        "initial_state": torch.randn(b, c, 16, generator=gen, device="cuda"),
        "reset": torch.rand(b, t, generator=gen, device="cuda") < 0.01,
    }  # fmt: skip


def _rel(a: Tensor, b: Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _as_block_views(inp: dict[str, Tensor]) -> None:
    """Replaces x by a transposed copy and z by a slice of a wider tensor, the views the block passes."""
    x = inp["x"]
    inp["x"] = x.transpose(1, 2).contiguous().transpose(1, 2)
    if inp["z"] is not None:
        wide = torch.cat([torch.zeros_like(inp["z"]), inp["z"]], dim=-1)
        inp["z"] = wide[..., x.shape[-1] :]


def check_scan(kind: str, b: int, t: int, c: int, dtype: torch.dtype, seed: int, with_gate: bool = True,
               with_state: bool = True, with_reset: bool = True, views: bool = False,
               entry_states: bool = True) -> dict[str, float]:  # fmt: skip
    """Runs the CUDA kernels and the float64 reference on the same (rounded) inputs; returns relative errors.
    views: pass x and z as strided views (see _as_block_views). entry_states False: the backward does not
    get the forward's entry states, and finds them by its summary pass."""
    from longhorn_zoo.plugins.selective_scan import cuda as ss

    gen = torch.Generator(device="cuda").manual_seed(seed)
    make = _longhorn_inputs if kind == "longhorn" else _mamba_inputs
    inp = make(b, t, c, dtype, gen)
    if not with_gate:
        inp["z"] = None
    if not with_state:
        inp["initial_state"] = None
    if not with_reset:
        inp["reset"] = None
    if views:
        _as_block_views(inp)
        assert not inp["x"].is_contiguous()
    names = list(inp)
    ref_fn = longhorn_scan_reference if kind == "longhorn" else mamba_scan_reference
    diff = [n for n in names if inp[n] is not None and inp[n].is_floating_point()]
    ref_in = {n: (v.double().requires_grad_(n in diff) if v is not None and v.is_floating_point() else v)
              for n, v in inp.items()}  # fmt: skip
    y_ref, h_ref = ref_fn(*ref_in.values())
    dy = torch.randn(y_ref.shape, generator=gen, device="cuda").to(dtype)
    dh = torch.randn(h_ref.shape, generator=gen, device="cuda")
    grads_ref = torch.autograd.grad((y_ref, h_ref), [ref_in[n] for n in diff], (dy.double(), dh.double()))

    vals = list(inp.values())
    if kind == "longhorn":
        x, dt, k, q, D, z, h0, rs = vals
        y, hT, entry = ss._run_fwd(ss.LONGHORN, x, dt, k, q, None, D, z, h0, rs)
        out = ss.longhorn_scan_cuda_bwd(x, dt, k, q, D, z, h0, rs, dy, dh, _entry(entry, entry_states))
        got = dict(zip(["x", "dt", "k", "q", "D", "z", "initial_state"], out))
    else:
        x, dt, A, B, C, D, z, h0, rs = vals
        y, hT, entry = ss._run_fwd(ss.MAMBA, x, dt, B, C, A, D, z, h0, rs)
        out = ss.mamba_scan_cuda_bwd(x, dt, A, B, C, D, z, h0, rs, dy, dh, _entry(entry, entry_states))
        got = dict(zip(["x", "dt", "A", "B", "C", "D", "z", "initial_state"], out))
    torch.cuda.synchronize()
    errs = {"y": _rel(y, y_ref), "final_state": _rel(hT, h_ref)}
    if entry.numel():  # the states entering the backward's chunks, against the reference's states there
        errs["entry_states"] = _entry_errors(entry, ref_fn, ref_in)
    for n, g in zip(diff, grads_ref):
        errs[f"d{n}"] = _rel(got[n], g)
    return errs


def _entry(entry: Tensor, use: bool) -> Tensor | None:
    return entry if use and entry.numel() else None


TIME_INPUTS = ("x", "dt", "k", "q", "B", "C", "z", "reset")  # the inputs indexed by time, (B, T, ...)


def _entry_errors(entry: Tensor, ref_fn, ref_in: dict[str, Tensor]) -> float:
    """Relative error of the forward's entry states at the first, a middle and the last backward chunk,
    against the reference's final state of the prefix before each (the initial state for chunk 0)."""
    from longhorn_zoo.plugins.selective_scan import cuda as ss

    b, t, c = ref_in["x"].shape
    length, n = ss.chunk_lengths(b, t, c)[1], entry.shape[1]
    got, want = [], []
    for j in sorted({0, n // 2, n - 1}):
        if j == 0:
            h0 = ref_in["initial_state"]
            want.append(torch.zeros(b, c, 16, dtype=torch.float64, device=entry.device) if h0 is None else h0.detach())
        else:
            prefix = {k: (v[:, : j * length] if k in TIME_INPUTS and v is not None else v) for k, v in ref_in.items()}
            with torch.no_grad():
                want.append(ref_fn(*prefix.values())[1])
        got.append(entry[:, j])
    return _rel(torch.stack(got), torch.stack(want))


def _bounds(dtype: torch.dtype, name: str) -> float:
    """fp32 accumulation: ~1e-6 for float32 results; outputs rounded to 16-bit floats: ~2e-3."""
    float32_out = name in ("final_state", "entry_states", "dD", "dA", "dinitial_state")
    if dtype == torch.float32 or float32_out:
        return 2e-4
    return 1e-2


def assert_within_bounds(errs: dict[str, float], dtype: torch.dtype, what: str = "") -> None:
    """Every relative error finite (not NaN) and under its bound for dtype."""
    for name, e in errs.items():
        assert e == e and e < _bounds(dtype, name), f"{what}{name} rel err {e:.2e} ({errs})"


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_gpu
@pytest.mark.parametrize("kind", ["longhorn", "mamba"])
@pytest.mark.parametrize("t", [1, 17, 2048, 2049, 8192])
def test_scan_matches_float64_reference(kind: str, t: int) -> None:
    b, c = (2, 80) if t <= 2049 else (1, 64)
    for dtype in (torch.float32, torch.bfloat16):
        errs = check_scan(kind, b, t, c, dtype, seed=1000 * t + (dtype == torch.bfloat16))
        assert_within_bounds(errs, dtype, f"{kind} T={t} {dtype}: ")


@needs_gpu
@pytest.mark.parametrize("kind", ["longhorn", "mamba"])
def test_scan_without_gate_state_or_reset(kind: str) -> None:
    errs = check_scan(kind, 2, 300, 96, torch.float16, seed=7, with_gate=False, with_state=False, with_reset=False)
    assert_within_bounds(errs, torch.float16)


@needs_gpu
@pytest.mark.parametrize("kind", ["longhorn", "mamba"])
@pytest.mark.parametrize("c", [77, 130])
def test_scan_at_channel_counts_the_blocks_do_not_divide(kind: str, c: int) -> None:
    """The backward reads and writes two channels at a time: an odd C takes its element-wise path,
    with the last pair half outside; C = 130 ends its last 64-channel block after one pair."""
    for dtype in (torch.float32, torch.bfloat16):
        errs = check_scan(kind, 2, 100, c, dtype, seed=c + (dtype == torch.bfloat16))
        assert_within_bounds(errs, dtype, f"{kind} C={c} {dtype}: ")


@needs_gpu
@pytest.mark.parametrize("kind", ["longhorn", "mamba"])
@pytest.mark.parametrize("lanes", [2, 4])
def test_scan_in_one_chunk(kind: str, lanes: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """No time chunks (the launch at large B * C): forward and backward walk all of T from the initial
    state and the final state's gradient, with no summary pass."""
    from longhorn_zoo.plugins.selective_scan import cuda as ss

    monkeypatch.setitem(ss.TUNING, "fwd_lanes", lanes)
    monkeypatch.setitem(ss.TUNING, "fwd_blocks_per_sm", 1e-3)
    monkeypatch.setitem(ss.TUNING, "bwd_blocks_per_sm", 1e-3)
    assert ss.chunk_lengths(2, 2049, 80) == (2064, 2064)
    errs = check_scan(kind, 2, 2049, 80, torch.bfloat16, seed=5 + lanes)
    assert_within_bounds(errs, torch.bfloat16)


@needs_gpu
@pytest.mark.parametrize("kind", ["longhorn", "mamba"])
@pytest.mark.parametrize("lanes", [2, 4])
@pytest.mark.parametrize("t", [333, 344])
def test_scan_reads_strided_views(kind: str, lanes: int, t: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """x transposed (as the block passed it before the Triton conv) and z a slice: read through their
    strides, no copy. The forward reads the transposed x along time: T = 344 (a multiple of 8, not of
    the tile) takes the vector loads and a partial last tile, T = 333 the element-wise fallback; the
    backward reads it element by element (no channel pairs)."""
    from longhorn_zoo.plugins.selective_scan import cuda as ss

    monkeypatch.setitem(ss.TUNING, "fwd_lanes", lanes)
    for dtype in (torch.float32, torch.bfloat16):
        errs = check_scan(kind, 2, t, 80, dtype, seed=11 + t + lanes, views=True)
        assert_within_bounds(errs, dtype, f"{kind} T={t} lanes={lanes} {dtype}: ")


@needs_gpu
@pytest.mark.parametrize("kind", ["longhorn", "mamba"])
def test_backward_without_the_forward_entry_states(kind: str) -> None:
    """A backward in chunks that does not get the forward's entry states (a forward that ran elsewhere,
    or TUNING changed in between) finds them by its summary pass. The other tests take the forward's."""
    from longhorn_zoo.plugins.selective_scan import cuda as ss

    assert ss.chunk_lengths(2, 2049, 80)[1] < 2049  # chunks, so the forward saves entry states
    for entry_states in (True, False):
        errs = check_scan(kind, 2, 2049, 80, torch.bfloat16, seed=21, entry_states=entry_states)
        assert "entry_states" in errs
        assert_within_bounds(errs, torch.bfloat16, f"{kind} entry_states={entry_states}: ")


@needs_gpu
@pytest.mark.parametrize("kind", ["longhorn", "mamba"])
def test_op_in_chunks_under_compile_matches_reference(kind: str) -> None:
    """The custom op as the block calls it, compiled with fullgraph, at a shape whose backward runs in
    chunks: its forward's residual (the entry states) reaches the backward through the compiled graphs."""
    from longhorn_zoo.plugins.longhorn.ops import longhorn_scan
    from longhorn_zoo.plugins.mamba.ops import mamba_scan
    from longhorn_zoo.plugins.selective_scan import cuda as ss

    op, make = (longhorn_scan, _longhorn_inputs) if kind == "longhorn" else (mamba_scan, _mamba_inputs)
    b, t, c = 2, 1000, 80
    assert ss.chunk_lengths(b, t, c)[1] < t
    gen = torch.Generator(device="cuda").manual_seed(17)
    inp = make(b, t, c, torch.float32, gen)
    diff = [n for n, v in inp.items() if v.is_floating_point()]
    leaves = [v.clone().requires_grad_(n in diff) for n, v in inp.items()]
    y, h = torch.compile(lambda *a: op(*a), fullgraph=True)(*leaves)
    dy, dh = torch.randn_like(y), torch.randn_like(h)
    grads = torch.autograd.grad((y, h), [v for v in leaves if v.requires_grad], (dy, dh))
    ref_in = [v.double().requires_grad_(n in diff) if v.is_floating_point() else v for n, v in inp.items()]
    y_ref, h_ref = op.reference(*ref_in)
    grads_ref = torch.autograd.grad((y_ref, h_ref), [v for v in ref_in if v.requires_grad], (dy.double(), dh.double()))
    errs = {"y": _rel(y, y_ref), "final_state": _rel(h, h_ref)}
    errs.update({f"d{n}": _rel(g, r) for n, g, r in zip(diff, grads, grads_ref)})
    assert_within_bounds(errs, torch.float32)


@needs_gpu
def test_longhorn_op_uses_cuda_backend_under_compile() -> None:
    from longhorn_zoo.plugins.longhorn.ops import longhorn_scan

    assert longhorn_scan.select_backend("cuda") is not None
    gen = torch.Generator(device="cuda").manual_seed(3)
    inp = _longhorn_inputs(2, 64, 64, torch.bfloat16, gen)
    leaves = {n: v.requires_grad_() if v.is_floating_point() else v for n, v in inp.items()}
    fn = torch.compile(lambda *a: longhorn_scan(*a), fullgraph=True)
    y, h = fn(*leaves.values())
    (y.float().square().sum() + h.sum()).backward()
    assert all(v.grad is not None for v in leaves.values() if v.is_floating_point())


@pytest.mark.parametrize("kind", ["longhorn", "mamba"])
def test_backward_fakes_are_contiguous_for_strided_inputs(kind: str) -> None:
    """The extension returns contiguous gradients; the fakes must say so even when the block passes
    strided views (x, dt and z are slices of wider projections), or compiled graphs fail their
    stride asserts at run time. Runs on CPU: only the fake implementations are exercised."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import longhorn_zoo.plugins.selective_scan.cuda  # noqa: F401  registers the backward ops

    b, t, c, n = 2, 5, 6, 16
    with FakeTensorMode():
        wide = torch.empty(b, t, 3 * c)
        x, dt, z = wide[..., :c], wide[..., c : 2 * c], wide[..., 2 * c :]
        kq = torch.empty(b, n, t).transpose(1, 2)  # (B, T, N), strided
        D, h0, dy, dh = torch.empty(c), torch.empty(b, c, n), torch.empty(b, t, c), torch.empty(b, c, n)
        if kind == "longhorn":
            grads = torch.ops.longhorn_zoo.longhorn_scan_cuda_bwd(x, dt, kq, kq, D, z, h0, None, dy, dh)
        else:
            A = torch.empty(n, c).t()
            grads = torch.ops.longhorn_zoo.mamba_scan_cuda_bwd(x, dt, A, kq, kq, D, z, h0, None, dy, dh)
    assert all(g.is_contiguous() for g in grads), [g.stride() for g in grads]
