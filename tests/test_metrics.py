"""Metrics writers: a TensorBoard folder per run, the first step logged, and the optional W&B backend."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
from trainer_runs import records, tiny_config

from longhorn_zoo.config import ConfigError
from longhorn_zoo.metrics import new_run_folder
from longhorn_zoo.train import train

FAKE_WANDB = '''
"""A stand-in for the wandb package: records what the trainer sends."""
runs = []


class Run:
    def __init__(self, **kwargs):
        self.init, self.logged, self.finished = kwargs, [], False

    def log(self, data, step):
        self.logged.append((step, dict(data)))

    def finish(self):
        self.finished = True


def init(**kwargs):
    runs.append(Run(**kwargs))
    return runs[-1]
'''


def tb_scalars(run_dir: Path) -> dict[str, list[int]]:
    """The steps logged for each scalar tag in one TensorBoard run folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_two_runs_in_one_dump_folder_get_separate_tensorboard_runs(tmp_path):
    for steps in ("3", "4"):
        train(tiny_config(tmp_path, "--training.steps", steps, "--metrics.log_freq", "2",
                          "--metrics.enable_tensorboard"))
    runs = sorted(p for p in (tmp_path / "tb").iterdir())
    assert len(runs) == 2, runs
    logged = [tb_scalars(run)["loss/train"] for run in runs]
    assert logged == [[1, 2, 3], [1, 2, 4]]  # the first step, every log_freq, the last
    assert [r["step"] for r in records(tmp_path)] == [1, 2, 3, 1, 2, 4]


def test_run_folders_do_not_collide_within_one_second(tmp_path):
    folders = [new_run_folder(tmp_path) for _ in range(3)]
    assert len(set(folders)) == 3 and all(f.is_dir() and f.parent == tmp_path for f in folders)


def test_wandb_gets_the_scalars_of_every_log_step(tmp_path, monkeypatch):
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "wandb.py").write_text(textwrap.dedent(FAKE_WANDB))
    monkeypatch.syspath_prepend(str(tmp_path / "fake"))
    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    monkeypatch.setenv("WANDB_PROJECT", "zoo-test")
    dump = tmp_path / "dump"
    last = train(tiny_config(dump, "--training.steps", "3", "--metrics.log_freq", "2", "--metrics.enable_wandb"))
    import wandb

    assert wandb.__file__ == str(tmp_path / "fake" / "wandb.py")
    (run,) = wandb.runs
    assert run.init["project"] == "zoo-test" and run.init["dir"] == str(dump)
    assert run.init["config"]["model"]["name"] == "llama" and run.finished
    jsonl = records(dump)
    train_logs = [(step, data) for step, data in run.logged if "loss/train" in data]
    assert [step for step, _ in train_logs] == [r["step"] for r in jsonl] == [1, 2, 3]
    for (_, data), rec in zip(train_logs, jsonl):
        assert data == {k: v for k, v in rec.items() if k != "step"}
    assert run.logged[-1] == (3, {"loss/val": last["loss/val"]})


def test_wandb_without_the_package_names_the_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(ConfigError, match=r"metrics.enable_wandb = true needs the wandb package: pip install wandb"):
        train(tiny_config(tmp_path, "--training.steps", "1", "--metrics.enable_wandb", "true"))
