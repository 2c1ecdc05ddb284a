"""The [profiling] section writes a trace of every profile_freq-th step; profile_step groups kernel time."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.profiler import ProfilerAction

from benchmarks import profile_step
from longhorn_zoo.config import Profiling
from longhorn_zoo.profiling import Profiler
from longhorn_zoo.train import train
from tests.trainer_runs import tiny_config


def _actions(start: int, freq: int, steps: int) -> dict[int, ProfilerAction]:
    prof = Profiler(Profiling(profile_freq=freq), Path("unused"), 0, torch.device("cpu"), start)
    return {start + 1 + i: prof._action(i) for i in range(steps)}


def test_every_profile_freq_step_is_recorded_after_up_to_three_warmup_steps() -> None:
    acts = _actions(0, 5, 10)
    assert [s for s, a in acts.items() if a == ProfilerAction.RECORD_AND_SAVE] == [5, 10]
    assert [s for s, a in acts.items() if a == ProfilerAction.WARMUP] == [2, 3, 4, 7, 8, 9]
    assert acts[1] == acts[6] == ProfilerAction.NONE


def test_a_resumed_run_records_the_same_steps() -> None:
    acts = _actions(7, 5, 8)  # steps 8 .. 15
    assert [s for s, a in acts.items() if a == ProfilerAction.RECORD_AND_SAVE] == [10, 15]


def test_training_writes_one_chrome_trace_per_traced_step(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, "--training.steps", "4", "--profiling.enable_profiling", "true",
                      "--profiling.profile_freq", "2")
    train(cfg)
    traces = sorted(p.relative_to(tmp_path / "profile_traces").as_posix()
                    for p in (tmp_path / "profile_traces").rglob("*.json"))
    assert traces == ["iteration_2/rank0_trace.json", "iteration_4/rank0_trace.json"]
    events = json.loads((tmp_path / "profile_traces" / "iteration_4" / "rank0_trace.json").read_text())["traceEvents"]
    names = {ev.get("name", "") for ev in events}
    assert any(n.startswith("ProfilerStep#") for n in names)
    assert "aten::mm" in names or "aten::addmm" in names  # the model's matmuls ran inside the traced step


def _kernel(name: str, dur_ms: float) -> dict:
    return {"ph": "X", "cat": "kernel", "name": name, "dur": 1000 * dur_ms}  # traces count microseconds


def test_kernels_are_grouped_by_kind() -> None:
    events = [
        _kernel("void bwd_kernel<LonghornTraits, __nv_bfloat16, true>(ScanParams)", 100.0),
        _kernel("_causal_conv_fwd_kernel", 7.0),
        _kernel("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", 50.0),
        _kernel("nvjet_hsh_128x256_64x4_2x1_v_bz_coopA_NNT", 25.0),
        _kernel("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits>", 28.0),
        _kernel("void cudnn::fusion::convert_dq_to_16bits<true>(void const*, void*, unsigned int)", 2.0),  # not a conv
        _kernel("triton_poi_fused_cat_mul_silu_0", 4.0),  # inductor's: elementwise whatever it fused
        _kernel("void at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)", 3.0),
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoD", "dur": 2000.0},
        _kernel("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdam>", 6.0),
        _kernel("ncclDevKernel_AllGather_RING_LL", 9.0),
        _kernel("void at::native::vectorized_elementwise_kernel<4, silu>", 1.0),
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "dur": 1e6},  # host time is not kernel time
    ]
    groups, per_kernel = profile_step.group_kernels(events)
    assert {g: us / 1000 for g, us in groups.items()} == {
        "scan": 100.0, "conv": 7.0, "matmul": 75.0, "attention": 30.0, "elementwise": 5.0, "copies": 5.0,
        "optimizer": 6.0, "communication": 9.0}
    assert set(per_kernel["matmul"]) == {events[2]["name"], events[3]["name"]}
    table = profile_step.report(events)
    assert table.splitlines()[1].startswith("scan") and "237.0" in table.splitlines()[-1]


def test_a_trace_without_kernels_says_so() -> None:
    assert "no CUDA kernels" in profile_step.report([{"ph": "X", "cat": "cpu_op", "name": "aten::mm", "dur": 5.0}])
