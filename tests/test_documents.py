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


@pytest.mark.parametrize("mixer", ["llama", "longhorn", "mamba", "gla", "retnet", "rwkv", "rwkv5"])
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


def small_lm(mixer: str, *extra: str, device: str = "cpu", seq_len: int = 32):
    cfg = load_config(None, ["--model.name", mixer, "--model.dim", "64", "--model.n_layers", "2", *extra])
    model = build_model(cfg.model, seq_len, "meta")
    model.to_empty(device=device)
    torch.manual_seed(0)
    model.init_weights()
    return model


def test_learned_positions_continue_through_states_and_stop_at_the_context() -> None:
    model = small_lm("rwkv5")
    tokens = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(5))
    reset = torch.zeros(2, 20, dtype=torch.bool)
    reset[1, 7] = True
    with torch.no_grad():
        whole = model(tokens, reset=reset)
        first, states = model(tokens[:, :12], return_states=True, reset=reset[:, :12])
        torch.testing.assert_close(states[-1], torch.tensor([12, 5]))  # row 1's document started at token 7
        steps = []
        for t in range(12, 20):
            logits, states = model.step(tokens[:, t], states)
            steps.append(logits)
        torch.testing.assert_close(torch.cat([first, torch.stack(steps, 1)], 1), whole, rtol=1e-4, atol=1e-5)
        with pytest.raises(ValueError, match="33 tokens, but the learned position embedding has 32 positions"):
            model(torch.zeros(1, 33, dtype=torch.long))
        _, states = model(tokens[:, :16].repeat(1, 2), return_states=True)
        with pytest.raises(ValueError, match="position 32 is past the 32 positions"):
            model.step(tokens[:, 0], states)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the fast backends and SDPA's masked kernels")
@pytest.mark.parametrize("mixer", ["llama", "longhorn", "mamba", "gla", "retnet", "rwkv", "rwkv5"])
def test_fast_backends_keep_documents_apart_on_gpu(mixer: str) -> None:
    from longhorn_zoo.ops import get_backend_preference, set_backend_preference

    model = small_lm(mixer, device="cuda", seq_len=256)
    gen = torch.Generator().manual_seed(6)
    tokens = torch.randint(0, 256, (2, 256), generator=gen).cuda()
    reset = (torch.rand(2, 256, generator=gen) < 0.02).cuda()
    reset[:, 100] = True
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        packed = model(tokens, reset=reset).float()
        alone = model(tokens[:, 100:], reset=reset[:, 100:]).float()
    before = get_backend_preference()
    set_backend_preference("reference")
    try:
        with torch.no_grad():
            want = model(tokens, reset=reset)
    finally:
        set_backend_preference(before)
    assert (packed - want).pow(2).mean().sqrt() / want.pow(2).mean().sqrt() < 5e-2
    last = int(reset[0].nonzero().max())
    torch.testing.assert_close(packed[0, last:], alone[0, last - 100 :], rtol=5e-2, atol=5e-2)


def several_documents(bsz: int, seqlen: int, seed: int) -> torch.Tensor:
    """Resets every ~40 tokens, at different places in each row; row 0 starts mid-document."""
    reset = torch.rand(bsz, seqlen, generator=torch.Generator().manual_seed(seed)) < 1 / 40
    reset[1:, 0] = True
    return reset


def dense_document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, reset: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=same_document_causal(reset))


def test_flex_block_mask_matches_the_dense_mask_on_cpu() -> None:
    """flex_attention's block mask over document ids is the dense block-causal mask, also traced inside a
    compiled block (fullgraph, as the trainer compiles blocks). CPU: forward only, float32 (no backward there)."""
    from longhorn_zoo.plugins.llama.attention import flex_document_attention

    bsz, heads, seqlen, d = 2, 2, 200, 16  # two 128-blocks, the second partial
    reset = several_documents(bsz, seqlen, seed=7)
    assert reset.sum(1).min() >= 3
    gen = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(bsz, heads, seqlen, d, generator=gen) for _ in range(3))
    block = torch.compile(lambda q, k, v, reset: flex_document_attention(q.flip(2), k, v, reset), fullgraph=True)
    with torch.no_grad():
        want = dense_document_attention(q, k, v, reset)
        torch.testing.assert_close(flex_document_attention(q, k, v, reset), want, rtol=1e-5, atol=1e-5)
        flipped = dense_document_attention(q.flip(2), k, v, reset)  # an op of the block's graph before flex
        torch.testing.assert_close(block(q, k, v, reset), flipped, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: flex_attention's backward runs only there")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled_block"])
def test_llama_flex_path_matches_the_dense_mask_on_gpu(compiled: bool, monkeypatch) -> None:
    """On CUDA, Llama attention with resets takes flex_attention; output and gradients match the dense
    mask path (model.op_backend = reference) in float32, with several documents per row, T = 333."""
    from longhorn_zoo.hookspecs import MixerArgs
    from longhorn_zoo.ops import get_backend_preference, set_backend_preference
    from longhorn_zoo.plugins.llama import attention
    from longhorn_zoo.plugins.llama.attention import Attention

    calls = []
    flex = attention.flex_document_attention

    def counted(*args):
        calls.append(1)
        return flex(*args)

    monkeypatch.setattr(attention, "flex_document_attention", counted)

    torch.manual_seed(0)
    attn = Attention(MixerArgs(128, 0, 2, 512, {"n_heads": 4, "rope_theta": 10000.0})).cuda()
    attn.init_weights()
    run = torch.compile(attn, fullgraph=True) if compiled else attn
    reset = several_documents(3, 333, seed=9).cuda()
    x = torch.randn(3, 333, 128, device="cuda")

    def grads(backend: str) -> list[torch.Tensor]:
        before = get_backend_preference()
        set_backend_preference(backend)
        try:
            xg = x.clone().requires_grad_()
            out = run(xg, reset=reset)
            out.pow(2).sum().backward()
            got = [out.detach(), xg.grad, *(p.grad.clone() for p in attn.parameters())]
            attn.zero_grad()
            return got
        finally:
            set_backend_preference(before)

    fast = grads("auto")
    assert calls, "the flex path did not run"
    for got, want in zip(fast, grads("reference"), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    _, (_, _, visible) = attn(x, return_state=True, reset=reset)
    ids = document_ids(reset)
    assert torch.equal(visible, ids == ids[:, -1:])
