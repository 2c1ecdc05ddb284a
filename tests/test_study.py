"""scripts/study.py: the job queue, the plan, and the tiny preset end to end on the CPU."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("study", ROOT / "scripts" / "study.py")
study = sys.modules["study"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(study)


def run_study(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/study.py", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=timeout)


def py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_queue_spreads_jobs_over_gpus_and_skips_the_jobs_after_a_failure(tmp_path):
    show = py("import os, time; time.sleep(0.3); print(os.environ['CUDA_VISIBLE_DEVICES'])")
    jobs = [study.Job(f"job{i}", show, tmp_path / f"job{i}.log") for i in range(4)]
    jobs += [study.Job("bad", py("raise SystemExit('broken on purpose')"), tmp_path / "bad.log"),
             study.Job("after bad", show, tmp_path / "after.log", after=("bad",)),
             study.Job("after job0", show, tmp_path / "after0.log", after=("job0",))]
    out = study.run_jobs(jobs, ["3", "5"], per_gpu=1)
    assert {n: o.status for n, o in out.items()} == {"job0": "ok", "job1": "ok", "job2": "ok", "job3": "ok",
                                                     "bad": "failed", "after bad": "skipped", "after job0": "ok"}
    assert "broken on purpose" in out["bad"].why
    assert {(tmp_path / f"job{i}.log").read_text().strip() for i in range(4)} == {"3", "5"}
    assert not (tmp_path / "after.log").exists()


def test_dry_run_plans_equal_budgets_and_builds_the_extension_first(tmp_path):
    proc = run_study("all", "--dry-run", "--gpus", "0,1", "--out", str(tmp_path / "study"))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "python -m longhorn_zoo.plugins.selective_scan.cuda --build"
    lm = {line.split("/runs/lm_")[1].split()[0]: line for line in lines if "--data.dataset bytes" in line}
    assert sorted(lm) == sorted(study.MIXERS)
    for mixer, line in lm.items():
        assert "--training.steps 1500 " in line and "--training.seq_len 512 " in line
        assert f"--model.n_layers {24 if mixer in ('longhorn', 'mamba', 'hybrid') else 12} " in line
        assert ("--model.pattern" in line) == (mixer == "hybrid") and ("--model.name" in line) != (mixer == "hybrid")
    pattern = json.loads(lm["hybrid"].split("--model.pattern ")[1].split(" --")[0].strip("'"))
    assert pattern == ["longhorn"] * 7 + ["llama"]
    assert sum("longhorn_zoo.eval" in line for line in lines) == 2 * len(study.MIXERS)
    assert not (tmp_path / "study").exists()


@pytest.mark.slow
def test_tiny_study_trains_evaluates_and_reports_each_mixer(tmp_path):
    # llama and the hybrid (which has Longhorn blocks): two entries keep the test short; the dry run covers all
    out, md = tmp_path / "study", tmp_path / "results.md"
    proc = run_study("all", "--tiny", "--gpus", "cpu", "--mixers", "llama,hybrid", "--out", str(out),
                     "--md", str(md))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    runs = json.loads((out / "results.json").read_text())["runs"]
    for mixer in ("llama", "hybrid"):
        lm = runs[f"lm_{mixer}"]
        assert lm["train"]["status"] == "ok" and lm["train"]["steps_done"] == 6
        numbers = lm["eval"]["numbers"]
        assert [e["factor"] for e in numbers["extrapolation"]] == [1, 2, 4, 8, 16]
        assert all(math.isfinite(e["ppl"]) for e in numbers["extrapolation"]) and math.isfinite(numbers["val_loss"])
        sweep = runs[f"mqar_{mixer}"]["eval"]["numbers"]["mqar"]
        assert sweep and all(0.0 <= row["accuracy"] <= 1.0 for row in sweep)
    assert runs["lm_hybrid"]["eval"]["numbers"]["mixer"] == "longhorn+llama"
    text = md.read_text()
    rows = [line for line in text.splitlines() if line.startswith(("| llama |", "| hybrid |"))]
    assert len(rows) == 4 and all(line.endswith("| ok |") for line in rows)
    assert "| llama | 2 x 32 |" in text and "| hybrid | 4 x 32 |" in text  # twice the blocks, no MLP
    assert "python scripts/study.py all --tiny" in text and "python -m longhorn_zoo.eval" in text


@pytest.mark.slow
def test_a_failed_job_is_reported_with_its_log_and_the_others_go_on(tmp_path):
    out, md = tmp_path / "study", tmp_path / "results.md"
    proc = run_study("all", "--tiny", "--gpus", "cpu", "--mixers", "llama,longhorn", "--tasks", "mqar",
                     "--set", "mqar_llama:training.bogus=1", "--out", str(out), "--md", str(md))
    assert proc.returncode == 1
    assert "FAILED train mqar_llama (exit 2)" in proc.stdout and "unknown key 'bogus'" in proc.stdout
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert runs["mqar_llama"]["train"]["status"] == "failed"
    assert runs["mqar_llama"]["eval"]["status"] == "skipped"
    assert runs["mqar_longhorn"]["eval"]["status"] == "ok"
    text = md.read_text()
    assert "**train failed** (exit 2" in text and "## Failed jobs" in text and "unknown key 'bogus'" in text
    assert "| lm_llama" not in text and "| llama | — | — | — |" in text


def test_the_extrapolation_summary_leaves_out_a_mixer_not_evaluated_at_16x():
    """A learned position embedding stops the evaluation at 1x; its last ratio is not the 16x one."""
    report = importlib.import_module("study_report")  # on sys.path once study.py is loaded (above)

    def lm(ppls: list[float]) -> dict:
        ext = [{"factor": f, "length": 512 * f, "loss": math.log(p), "ppl": p} for f, p in zip((1, 2, 4, 8, 16), ppls)]
        return {"eval": {"numbers": {"val_loss": ext[0]["loss"], "extrapolation": ext}}}

    runs = {"lm_longhorn": lm([3.0, 3.0, 2.9, 2.9, 2.8]), "lm_rwkv5": lm([3.1])}
    lines = report.observations(runs, ["longhorn", "rwkv5"], "4.1M")
    (line,) = [x for x in lines if x.startswith("Perplexity at 16x")]
    assert "longhorn 0.93" in line and "rwkv5 1.00" not in line and "not evaluated at 16x: rwkv5" in line
