"""Data parallelism and model wrappers on CPU: FSDP2 and HSDP over 2 gloo ranks, compile, activation
checkpointing. Each must train exactly like the plain single-process model."""

from __future__ import annotations

import shutil

import pytest
from trainer_runs import losses, run, tiny_config

from longhorn_zoo.parallelize import ParallelizeError
from longhorn_zoo.train import train

STEPS = 5


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    """A seed checkpoint and the single-process run (global batch 8) that starts from it."""
    root = tmp_path_factory.mktemp("one_rank")
    train(tiny_config(root / "seed", "--checkpoint.enable", "true", "--checkpoint.create_seed_checkpoint", "true"))
    dump = root / "run"
    shutil.copytree(root / "seed" / "checkpoint", dump / "checkpoint")
    train(tiny_config(dump, "--training.steps", str(STEPS), "--training.local_batch_size", "8",
                      "--checkpoint.enable", "true", "--checkpoint.interval", "1000"))
    return root, losses(dump)


@pytest.mark.slow
@pytest.mark.parametrize("mesh", [[], ["--parallelism.data_parallel_replicate_degree", "2"]], ids=["fsdp", "hsdp"])
def test_two_ranks_match_one_rank_at_the_same_global_batch(one_rank, tmp_path, mesh):
    root, expected = one_rank
    shutil.copytree(root / "seed" / "checkpoint", tmp_path / "checkpoint")
    run(tmp_path, "--training.steps", str(STEPS), "--training.local_batch_size", "4", "--checkpoint.enable", "true",
        "--checkpoint.interval", "1000", *mesh, nproc=2)
    got = losses(tmp_path)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert got == pytest.approx(expected, rel=2e-5), (got, expected)


@pytest.mark.slow
@pytest.mark.parametrize("mixer", ["llama", "longhorn"])
def test_compiled_blocks_train_like_eager(tmp_path, mixer):
    # aot_eager traces each block with fullgraph=True and runs AOT autograd; inductor's C++ build is too slow for CI
    args = ["--model.name", mixer, "--training.steps", "3"]
    eager = train(tiny_config(tmp_path / "eager", *args))
    compiled = train(tiny_config(tmp_path / "compiled", *args, "--compile.enable", "true",
                                 "--compile.backend", "aot_eager"))
    assert compiled["loss/train"] == pytest.approx(eager["loss/train"], rel=1e-5)
    assert compiled["grad_norm"] == pytest.approx(eager["grad_norm"], rel=1e-4)


@pytest.mark.parametrize("ac", [["full"], ["selective", "2"], ["selective", "op"]], ids="-".join)
def test_activation_checkpointing_does_not_change_training(tmp_path, ac):
    plain = train(tiny_config(tmp_path / "plain", "--training.steps", "3"))
    option = ["--activation_checkpoint.selective_ac_option", ac[1]] if len(ac) > 1 else []
    checkpointed = train(tiny_config(tmp_path / "ac", "--training.steps", "3", "--activation_checkpoint.mode", ac[0],
                                     *option))
    assert checkpointed["loss/train"] == plain["loss/train"]
    assert checkpointed["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-6)


def test_float8_without_a_capable_gpu_is_a_clear_error(tmp_path):
    with pytest.raises(ParallelizeError, match="float8.enable needs a CUDA GPU"):
        train(tiny_config(tmp_path, "--float8.enable", "true", "--training.device", "cpu"))
