"""Text generation: ``python -m longhorn_zoo.generate --checkpoint DIR --prompt TEXT``.

The prompt is prefilled with the parallel (full-sequence) form, which returns every
layer's state; then tokens are decoded one at a time with the mixers' recurrent
``step`` form. State-space and linear mixers keep a constant-size state per token;
Llama keeps a KV cache. In a hybrid stack each block keeps its own mixer's kind of state.
Sampling: temperature, then top-k, then top-p (nucleus).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable

import torch
from torch import Tensor

from longhorn_zoo.config import JobConfig
from longhorn_zoo.model import LM


def sample(logits: Tensor, temperature: float, top_k: int, top_p: float, gen: torch.Generator | None) -> Tensor:
    """One token per row of ``logits`` (B, V). ``temperature == 0`` is greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


@torch.no_grad()
def generate(model: LM, prompt: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0) -> tuple[Tensor, dict[str, float]]:
    """Continue ``prompt`` (B, T) by ``max_new_tokens`` tokens; returns them and timing stats."""
    gen = torch.Generator(device=prompt.device).manual_seed(seed)
    t0 = time.perf_counter()
    logits, states = model(prompt, return_states=True)
    token = sample(logits[:, -1], temperature, top_k, top_p, gen)
    t1 = time.perf_counter()
    out = [token]
    for _ in range(max_new_tokens - 1):
        logits, states = model.step(token, states)
        token = sample(logits, temperature, top_k, top_p, gen)
        out.append(token)
    if prompt.device.type == "cuda":
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    decode_tokens = prompt.shape[0] * (max_new_tokens - 1)
    stats = {"prefill_s": t1 - t0, "decode_s": t2 - t1,
             "decode_tokens_per_s": decode_tokens / max(t2 - t1, 1e-9)}
    return torch.stack(out, dim=1), stats


def text_codec(cfg: JobConfig) -> tuple[Callable[[str], list[int]], Callable[[list[int]], str]]:
    """Encode and decode functions for the tokenizer the run trained with (``data.tokenizer`` as recorded).

    Raises:
        DataError: for a run without a tokenizer (MQAR), or one that cannot be loaded here.
    """
    from longhorn_zoo.data import DataError, run_tokenizer

    tok = run_tokenizer(cfg)
    if tok is None:
        raise DataError(f"the run trained on {cfg.data.dataset} data, which has no tokenizer to encode a prompt")
    return (lambda s: [int(i) for i in tok.encode([s])[0]]), tok.decode


def main(argv: list[str] | None = None) -> int:
    from longhorn_zoo.data import DataError
    from longhorn_zoo.inference import add_checkpoint_args, load_from_args

    p = argparse.ArgumentParser(prog="python -m longhorn_zoo.generate", description=__doc__.splitlines()[0])
    add_checkpoint_args(p)
    p.add_argument("--prompt", default="def ", help="prompt text")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    loaded = load_from_args(args)
    if loaded is None:
        return 1
    model, cfg = loaded
    try:
        encode, decode = text_codec(cfg)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    ids = encode(args.prompt)
    if not ids:
        print("error: --prompt must not be empty", file=sys.stderr)
        return 1
    prompt = torch.tensor([ids], device=args.device)
    tokens, stats = generate(model, prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    print(args.prompt + decode(tokens[0].tolist()))
    print(f"\n[{cfg.model.name}] prefill {len(ids)} tokens in {stats['prefill_s'] * 1e3:.1f} ms, "
          f"decode {stats['decode_tokens_per_s']:.1f} tokens/s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
