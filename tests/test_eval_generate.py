"""Evaluation and generation from the checkpoint of a tiny CPU run."""

from __future__ import annotations

import pytest
import torch

from longhorn_zoo import eval as evaluation
from longhorn_zoo import generate as generation
from longhorn_zoo.config import load_config
from longhorn_zoo.inference import load_trained
from longhorn_zoo.train import train

TINY = ["--model.dim", "32", "--model.n_layers", "2", "--training.local_batch_size", "4",
        "--training.seq_len", "16", "--training.steps", "4", "--checkpoint.enable", "true",
        "--checkpoint.interval", "4", "--metrics.log_freq", "2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One tiny trained run per mixer kind (attention with a KV cache, a recurrent state)."""
    out = {}
    for mixer in ("llama", "longhorn"):
        dump = tmp_path_factory.mktemp(mixer)
        train(load_config(None, [*TINY, "--model.name", mixer, "--job.dump_folder", str(dump)]))
        out[mixer] = dump
    return out


@pytest.mark.parametrize("mixer", ["llama", "longhorn"])
def test_prefill_then_steps_equals_the_full_forward(runs, mixer):
    model, _ = load_trained(runs[mixer])
    model = model.double()
    tokens = torch.randint(0, 256, (2, 11))
    full = model(tokens)
    logits, states = model(tokens[:, :5], return_states=True)
    torch.testing.assert_close(logits, full[:, :5])
    for t in range(5, 11):
        step_logits, states = model.step(tokens[:, t], states)
        torch.testing.assert_close(step_logits, full[:, t])


def test_greedy_generation_continues_with_the_argmax_of_the_full_forward(runs):
    model, _ = load_trained(runs["longhorn"])
    prompt = torch.randint(0, 256, (1, 6))
    out, stats = generation.generate(model, prompt, 5, temperature=0)
    seq = torch.cat([prompt, out], dim=1)
    expected = model(seq[:, :-1]).argmax(-1)[:, 5:]
    assert torch.equal(out, expected)
    assert stats["decode_tokens_per_s"] > 0


def test_sampling_filters_respect_top_k_and_top_p():
    logits = torch.tensor([[4.0, 3.0, 2.0, -1.0, -2.0]]).repeat(500, 1)
    gen = torch.Generator().manual_seed(0)
    assert set(generation.sample(logits, 1.0, 2, 1.0, gen).tolist()) == {0, 1}
    assert set(generation.sample(logits, 1.0, 0, 0.5, gen).tolist()) == {0}
    assert generation.sample(logits[:1], 0.0, 0, 1.0, gen).item() == 0


def test_generate_command_prints_text(runs, capsys):
    assert generation.main(["--checkpoint", str(runs["longhorn"]), "--prompt", "import ",
                            "--max-new-tokens", "8"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("import ") and "tokens/s" in captured.err


def test_eval_command_prints_extrapolation_table(runs, capsys, tmp_path):
    assert evaluation.main(["--checkpoint", str(runs["llama"]), "--tokens", "512", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    lengths = [int(line.split()[0]) for line in out.splitlines() if line.strip().endswith(tuple("0123456789"))
               and line.split()[0].isdigit()]
    assert lengths == [16, 32, 64, 128, 256]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (tmp_path / "tb_eval").glob("*/events.out.tfevents.*")
    acc = EventAccumulator(str(events.parent))
    acc.Reload()
    assert {f"eval/ppl_at_{n}" for n in lengths} | {"eval/val_loss"} <= set(acc.Tags()["scalars"])


def test_mqar_sweep_reports_accuracy_per_pairs_and_length(tmp_path):
    cfg = load_config(None, ["--model.name", "llama", "--model.dim", "32", "--model.n_layers", "1",
                             "--model.vocab_size", "64", "--data.dataset", "mqar", "--data.mqar_num_kv_pairs", "4",
                             "--training.seq_len", "16", "--training.local_batch_size", "4"])
    from longhorn_zoo.model import build_model

    model = build_model(cfg.model, 16, "cpu")
    model.init_weights()
    rows = evaluation.mqar_sweep(model, cfg, "cpu", batches=1)
    assert {(p, t) for p, t, _ in rows} >= {(4, 16), (8, 32)}
    assert all(0.0 <= acc <= 1.0 for *_, acc in rows)


def test_mqar_sweep_stops_at_a_learned_position_embedding():
    cfg = load_config(None, ["--model.name", "rwkv5", "--model.dim", "32", "--model.n_layers", "1",
                             "--model.mixer.head_size", "16", "--model.vocab_size", "64", "--data.dataset", "mqar",
                             "--data.mqar_num_kv_pairs", "4", "--training.seq_len", "16",
                             "--training.local_batch_size", "4"])
    from longhorn_zoo.model import build_model

    model = build_model(cfg.model, 16, "cpu")
    model.init_weights()
    assert model.max_positions == 16
    assert [(p, t) for p, t, _ in evaluation.mqar_sweep(model, cfg, "cpu", batches=1)] == [(2, 8), (2, 16), (4, 16)]


def test_missing_config_is_a_clear_error(tmp_path):
    assert evaluation.main(["--checkpoint", str(tmp_path)]) == 1
