"""The op benchmark's parts that run without a GPU: input builders, floors, the float64 check, the CLI."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from benchmarks import linear_attention as la
from benchmarks import ops as bench
from longhorn_zoo.plugins.linear_attention.ops import linear_attn_scan, linear_attn_scan_reference


def _tiny_width(case: bench.OpCase) -> int:
    return case.checks[-1][2] if case.checks else 2


@pytest.mark.parametrize("case", bench.build_cases(), ids=lambda c: c.name)
def test_case_inputs_run_through_the_op_and_floor_grows_with_length(case: bench.OpCase) -> None:
    width = _tiny_width(case)
    args = case.inputs(2, 24, torch.float32, torch.Generator().manual_seed(0), width)
    outs = case.op(*args)
    assert outs[0].shape[0] == 2 and all(torch.isfinite(o).all() for o in outs)
    fwd, total = case.floor_bytes(args)
    longer_fwd, longer_total = case.floor_bytes(case.inputs(2, 48, torch.float32, torch.Generator(), width))
    assert 0 < fwd < total and longer_fwd > fwd and longer_total > total


def test_cases_cover_every_scan_op_and_the_attention_row() -> None:
    cases = bench.build_cases()
    assert [c.name for c in cases] == ["longhorn", "mamba", "conv", "gla", "retnet", "rwkv", "sdpa"]
    assert all(c.checks and c.sweep and c.reference_max_t for c in cases[:-1])
    assert [(c.name, c.peer_name) for c in cases if c.peer is not None] == [
        ("conv", "F.conv1d"), ("gla", "fla"), ("retnet", "fla"), ("rwkv", "fla")]


@pytest.mark.parametrize("case", bench.build_cases(), ids=lambda c: c.name)
def test_inputs_are_drawn_from_the_generator(case: bench.OpCase) -> None:
    a, b = (case.inputs(1, 8, torch.float32, torch.Generator().manual_seed(3), _tiny_width(case)) for _ in range(2))
    assert all(torch.equal(x, y) for x, y in zip(a, b) if isinstance(x, torch.Tensor))


def _gla_args() -> tuple[list, torch.Generator]:
    """GLA's inputs with K = V = 8 and 19 steps (a partial chunk at the end), float32 on CPU."""
    gen = torch.Generator().manual_seed(0)
    return la.inputs(replace(la.VARIANTS["gla"], head_dim=8), 1, 19, torch.float32, gen, 2), gen


def test_check_passes_the_op_itself() -> None:
    args, gen = _gla_args()
    errs = bench.compare(linear_attn_scan, linear_attn_scan_reference, args, gen)
    assert set(errs) == {"out0", "out1", "dq", "dk", "dv", "dlog_decay", "dinitial_state"}
    assert bench.failures(errs, torch.float32) == [], errs


def test_check_flags_a_wrong_forward() -> None:
    args, gen = _gla_args()

    def decays_too_fast(q, k, v, log_decay, bonus, scale, initial_state, reset):
        return linear_attn_scan_reference(q, k, v, 1.5 * log_decay, bonus, scale, initial_state, reset)

    bad = bench.failures(bench.compare(decays_too_fast, linear_attn_scan_reference, args, gen), torch.float32)
    assert {"out0", "out1", "dq", "dlog_decay"} <= set(bad)


def test_check_flags_a_missing_gradient_only() -> None:
    args, gen = _gla_args()

    def no_decay_gradient(q, k, v, log_decay, bonus, scale, initial_state, reset):
        return linear_attn_scan_reference(q, k, v, log_decay.detach(), bonus, scale, initial_state, reset)

    errs = bench.compare(no_decay_gradient, linear_attn_scan_reference, args, gen)
    assert bench.failures(errs, torch.float32) == ["dlog_decay"] and errs["dlog_decay"] == 1.0


def test_nan_fails_the_check() -> None:
    assert bench.failures({"out0": float("nan"), "dq": 0.0}, torch.bfloat16) == ["out0"]


def test_linear_attention_sweep_restores_the_launch_settings() -> None:
    pytest.importorskip("triton")
    from longhorn_zoo.plugins.linear_attention import triton_chunk_ops as ops

    case = next(c for c in bench.build_cases() if c.name == "retnet")
    before = ops.CHUNK_PER_HEAD, ops.NUM_WARPS_CHUNK
    labels = list(case.sweep(4, 2048))
    assert len(labels) > 1 and (ops.CHUNK_PER_HEAD, ops.NUM_WARPS_CHUNK) == before


def test_conv_peer_is_the_op_when_there_are_no_resets() -> None:
    case = next(c for c in bench.build_cases() if c.name == "conv")
    args = case.inputs(2, 24, torch.float32, torch.Generator().manual_seed(0), 8)
    args[4] = None
    for got, want in zip(case.peer()(*args), case.op(*args)):
        torch.testing.assert_close(got, want)


def test_conv_sweep_swaps_the_kernels_per_config_and_restores_them() -> None:
    pytest.importorskip("triton")
    from longhorn_zoo.plugins.selective_scan import conv_triton as ct

    case = next(c for c in bench.build_cases() if c.name == "conv")
    before = ct._fwd, ct._bwd
    pinned = [(ct._fwd, ct._bwd) for _ in case.sweep(8, 2048)]
    assert len(pinned) == len(ct.FWD_CONFIGS) * len(ct.BWD_CONFIGS) and before not in pinned
    assert (ct._fwd, ct._bwd) == before


def test_help_and_option_errors_need_no_gpu(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as help_exit:
        bench.main(["--help"])
    assert help_exit.value.code == 0 and "--quick" in capsys.readouterr().out
    with pytest.raises(SystemExit) as bad_exit:
        bench.main(["--ops", "gla,nope"])
    assert bad_exit.value.code == 2 and "unknown op(s) nope" in capsys.readouterr().err


def test_without_cuda_it_exits_with_a_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--quick"])
    assert "needs a CUDA GPU" in str(exit_info.value.code)


def test_doc_mask_benchmark_runs_tiny_on_cpu(capsys) -> None:
    """``python -m benchmarks.doc_mask --device cpu --tiny``: a row per shape and variant, documents in every row."""
    from benchmarks import doc_mask

    reset = doc_mask.document_starts(64, 2048, "cpu")
    assert 3 < reset.sum(1).float().mean() < 5  # mean document length T / 4
    assert doc_mask.main(["--device", "cpu", "--tiny", "--reps", "1"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [r.split(" | ")[2] for r in rows] == [*doc_mask.VARIANTS] * len(doc_mask.TINY["shapes"])


def test_conv_overhead_without_cuda_exits_with_a_message(monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks import conv_overhead

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        conv_overhead.main()
    assert "needs a CUDA GPU" in str(exit_info.value.code)


def test_conv_kernels_help_and_without_cuda(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from benchmarks import conv_kernels

    with pytest.raises(SystemExit) as help_exit:
        conv_kernels.main(["--help"])
    assert help_exit.value.code == 0 and "--sweep" in capsys.readouterr().out
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        conv_kernels.main([])
    assert "needs a CUDA GPU" in str(exit_info.value.code)
