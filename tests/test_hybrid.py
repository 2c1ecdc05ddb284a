"""Hybrid stacks (model.pattern): the config, the model, and a two-mixer stack end to end on CPU."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from longhorn_zoo import eval as evaluation
from longhorn_zoo import generate as generation
from longhorn_zoo.config import BLOCK_KEYS, ConfigError, Model, load_config, to_toml
from longhorn_zoo.conformance import Conformance, ConformanceError, MixerConformance
from longhorn_zoo.inference import load_trained
from longhorn_zoo.model import build_model, flops_per_token
from longhorn_zoo.train import train

STACK = ["--model.pattern", '["longhorn", "llama"]']
TINY = [*STACK, "--model.dim", "32", "--model.n_layers", "4", "--model.mixers.llama.n_heads", "2",
        "--training.local_batch_size", "4", "--training.seq_len", "16", "--lr_scheduler.warmup_steps", "3",
        "--optimizer.lr", "3e-3", "--metrics.log_freq", "1", "--metrics.enable_tensorboard", "false",
        "--metrics.enable_jsonl", "true"]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.toml"
    path.write_text(text)
    return path


def test_each_mixer_of_a_stack_gets_its_plugin_defaults_under_the_users_values(tmp_path):
    path = write(tmp_path, '[model]\npattern = ["longhorn", "longhorn", "llama"]\nn_layers = 6\n'
                           "[model.mixers.llama]\nn_heads = 2\nmlp = false\n")
    cfg = load_config(path, ["--model.mixers.longhorn.d_state", "8"])
    m = cfg.model
    assert m.name == "longhorn+llama"
    assert m.block_mixers() == ["longhorn", "longhorn", "llama"] * 2
    mlp = {"mlp_ratio": 8 / 3, "mlp_activation": "silu", "mlp_multiple_of": 64, "mlp_hidden": 0,
           "mlp_depth_scaled_init": True}  # the block keys' defaults
    assert m.mixers["longhorn"] == {"mlp": False, **mlp, "d_state": 8, "expand": 2, "conv_kernel": 4,
                                    "dt_rank": 0, "init": "mamba_ssm"}  # mlp = false: plugins/longhorn/defaults.toml
    assert m.mixers["llama"] == {"mlp": False, **mlp, "n_heads": 2, "rope_theta": 10000.0}
    assert load_config(write(tmp_path, to_toml(cfg))) == cfg  # --print-config round-trips (config.toml, resume)
    assert "name =" not in to_toml(cfg).split("[model]")[1].split("[")[0]


def test_one_mixer_configs_write_no_stack_keys(tmp_path):
    cfg = load_config(None, ["--model.name", "mamba"])
    assert (cfg.model.pattern, cfg.model.mixers) == ([], {})
    assert cfg.model.block_mixers() == ["mamba"] * cfg.model.n_layers
    assert "pattern" not in to_toml(cfg) and "mixers" not in to_toml(cfg)


@pytest.mark.parametrize(
    ("text", "overrides", "match"),
    [
        ('[model]\npattern = ["longhorn", "lama"]\n', [], r"model.pattern\[1\]: unknown mixer 'lama'.*'llama'"),
        ('[model]\npattern = "longhorn"\n', [], r"model.pattern = 'longhorn' has type str, expected list"),
        ("[model]\npattern = [1, 'llama']\n", [], r"model.pattern\[0\] = 1 is not a mixer name"),
        ("[model]\npattern = ['llama', 'llama']\n", [], r"names one mixer.*set model.name = 'llama'"),
        ("[model]\npattern = ['longhorn', 'llama']\nn_layers = 3\n", [],
         r"model.n_layers = 3 is not a multiple of the 2 blocks of model.pattern.*such as 2 or 4,"),
        ("[model]\nname = 'llama'\npattern = ['longhorn', 'llama']\n", [], r"model.name is for one mixer"),
        ("[model]\nmlp = false\n", STACK, r"model.mlp is for one mixer.*\[model.mixers.<name>\] mlp = "),
        ("[model.mixer]\nn_heads = 2\n", STACK, r"model.mixer is for one mixer.*use \[model.mixers.<name>\]"),
        ("[model.mixers.mamba]\nd_state = 4\n", STACK, r"\[model.mixers.mamba\]: 'mamba' is not in model.pattern"),
        ("[model.mixers.llama]\nn_head = 2\n", STACK,
         r"unknown key model.mixers.llama.n_head for mixer 'llama'; valid keys: mlp, mlp_activation, .*n_heads.*"
         r"'n_heads'"),
        ("[model.mixers.llama]\nmlp = 'yes'\n", STACK, r"model.mixers.llama.mlp = 'yes' has type str, expected bool"),
        ("[model.mixers]\nllama = 3\n", STACK, r"model.mixers must hold one table per mixer"),
        ("[model.mixers.longhorn]\nmlp_multiple_of = 0\n", STACK,
         r"model.mixers.longhorn.mlp_multiple_of = 0 is out of range: it must be >= 1"),
        ("[model.mixers.llama]\nmlp_activation = 'relu'\n", STACK,
         r"model.mixers.llama.mlp_activation = 'relu' is not valid; choose one of silu, gelu"),
        ("", [*STACK, "--model.mixers.llama.n_heads", "two"], r"--model.mixers.llama.n_heads: 'two' is not a number"),
        ("[model.mixers.llama]\nn_heads = 2\n", ["--model.name", "llama"],
         r"\[model.mixers.llama\] is for hybrid stacks.*go in \[model.mixer\]"),
    ],
)
def test_bad_stacks_are_config_errors_naming_the_key(tmp_path, text, overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(write(tmp_path, text), overrides)


BAD_BLOCK_VALUES = {"mlp_activation": "relu", "mlp_ratio": "-1", "mlp_multiple_of": "0", "mlp_hidden": "-1"}


def test_every_checked_block_key_has_a_bad_value_below():
    checked = {f.name for f in dataclasses.fields(Model)
               if f.name in BLOCK_KEYS and (f.metadata["choices"] or f.metadata["valid"])}
    assert checked == set(BAD_BLOCK_VALUES)


@pytest.mark.parametrize(("key", "bad"), BAD_BLOCK_VALUES.items())
def test_a_stacks_block_keys_are_checked_as_the_model_keys_of_one_mixer_are(key, bad):
    with pytest.raises(ConfigError) as one:
        load_config(None, ["--model.name", "llama", f"--model.{key}", bad])
    with pytest.raises(ConfigError) as stack:
        load_config(None, [*STACK, f"--model.mixers.llama.{key}", bad])
    assert str(stack.value).startswith(f"model.mixers.llama.{key} = ")
    assert str(stack.value).split(f"model.mixers.llama.{key}", 1)[1] == str(one.value).split(f"model.{key}", 1)[1]


def test_a_stack_builds_each_kind_with_its_options_and_mlp_and_sums_their_flops():
    cfg = load_config(None, [*STACK, "--model.n_layers", "4", "--model.mixers.llama.n_heads", "2"])
    model = build_model(cfg.model, 64)
    kinds = [(type(b.mixer).__name__, b.mlp is not None) for b in model.layers.values()]
    assert kinds == [("Longhorn", False), ("Attention", True)] * 2
    assert model.layers["1"].mixer.n_heads == 2

    def per_block(name: str, *extra: str) -> float:
        """One block's FLOPs per token in a 4-block model of the one mixer ``name``."""
        one = build_model(load_config(None, ["--model.name", name, "--model.n_layers", "4", *extra]).model, 64)
        return (flops_per_token(one, 64) - 2.0 * one.args.dim * one.args.vocab_size) / 4

    head = 2.0 * model.args.dim * model.args.vocab_size
    expected = 2 * per_block("longhorn") + 2 * per_block("llama", "--model.mixer.n_heads", "2") + head
    assert flops_per_token(model, 64) == pytest.approx(expected, rel=1e-12)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-block longhorn/llama stack trained 20 steps with checkpoints at 10 and 20, then resumed from 10."""
    dump = tmp_path_factory.mktemp("stack")
    args = [*TINY, "--training.steps", "20", "--checkpoint.enable", "true", "--checkpoint.interval", "10",
            "--job.dump_folder", str(dump)]
    train(load_config(None, args))
    first = [json.loads(line) for line in (dump / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(dump / "checkpoint" / "step-20")
    train(load_config(dump / "config.toml", ["--checkpoint.enable", "true"]))
    resumed = [json.loads(line) for line in (dump / "metrics.jsonl").read_text().splitlines()][len(first):]
    return dump, first, resumed


def test_a_stack_trains_with_falling_loss_and_resumes_exactly(trained):
    _, first, resumed = trained
    assert first[-1]["loss/train"] < first[0]["loss/train"] - 0.5, (first[0], first[-1])
    assert [r["step"] for r in resumed] == list(range(11, 21))
    for a, b in zip(first[10:], resumed):
        assert (a["loss/train"], a["grad_norm"]) == (b["loss/train"], b["grad_norm"])


def test_a_stack_generates_what_its_forward_predicts(trained):
    model, cfg = load_trained(trained[0])
    assert cfg.model.pattern == ["longhorn", "llama"]
    model = model.double()
    tokens = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(0))
    full = model(tokens)
    logits, states = model(tokens[:, :5], return_states=True)
    assert isinstance(states[1], tuple) and states[1][0].shape[2] == 5  # the attention blocks' KV cache
    torch.testing.assert_close(logits, full[:, :5])
    for t in range(5, 11):
        step_logits, states = model.step(tokens[:, t], states)
        torch.testing.assert_close(step_logits, full[:, t])
    prompt = tokens[:1, :6]
    out, _ = generation.generate(model, prompt, 5, temperature=0)
    assert torch.equal(out, model(torch.cat([prompt, out], 1)[:, :-1]).argmax(-1)[:, 5:])


def test_a_stack_evaluates_at_every_length(trained, tmp_path, capsys):
    numbers = tmp_path / "numbers.json"
    assert evaluation.main(["--checkpoint", str(trained[0]), "--tokens", "256", "--out", str(tmp_path),
                            "--json", str(numbers)]) == 0
    result = json.loads(numbers.read_text())
    assert result["mixer"] == "longhorn+llama" and result["n_layers"] == 4
    assert [e["length"] for e in result["extrapolation"]] == [16, 32, 64, 128, 256]
    assert all(math.isfinite(e["loss"]) for e in result["extrapolation"])
    assert "longhorn+llama" in capsys.readouterr().out


def test_a_trained_stack_exports_as_a_model_folder_with_its_logits(trained, tmp_path):
    pytest.importorskip("safetensors")
    pytest.importorskip("tokenizers")
    from longhorn_zoo import export
    from longhorn_zoo.model_folder import load_folder

    assert export.main(["--checkpoint", str(trained[0]), "--out", str(tmp_path)]) == 0  # longhorn-zoo hf-export
    folder_model, config = load_folder(tmp_path)
    model, cfg = load_trained(trained[0])
    assert (config["mixer"], config["pattern"], config["mixers"]) == ("longhorn+llama", cfg.model.pattern,
                                                                      cfg.model.mixers)
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(folder_model(tokens), model(tokens))


@pytest.mark.parametrize("wrapper", [pytest.param(["--compile.enable", "true", "--compile.backend", "aot_eager"],
                                                  id="compile", marks=pytest.mark.slow),
                                     pytest.param(["--activation_checkpoint.mode", "full"], id="ac")])
def test_a_stack_trains_the_same_under_compile_and_activation_checkpointing(tmp_path, wrapper):
    args = [*TINY, "--model.n_layers", "2", "--training.steps", "3"]  # one block of each kind
    plain = train(load_config(None, [*args, "--job.dump_folder", str(tmp_path / "plain")]))
    wrapped = train(load_config(None, [*args, *wrapper, "--job.dump_folder", str(tmp_path / "wrapped")]))
    assert wrapped["loss/train"] == pytest.approx(plain["loss/train"], rel=1e-5)
    assert wrapped["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-4)


class TestStackConformance(MixerConformance):
    """The conformance suite on a two-mixer stack: the mixer-level checks run on its blocks in order."""

    mixer = "longhorn+llama"
    options = {"llama": {"n_heads": 2}}


def test_a_stack_takes_one_options_table_per_mixer():
    c = Conformance("longhorn+llama+longhorn", n_layers=2, options={"llama": {"mlp": False}})
    assert c.n_layers == 3 and [s.name for s in c.specs] == ["longhorn", "llama"]
    assert [(i, k.spec.name, k.mlp) for i, k in c.kinds()] == [(0, "longhorn", False), (1, "llama", False)]
    with pytest.raises(ConformanceError, match=r"options of a stack are one table per mixer.*'n_heads' = 2"):
        Conformance("longhorn+llama", options={"n_heads": 2}).model()


def test_the_conformance_command_checks_a_stack():
    proc = subprocess.run([sys.executable, "-m", "longhorn_zoo.conformance", "longhorn+llama", "-q",
                           "-k", "test_step or test_state_split"], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 passed" in proc.stdout
