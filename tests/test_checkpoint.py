"""DCP checkpoints on CPU: exact resume (2 gloo ranks), kill -9, SIGTERM, corrupt checkpoints, export."""

from __future__ import annotations

import os
import shutil
import signal
import time

import pytest
import torch
from trainer_runs import losses, records, run, start, tiny_config

from longhorn_zoo.checkpoint import CheckpointError, main, verify
from longhorn_zoo.model import build_model
from longhorn_zoo.train import train


def wait_for(condition, proc, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended early:\n{proc.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_resume_at_step_k_repeats_the_uninterrupted_run_bitwise(tmp_path):
    args = ["--training.steps", "6", "--checkpoint.enable", "true", "--checkpoint.interval", "3"]
    run(tmp_path, *args, "--checkpoint.async_mode", "async", nproc=2)
    uninterrupted = records(tmp_path)
    shutil.rmtree(tmp_path / "checkpoint" / "step-6")
    out = run(tmp_path, *args, nproc=2)
    assert "resumed from" in out and "(step 3)" in out
    resumed = records(tmp_path)[len(uninterrupted):]
    assert [r["step"] for r in resumed] == [4, 5, 6]
    for a, b in zip(uninterrupted[3:], resumed):
        assert (a["loss/train"], a["grad_norm"], a["lr"]) == (b["loss/train"], b["grad_norm"], b["lr"])


def test_kill_9_during_training_then_resume_continues_exactly(tmp_path):
    args = ["--training.steps", "100000", "--lr_scheduler.decay_type", "constant", "--checkpoint.enable", "true",
            "--checkpoint.interval", "2", "--checkpoint.keep_latest_k", "2"]
    proc = start(tmp_path, *args)
    wait_for(lambda: len(records(tmp_path)) >= 9, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = losses(tmp_path)
    newest = max(int(p.name.split("-")[1]) for p in (tmp_path / "checkpoint").glob("step-*[0-9]"))
    assert len(list((tmp_path / "checkpoint").glob("step-*[0-9]"))) <= 2  # keep_latest_k
    n_before = len(records(tmp_path))
    out = run(tmp_path, *args[2:], "--training.steps", str(newest + 3))
    assert f"(step {newest})" in out
    after = records(tmp_path)[n_before:]
    assert [r["step"] for r in after] == [newest + 1, newest + 2, newest + 3]
    for r in after:  # steps the killed run also finished must match it exactly
        if r["step"] in before:
            assert r["loss/train"] == before[r["step"]]


def test_sigterm_saves_the_current_step_and_exits_cleanly(tmp_path):
    proc = start(tmp_path, "--training.steps", "100000", "--checkpoint.enable", "true",
                 "--checkpoint.interval", "100000")
    wait_for(lambda: len(records(tmp_path)) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out[-3000:]
    stopped = int(out.split("SIGTERM: stopped after step ")[1].split()[0])
    assert verify(tmp_path / "checkpoint" / f"step-{stopped}") is None


def test_corrupt_or_partial_checkpoints_fall_back_with_a_message_or_fail_clearly(tmp_path, capsys):
    base = ["--checkpoint.enable", "true", "--checkpoint.interval", "2"]
    train(tiny_config(tmp_path, "--training.steps", "6", *base))
    ckpt = tmp_path / "checkpoint"
    shard = ckpt / "step-6" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])  # a partial write
    with pytest.raises(CheckpointError, match="step-6 is corrupt or incomplete: file __0_0.distcp has 100 bytes"):
        train(tiny_config(tmp_path, "--training.steps", "8", "--checkpoint.load_step", "6", *base))
    meta = ckpt / "step-4" / ".metadata"
    meta.write_bytes(b"\0" * meta.stat().st_size)  # same size, unreadable
    (ckpt / "step-8.tmp").mkdir()  # a save killed half-way
    capsys.readouterr()
    train(tiny_config(tmp_path, "--training.steps", "8", *base))
    out = capsys.readouterr().out
    assert "removing step-8.tmp" in out
    assert "step-6 is corrupt or incomplete (file __0_0.distcp has 100 bytes" in out
    assert "step-4 is corrupt or incomplete (loading failed" in out
    assert "resumed from" in out and "(step 2)" in out
    for step in (2, 4, 6, 8):
        (ckpt / f"step-{step}" / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="no loadable checkpoint in .*step-8: no manifest.json"):
        train(tiny_config(tmp_path, "--training.steps", "8", *base))


def test_exported_weights_load_with_weights_only_into_a_fresh_model(tmp_path):
    cfg = tiny_config(tmp_path, "--training.steps", "2", "--checkpoint.enable", "true",
                      "--checkpoint.export_on_finish", "true")
    train(cfg)
    on_finish = torch.load(tmp_path / "checkpoint" / "model.pt", weights_only=True)
    assert main(["export", "--checkpoint", str(tmp_path / "checkpoint"), "--out", str(tmp_path / "cli.pt")]) == 0
    from_cli = torch.load(tmp_path / "cli.pt", weights_only=True)
    model = build_model(cfg.model, cfg.training.seq_len, "cpu")
    model.load_state_dict(on_finish)
    assert from_cli.keys() == on_finish.keys()
    assert all(torch.equal(from_cli[k], on_finish[k]) for k in on_finish)
