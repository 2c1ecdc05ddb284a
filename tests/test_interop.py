"""Model folders and the transformers model: export, load back, generate, remote code, multi-rank checkpoints.

Needs the ``hf`` extra (transformers, safetensors, tokenizers); skipped without it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")

import longhorn_zoo.hf  # noqa: E402, F401  (registers the Auto classes)
from longhorn_zoo import export  # noqa: E402
from longhorn_zoo.config import load_config  # noqa: E402
from longhorn_zoo.data.tokenizer import ByteTokenizer  # noqa: E402
from longhorn_zoo.generate import generate  # noqa: E402
from longhorn_zoo.hf import LonghornZooForCausalLM  # noqa: E402
from longhorn_zoo.inference import load_trained  # noqa: E402
from longhorn_zoo.model import LM, build_model  # noqa: E402
from longhorn_zoo.model_folder import FolderError, load_folder, parse_size, read_weights, save_folder  # noqa: E402
from longhorn_zoo.registry import get_registry  # noqa: E402

BUILT_IN = ["llama", "longhorn", "mamba", "gla", "retnet", "rwkv", "rwkv5"]
THIRD_PARTY = pytest.param("deltanet", marks=pytest.mark.skipif(
    "deltanet" not in get_registry().mixers, reason="pip install examples/third_party_mixer"))
STACK = "longhorn+llama"
MIXERS = [*BUILT_IN, THIRD_PARTY, STACK]
SEQ = 32
STACK_ARGS = ["--model.pattern", '["longhorn", "llama"]', "--model.n_layers", "4",
              "--model.mixers.longhorn.d_state", "8", "--model.mixers.llama.n_heads", "2",
              "--model.mixers.llama.mlp_ratio", "2.0", "--model.mixers.longhorn.mlp", "true",
              "--model.mixers.longhorn.mlp_activation", "gelu"]
"""A four-block stack, longhorn then llama twice, whose tables all differ from their plugins' defaults."""


def tiny(mixer: str, *overrides: str, seed: int = 0) -> tuple[LM, object]:
    """A tiny byte-level model of ``mixer`` (or of :data:`STACK`), built as the trainer builds it, with its
    weights spread out.

    The noise added to the initial weights makes greedy decoding vary from token to token.
    """
    kind = STACK_ARGS if mixer == STACK else ["--model.name", mixer, "--model.n_layers", "2"]
    cfg = load_config(None, [*kind, "--model.dim", "64", "--training.seq_len", str(SEQ), *overrides])
    torch.manual_seed(seed)
    model = build_model(cfg.model, SEQ, "meta")
    model.to_empty(device="cpu")
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * p.std().nan_to_num(0.0).clamp_min(0.02))
    return model.eval(), cfg


def hf_model(folder: Path) -> LonghornZooForCausalLM:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    model.generation_config.eos_token_id = None  # decode every token, as longhorn_zoo.generate does
    return model.eval()


@pytest.mark.parametrize("mixer", MIXERS)
def test_exported_folder_gives_the_training_logits_in_our_lm_and_in_transformers(tmp_path, mixer):
    model, cfg = tiny(mixer)
    save_folder(model, cfg, tmp_path, ByteTokenizer())
    tokens = torch.randint(0, 256, (2, 19))
    with torch.no_grad():
        expected = model(tokens)
        ours, config = load_folder(tmp_path)
        assert torch.equal(ours(tokens), expected)
        theirs = hf_model(tmp_path)
        assert isinstance(theirs, LonghornZooForCausalLM) and theirs.dtype == torch.float32
        torch.testing.assert_close(theirs(tokens).logits, expected, rtol=0, atol=1e-6)
    assert config["mixer"] == mixer and config.get("mixer_options") == (cfg.model.mixer or None)
    assert (config.get("pattern"), config.get("mixers")) == (cfg.model.pattern or None, cfg.model.mixers or None)
    assert config["tokenizer"] == "bytes" and config["eos_token_id"] == 0


def test_a_stacks_folder_builds_its_blocks_with_each_mixers_options_and_mlp(tmp_path):
    model, cfg = tiny(STACK)
    save_folder(model, cfg, tmp_path, ByteTokenizer())
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["pattern"] == ["longhorn", "llama"] and config["mixers"] == cfg.model.mixers
    assert set(config["plugins"]) == {"longhorn", "llama"} and "plugin" not in config
    assert not {"mixer_options", "mlp", "mlp_ratio", "mlp_activation"} & config.keys()
    theirs = hf_model(tmp_path)
    assert [type(b.mixer).__name__ for b in theirs.model.layers.values()] == ["Longhorn", "Attention"] * 2
    assert theirs.model.kinds == model.kinds  # the same mixers, options and MLP in every block
    layers = theirs.model.layers
    assert layers["1"].mixer.n_heads == 2 and layers["0"].mixer.d_state == 8
    assert (layers["0"].mlp.w1.out_features, layers["1"].mlp.w1.out_features) == (192, 128)


def test_tied_embeddings_are_stored_once_and_tied_again_on_load(tmp_path):
    model, cfg = tiny("llama", "--model.tie_embeddings", "true")
    save_folder(model, cfg, tmp_path, ByteTokenizer())
    assert "output.weight" not in read_weights(tmp_path)
    ours, _ = load_folder(tmp_path)
    theirs = hf_model(tmp_path)
    assert ours.output.weight is ours.tok_embeddings.weight
    assert theirs.model.output.weight is theirs.model.tok_embeddings.weight
    tokens = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        assert torch.equal(ours(tokens), model(tokens))
        torch.testing.assert_close(theirs(tokens).logits, model(tokens), rtol=0, atol=1e-6)


def test_a_model_built_from_its_config_is_initialised_as_the_trainer_initialises_it():
    _, cfg = tiny("llama")
    config = longhorn_zoo.hf.LonghornZooConfig(mixer="llama", mixer_options=cfg.model.mixer, dim=64, n_layers=2,
                                                max_seq_len=SEQ, mlp=cfg.model.mlp)
    theirs = LonghornZooForCausalLM(config)
    ours = build_model(cfg.model, SEQ, "meta")
    ours.to_empty(device="cpu")
    torch.manual_seed(5)
    theirs.initialize_weights()
    torch.manual_seed(5)
    ours.init_weights()
    expected = dict(ours.named_buffers()) | ours.state_dict()
    got = dict(theirs.model.named_buffers()) | theirs.model.state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in expected)


def test_weights_past_the_shard_size_are_split_and_read_back(tmp_path):
    model, cfg = tiny("longhorn")
    save_folder(model, cfg, tmp_path, ByteTokenizer(), max_shard_size=parse_size("64KB"))
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(shards) > 2 and not (tmp_path / "model.safetensors").exists()
    assert sorted(set(index["weight_map"].values())) == shards
    assert set(index["weight_map"]) == {f"model.{k}" for k in model.state_dict()}
    tokens = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert torch.equal(load_folder(tmp_path)[0](tokens), model(tokens))
        torch.testing.assert_close(hf_model(tmp_path)(tokens).logits, model(tokens), rtol=0, atol=1e-6)
    save_folder(model, cfg, tmp_path, ByteTokenizer())  # one file again: the old shards go
    assert [p.name for p in tmp_path.glob("model*.safetensors")] == ["model.safetensors"]


def test_sizes_parse_in_decimal_and_binary_units():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("64KiB") == 65536 and parse_size("1000") == 1000
    with pytest.raises(FolderError, match="'five' is not a size"):
        parse_size("five")


@pytest.mark.parametrize("mixer", MIXERS)
def test_transformers_generate_equals_our_greedy_decoding_through_the_recurrent_state(tmp_path, mixer, monkeypatch):
    model, cfg = tiny(mixer)
    save_folder(model, cfg, tmp_path, ByteTokenizer())
    theirs = hf_model(tmp_path)
    prompt = torch.randint(1, 256, (2, 7))
    expected, _ = generate(model, prompt, 12, temperature=0)
    steps = []
    step = LM.step
    monkeypatch.setattr(LM, "step", lambda self, token, states: steps.append(token.shape) or step(self, token, states))
    got = theirs.generate(prompt, max_new_tokens=12, do_sample=False)
    assert torch.equal(got[:, :7], prompt)
    assert torch.equal(got[:, 7:], expected), (got[:, 7:].tolist(), expected.tolist())
    assert steps == [torch.Size([2])] * 11  # one prefill, then one recurrent step per new token


def test_left_padding_and_beam_search_are_refused(tmp_path):
    model, cfg = tiny("longhorn")
    save_folder(model, cfg, tmp_path, ByteTokenizer())
    theirs = hf_model(tmp_path)
    tokens = torch.randint(1, 256, (2, 5))
    right = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with torch.no_grad():  # right padding leaves the logits of the real tokens exact
        torch.testing.assert_close(theirs(tokens, attention_mask=right).logits, model(tokens), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="left padding"):
        theirs(tokens, attention_mask=right.flip(1))
    with pytest.raises(ValueError, match="beam search"):
        theirs.generate(tokens, max_new_tokens=2, num_beams=2)


@pytest.mark.parametrize("mixer", ["gla", STACK])
def test_the_folder_loads_with_trust_remote_code_alone(tmp_path, mixer):
    model, cfg = tiny(mixer)
    save_folder(model, cfg, tmp_path / "model", ByteTokenizer())
    tokens = torch.randint(0, 256, (1, 8))
    torch.save({"tokens": tokens, "logits": model(tokens).detach()}, tmp_path / "expected.pt")
    script = ("import sys, torch\nfrom transformers import AutoModelForCausalLM\n"
              "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)\n"
              "e = torch.load(sys.argv[2])\n"
              "print(type(m).__name__, float((m(e['tokens']).logits - e['logits']).abs().max()))\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "model"), str(tmp_path / "expected.pt")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    name, diff = out.stdout.split()
    assert name == "LonghornZooForCausalLM" and float(diff) <= 1e-6


@pytest.mark.parametrize("mixer", ["mamba", STACK])
def test_a_missing_plugin_is_named_with_its_distribution(tmp_path, mixer):
    model, cfg = tiny(mixer)
    save_folder(model, cfg, tmp_path, ByteTokenizer())
    config = json.loads((tmp_path / "config.json").read_text())
    plugin = {"distribution": "lz-hyena", "version": "0.3"}
    if cfg.model.pattern:  # the stack's llama becomes hyena
        config["pattern"] = ["longhorn", "hyena"]
        config["mixers"]["hyena"], config["plugins"]["hyena"] = config["mixers"].pop("llama"), plugin
    else:
        config["mixer"], config["plugin"] = "hyena", plugin
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(FolderError, match=r"(?s)unknown mixer .hyena.*pip install lz-hyena==0.3"):
        load_folder(tmp_path)


def test_a_stack_table_without_its_mlp_keys_is_an_error_naming_them(tmp_path):
    model, cfg = tiny(STACK)
    save_folder(model, cfg, tmp_path, ByteTokenizer())
    config = json.loads((tmp_path / "config.json").read_text())
    del config["mixers"]["llama"]["mlp"], config["mixers"]["llama"]["mlp_hidden"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(FolderError, match=r"mixers.llama \(the table of mixer 'llama'.*lacks mlp, mlp_hidden"):
        load_folder(tmp_path)


def test_export_command_converts_a_checkpoint_written_by_two_ranks(tmp_path):
    from trainer_runs import run

    run(tmp_path / "run", "--training.steps", "2", "--checkpoint.enable", "true", "--checkpoint.export_on_finish",
        "true", nproc=2)
    gathered = torch.load(tmp_path / "run" / "checkpoint" / "model.pt", weights_only=True)  # gathered by FSDP
    assert export.main(["--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "model")]) == 0
    weights = read_weights(tmp_path / "model")
    assert weights.keys() == gathered.keys()
    assert all(torch.equal(weights[k], gathered[k]) for k in gathered)
    trained, _ = load_trained(tmp_path / "run")
    folder_model, config = load_folder(tmp_path / "model")
    tokens = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        assert torch.equal(folder_model(tokens), trained(tokens))
    assert config["tokenizer"] == "bytes" and (tmp_path / "model" / "tokenizer.json").is_file()


def test_export_command_reports_a_missing_checkpoint(tmp_path, capsys):
    assert export.main(["--checkpoint", str(tmp_path), "--out", str(tmp_path / "model")]) == 1
    assert "config.toml" in capsys.readouterr().err
