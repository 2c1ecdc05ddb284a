"""End-to-end training on CPU: falling loss, TensorBoard events, repeatability, clear failures."""

from __future__ import annotations

import pytest
import torch

from longhorn_zoo.config import load_config
from longhorn_zoo.data import IGNORE
from longhorn_zoo.model import LM, build_model
from longhorn_zoo.optim import build_optimizer, lr_factor
from longhorn_zoo.train import TrainingError, build_loss, cross_entropy, loss_and_accuracy, train

TINY = ["--model.dim", "32", "--model.n_layers", "2", "--training.local_batch_size", "8",
        "--training.seq_len", "32", "--metrics.log_freq", "5", "--lr_scheduler.warmup_steps", "3"]


def tiny(tmp_path, *extra: str):
    return load_config(None, [*TINY, "--job.dump_folder", str(tmp_path), *extra])


@pytest.mark.parametrize("mixer", ["llama", "longhorn"])
def test_loss_falls_and_tensorboard_events_are_written(tmp_path, mixer):
    cfg = tiny(tmp_path, "--model.name", mixer, "--training.steps", "30", "--optimizer.lr", "3e-3")
    first = tiny(tmp_path / "first", "--model.name", mixer, "--training.steps", "5", "--optimizer.lr", "3e-3")
    start = train(first)["loss/train"]
    end = train(cfg)["loss/train"]
    assert end < start - 0.5, (start, end)
    assert list((tmp_path / "tb").glob("*/events.out.tfevents.*"))


def test_same_seed_repeats_the_run_exactly(tmp_path):
    a = train(tiny(tmp_path / "a", "--training.steps", "5"))
    b = train(tiny(tmp_path / "b", "--training.steps", "5"))
    assert a["loss/train"] == b["loss/train"] and a["grad_norm"] == b["grad_norm"]


def test_gradient_accumulation_matches_one_large_batch(tmp_path, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    halves = [{"inputs": t, "labels": t.roll(-1, 1)} for t in torch.randint(0, 256, (2, 4, 32), generator=gen)]
    whole = {k: torch.cat([halves[0][k], halves[1][k]]) for k in halves[0]}

    class Fixed:
        def __init__(self, batches):
            self.it = iter(batches * 10)

        def __next__(self):
            return next(self.it)

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    def loader_of(batches):
        return lambda *a, **k: Fixed(batches)

    monkeypatch.setattr("longhorn_zoo.train.build_dataloader", loader_of([whole]))
    big = train(tiny(tmp_path / "big", "--training.steps", "3", "--training.local_batch_size", "8"))
    monkeypatch.setattr("longhorn_zoo.train.build_dataloader", loader_of(halves))
    acc = train(tiny(tmp_path / "acc", "--training.steps", "3", "--training.local_batch_size", "4",
                     "--training.global_batch_size", "8"))
    assert acc["grad_norm"] == pytest.approx(big["grad_norm"], rel=1e-4)
    assert acc["loss/train"] == pytest.approx(big["loss/train"], rel=1e-4)


def test_bad_global_batch_is_a_clear_error(tmp_path):
    with pytest.raises(TrainingError, match="global_batch_size 12 is not a multiple of"):
        train(tiny(tmp_path, "--training.global_batch_size", "12"))


def test_non_finite_loss_stops_the_run_naming_the_step_before_the_optimizer_steps(tmp_path, monkeypatch):
    import longhorn_zoo.train as train_module

    original = LM.init_weights

    def poisoned(self):
        original(self)
        with torch.no_grad():
            self.output.weight.fill_(float("nan"))

    stepped = []
    build_optimizer = train_module.build_optimizer

    def recording(*args, **kwargs):
        optimizer = build_optimizer(*args, **kwargs)
        step = type(optimizer).step

        def recorded(self, *a, **k):
            stepped.append(True)
            return step(self, *a, **k)

        monkeypatch.setattr(type(optimizer), "step", recorded)
        return optimizer

    monkeypatch.setattr(LM, "init_weights", poisoned)
    monkeypatch.setattr(train_module, "build_optimizer", recording)
    with pytest.raises(TrainingError, match="loss is nan at step 1"):
        train(tiny(tmp_path, "--training.steps", "3"))
    assert stepped == []


def test_schedules_warm_up_then_decay_to_the_floor():
    cfg = load_config(None, ["--lr_scheduler.warmup_steps", "10", "--lr_scheduler.min_lr_ratio", "0.1"]).lr_scheduler
    assert lr_factor(0, 100, cfg) == pytest.approx(0.1)
    assert lr_factor(9, 100, cfg) == pytest.approx(1.0)
    assert lr_factor(100, 100, cfg) == pytest.approx(0.1)
    cfg.decay_type = "wsd"
    assert lr_factor(50, 100, cfg) == 1.0
    assert lr_factor(100, 100, cfg) == pytest.approx(0.1)
    assert 0.1 < lr_factor(95, 100, cfg) < 1.0


def test_each_adamw_implementation_sets_its_torch_flag_and_steps_like_the_others():
    cfg = load_config(None, TINY)
    first = build_model(cfg.model, cfg.training.seq_len, "cpu")
    first.init_weights()
    start = first.state_dict()
    tokens = torch.randint(0, 256, (2, 4, 33), generator=torch.Generator().manual_seed(0))
    stepped = {}
    for implementation, flags in {"fused": (True, None), "foreach": (None, True), "for-loop": (False, False)}.items():
        model = build_model(cfg.model, cfg.training.seq_len, "cpu")
        model.load_state_dict(start)
        cfg.optimizer.implementation = implementation
        optimizer = build_optimizer(model, cfg.optimizer)
        assert [(g["fused"], g["foreach"]) for g in optimizer.param_groups] == [flags, flags]
        for batch in tokens:  # two steps, so the second uses the first's moments
            cross_entropy(model(batch[:, :-1]), batch[:, 1:]).backward()
            optimizer.step()
            optimizer.zero_grad()
        stepped[implementation] = model.state_dict()
    for implementation in ("foreach", "for-loop"):
        for name, value in stepped["fused"].items():
            torch.testing.assert_close(stepped[implementation][name], value, msg=f"{implementation}: {name}")
    assert not torch.equal(stepped["fused"]["output.weight"], start["output.weight"])


def test_tied_embeddings_stay_tied_after_materialising_from_meta():
    """Module.to_empty replaces each module's Parameter, so a meta-built model with tied embeddings
    came out with an LM head that was never initialised; LM.to_empty ties them again."""
    from longhorn_zoo.model import build_model

    cfg = load_config(None, ["--model.name", "llama", "--model.dim", "32", "--model.n_layers", "1",
                             "--model.tie_embeddings", "true"])
    model = build_model(cfg.model, 16, "meta")
    model.to_empty(device="cpu")
    model.init_weights()
    assert model.output.weight is model.tok_embeddings.weight
    assert len(list(model.parameters())) == len({id(p) for p in model.parameters()})
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 16))
    model(tokens).sum().backward()
    assert model.tok_embeddings.weight.grad is not None


def test_compiled_loss_matches_the_eager_loss_and_its_gradient():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 7, 19, generator=gen, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, 19, (2, 7), generator=gen)
    labels[0, :3] = IGNORE
    cfg = load_config(None, ["--compile.enable", "true", "--compile.backend", "aot_eager"])  # inductor: slow on CPU
    losses, grads = [], []
    for loss_fn in (cross_entropy, build_loss(cfg)):
        loss, correct, scored = loss_and_accuracy(logits, labels, loss_fn)
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, logits)[0])
        assert scored == 11 and correct == int((logits.argmax(-1) == labels)[labels != IGNORE].sum())
    assert build_loss(cfg) is not cross_entropy
    torch.testing.assert_close(losses[0], losses[1])
    torch.testing.assert_close(grads[0].float(), grads[1].float(), rtol=1e-2, atol=1e-3)
