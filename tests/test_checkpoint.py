"""DCP checkpoints on CPU: exact resume (2 gloo ranks), kill -9, SIGTERM, corrupt checkpoints, another
number of ranks, export."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zlib

import pytest
import torch
from trainer_runs import ROOT, TINY, command, env, losses, records, run, start, tiny_config

from longhorn_zoo.checkpoint import CheckpointError, main, verify
from longhorn_zoo.model import build_model
from longhorn_zoo.train import train


def wait_for(condition, proc, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended early:\n{proc.stdout.read()[-3000:]}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.slow
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


@pytest.mark.slow
def test_kill_9_during_training_then_resume_continues_exactly(tmp_path):
    args = ["--training.steps", "100000", "--lr_scheduler.decay_type", "constant", "--checkpoint.enable", "true",
            "--checkpoint.interval", "2", "--checkpoint.keep_latest_k", "2"]
    proc = start(tmp_path, *args)
    wait_for(lambda: len(records(tmp_path)) >= 9, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = losses(tmp_path)
    newest = max(int(p.name.split("-")[1]) for p in (tmp_path / "checkpoint").glob("step-*[0-9]"))
    # keep_latest_k = 2: the oldest goes only once the newest is complete, so a kill between the two
    # can leave one more
    assert len(list((tmp_path / "checkpoint").glob("step-*[0-9]"))) <= 3
    n_before = len(records(tmp_path))
    out = run(tmp_path, *args[2:], "--training.steps", str(newest + 3))
    assert f"(step {newest})" in out
    assert len(list((tmp_path / "checkpoint").glob("step-*[0-9]"))) == 2  # pruned again by the next save
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
    stopped = int(out.split("SIGTERM: stopped after step ")[1].split(",")[0])
    assert verify(tmp_path / "checkpoint" / f"step-{stopped}") is None


@pytest.mark.slow
def test_sigterm_to_run_train_sh_saves_and_exits_0_with_one_line(tmp_path):
    """torchrun, left to itself, stops with a SignalException traceback and status 1 after the worker saved."""
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    proc = subprocess.Popen(["./run_train.sh", *TINY, "--job.dump_folder", str(tmp_path), "--training.steps", "100000",
                             "--checkpoint.enable", "true", "--checkpoint.interval", "100000"],
                            cwd=ROOT, env={**env(), "PATH": path}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    wait_for(lambda: len(records(tmp_path)) >= 3, proc, timeout=180)
    os.kill(proc.pid, signal.SIGTERM)  # the script alone, as a scheduler signals the job's command
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-3000:]
    assert "Traceback" not in out and "SignalException" not in out, out[-3000:]
    lines = [line for line in out.splitlines() if "SIGTERM" in line]
    assert len(lines) == 1 and "SIGTERM: stopped after step" in lines[0], out[-3000:]
    stopped = int(lines[0].split("stopped after step ")[1].split(",")[0])
    assert verify(tmp_path / "checkpoint" / f"step-{stopped}") is None


def test_flipped_bytes_are_caught_by_the_checksums_and_the_run_falls_back(tmp_path, capsys):
    args = ["--training.steps", "6", "--checkpoint.enable", "true", "--checkpoint.interval", "3"]
    train(tiny_config(tmp_path / "a", *args))
    uninterrupted = records(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    step6 = tmp_path / "b" / "checkpoint" / "step-6"
    files = json.loads((step6 / "manifest.json").read_text())["files"]
    for name, entry in files.items():  # the checksums are those of the bytes on disk
        assert entry == {"bytes": (step6 / name).stat().st_size, "crc32": zlib.crc32((step6 / name).read_bytes())}
    shard = step6 / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4] = bytes(b ^ 0xFF for b in data[middle : middle + 4])  # same size, 4 bytes flipped
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    train(tiny_config(tmp_path / "b", *args, "--training.steps", "6"))
    out = capsys.readouterr().out
    assert "step-6 is corrupt or incomplete (file __0_0.distcp has CRC-32" in out
    assert "falling back to the previous checkpoint" in out and "resumed from" in out and "(step 3)" in out
    resumed = records(tmp_path / "b")[len(uninterrupted):]
    assert [r["step"] for r in resumed] == [4, 5, 6]
    assert [r["loss/train"] for r in resumed] == [r["loss/train"] for r in uninterrupted[3:]]


def test_the_last_line_says_where_outputs_went_and_a_finished_job_that_nothing_is_left(tmp_path, capsys):
    args = ["--training.steps", "2", "--checkpoint.enable", "true", "--metrics.enable_tensorboard", "true"]
    train(tiny_config(tmp_path, *args))
    # a load and a save without a process group, in a process of its own (pytest resets warning filters)
    proc = subprocess.run(command(tmp_path, *args, "--training.steps", "3"), cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torch.distributed is disabled" not in proc.stdout + proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("done: step 3, train loss ") and ", val loss " in last
    assert f"checkpoints in {tmp_path / 'checkpoint'}" in last and f"TensorBoard events in {tmp_path / 'tb'}" in last
    capsys.readouterr()
    assert train(tiny_config(tmp_path, *args, "--training.steps", "3")) == {}
    out = capsys.readouterr().out
    assert "nothing to do: the checkpoint of step 3" in out and "raise training.steps" in out


def test_corrupt_or_partial_checkpoints_fall_back_with_a_message_or_fail_clearly(tmp_path, capsys):
    base = ["--checkpoint.enable", "true", "--checkpoint.interval", "2"]
    train(tiny_config(tmp_path, "--training.steps", "6", *base))
    ckpt = tmp_path / "checkpoint"
    shard = ckpt / "step-6" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])  # a partial write
    with pytest.raises(CheckpointError, match="step-6 is corrupt or incomplete: file __0_0.distcp has 100 bytes"):
        train(tiny_config(tmp_path, "--training.steps", "8", "--checkpoint.load_step", "6", *base))
    meta = ckpt / "step-4" / ".metadata"
    meta.write_bytes(b"\0" * meta.stat().st_size)  # same size, unreadable, and its checksum made to match:
    manifest = json.loads((ckpt / "step-4" / "manifest.json").read_text())
    manifest["files"][".metadata"]["crc32"] = zlib.crc32(meta.read_bytes())
    (ckpt / "step-4" / "manifest.json").write_text(json.dumps(manifest))
    (ckpt / "step-8.tmp").mkdir()  # a save killed half-way
    capsys.readouterr()
    train(tiny_config(tmp_path, "--training.steps", "8", *base))
    out = capsys.readouterr().out
    assert "removing step-8.tmp" in out
    assert "step-6 is corrupt or incomplete (file __0_0.distcp has 100 bytes" in out
    assert "step-4 could not be loaded (" in out  # files as written, but not a checkpoint DCP can read
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
    model = build_model(cfg.model, cfg.training.seq_len, "cpu")
    model.load_state_dict(on_finish)
    # the same paths as longhorn_zoo.eval and longhorn_zoo.generate: the dump folder, the checkpoint folder, step-N
    for i, path in enumerate([tmp_path, tmp_path / "checkpoint", tmp_path / "checkpoint" / "step-2"]):
        assert main(["export", "--checkpoint", str(path), "--out", str(tmp_path / f"cli{i}.pt")]) == 0
        from_cli = torch.load(tmp_path / f"cli{i}.pt", weights_only=True)
        assert from_cli.keys() == on_finish.keys()
        assert all(torch.equal(from_cli[k], on_finish[k]) for k in on_finish)


RESHARD = ["--training.steps", "6", "--checkpoint.enable", "true", "--checkpoint.interval", "3"]


@pytest.mark.slow
def test_a_one_rank_checkpoint_resumes_on_two_ranks_where_it_left_off(tmp_path):
    train(tiny_config(tmp_path, *RESHARD, "--training.local_batch_size", "8"))  # global batch 8 on 1 rank
    uninterrupted = records(tmp_path)
    shutil.rmtree(tmp_path / "checkpoint" / "step-6")
    out = run(tmp_path, *RESHARD, "--training.local_batch_size", "4", nproc=2)  # the same global batch
    assert ("step-3 was saved on 1 rank and resumes on 2 ranks: global batch 8 (unchanged), model and optimizer "
            "resharded, data order: unchanged") in out
    assert "corrupt" not in out and "could not be loaded" not in out
    resumed = records(tmp_path)[len(uninterrupted):]
    assert [r["step"] for r in resumed] == [4, 5, 6]
    for a, b in zip(uninterrupted[3:], resumed):  # FSDP on 2 ranks sums in another order: close, not equal
        assert b["loss/train"] == pytest.approx(a["loss/train"], rel=2e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)


@pytest.mark.slow
def test_a_two_rank_checkpoint_resumes_on_one_rank_saying_what_changed(tmp_path, capsys):
    run(tmp_path, *RESHARD, "--training.local_batch_size", "4", nproc=2)  # global batch 8 on 2 ranks
    uninterrupted = records(tmp_path)
    shutil.rmtree(tmp_path / "checkpoint" / "step-6")
    capsys.readouterr()
    train(tiny_config(tmp_path, *RESHARD, "--training.local_batch_size", "8"))
    out = capsys.readouterr().out
    assert ("step-3 was saved on 2 ranks and resumes on 1 rank: global batch 8 (unchanged), model and optimizer "
            "resharded, data order: unchanged") in out
    resumed = records(tmp_path)[len(uninterrupted):]
    assert [r["step"] for r in resumed] == [4, 5, 6]
    for a, b in zip(uninterrupted[3:], resumed):
        assert b["loss/train"] == pytest.approx(a["loss/train"], rel=2e-5)
    shutil.rmtree(tmp_path / "checkpoint" / "step-6")
    train(tiny_config(tmp_path, *RESHARD, "--training.local_batch_size", "4"))  # the global batch halves: say so
    out = capsys.readouterr().out
    assert ("step-3 was saved on 2 ranks and resumes on 1 rank: global batch 8 -> 4, model and optimizer resharded, "
            "data order: new batches from the saved generator (4 sequences per draw over all ranks, was 8)") in out
