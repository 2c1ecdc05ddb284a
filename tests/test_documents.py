"""Document boundaries in packed batches: the helpers, the model and the trainer."""

from __future__ import annotations

import pytest
import torch

from longhorn_zoo.config import load_config
from longhorn_zoo.data import DataError, build_dataloader
from longhorn_zoo.documents import document_ids, document_positions, same_document_causal
from longhorn_zoo.model import build_model
from longhorn_zoo.train import train


def random_resets(bsz: int, seqlen: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(bsz, seqlen, generator=gen) < 0.2


def test_ids_and_positions_count_from_each_document_start() -> None:
    reset = random_resets(3, 40, seed=0)
    ids, pos = document_ids(reset), document_positions(reset, offset=5)
    for b in range(3):
        doc, start = 0, -5
        for t in range(40):
            if reset[b, t]:
                doc, start = doc + 1, t
            assert ids[b, t] == doc and pos[b, t] == t - start


def test_block_causal_mask_is_causal_within_documents() -> None:
    reset = random_resets(2, 30, seed=1)
    mask, ids = same_document_causal(reset)[:, 0], document_ids(reset)
    t = torch.arange(30)
    want = (t[:, None] >= t[None, :]) & (ids[:, :, None] == ids[:, None, :])
    assert torch.equal(mask, want)


@pytest.mark.parametrize("mixer", ["llama", "longhorn", "mamba", "gla", "retnet", "rwkv"])
def test_lm_keeps_documents_apart(mixer: str) -> None:
    cfg = load_config(None, ["--model.name", mixer, "--model.dim", "64", "--model.n_layers", "2"])
    model = build_model(cfg.model, 32, "meta")
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 256, (2, 24), generator=gen)
    reset = torch.zeros(2, 24, dtype=torch.bool)
    reset[0, 9] = reset[1, 3] = reset[1, 16] = True
    with torch.no_grad():
        packed = model(tokens, reset=reset)
        for b, start in ((0, 9), (1, 16)):
            torch.testing.assert_close(packed[b, start:], model(tokens[b : b + 1, start:])[0], rtol=1e-4, atol=1e-5)


def test_document_boundaries_need_data_with_documents(tmp_path) -> None:
    cfg = load_config(None, ["--data.document_boundaries", "true", "--job.dump_folder", str(tmp_path)])
    with pytest.raises(DataError, match="data.document_boundaries needs documents"):
        build_dataloader(cfg, 0, 1)


def test_training_passes_the_loaders_resets_to_the_model(tmp_path, monkeypatch) -> None:
    seen = []

    class Packed:
        def __next__(self):
            tokens = torch.randint(0, 256, (4, 32))
            return {"inputs": tokens, "labels": tokens.roll(-1, 1), "reset": random_resets(4, 32, seed=4)}

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    monkeypatch.setattr("longhorn_zoo.train.build_dataloader", lambda *a, **k: Packed())
    original = type(build_model(load_config(None, []).model, 32, "meta")).forward

    def spy(self, tokens, states=None, return_states=False, reset=None):
        seen.append(reset)
        return original(self, tokens, states, return_states, reset)

    monkeypatch.setattr("longhorn_zoo.model.LM.forward", spy)
    common = ["--model.dim", "32", "--model.n_layers", "1", "--training.local_batch_size", "4",
              "--training.seq_len", "32", "--training.steps", "2", "--job.dump_folder", str(tmp_path)]
    train(load_config(None, [*common, "--data.document_boundaries", "true"]))
    assert seen and all(r is not None and r.shape == (4, 32) for r in seen)
    seen.clear()
    train(load_config(None, common))
    assert seen and all(r is None for r in seen)
