"""Time one Llama attention layer with and without document masking (``data.document_boundaries``).

Usage (on a GPU machine, from the repo root)::

    python -m benchmarks.doc_mask                      # 1.3B layer, bf16: T = 2048 x B = 8, T = 8192 x B = 2
    python -m benchmarks.doc_mask --compile            # the layer under torch.compile(fullgraph=True), as the trainer
    python -m benchmarks.doc_mask --device cpu --tiny  # a smoke test of this script at tiny sizes

One :class:`~longhorn_zoo.plugins.llama.attention.Attention` layer of the 1.3B shape (dim 2048,
16 heads of 128), forward plus backward (the gradients of x and the weights), three ways:

* ``causal``: no ``reset``; SDPA with ``is_causal=True`` (flash attention);
* ``dense mask``: ``reset``, through the (B, 1, T, T) bool mask and SDPA (``op_backend = "reference"``);
* ``flex``: ``reset``, through flex_attention and a block mask (the default on CUDA).

Documents start with probability 4 / T at each token (mean length T / 4; rows start mid-document).
The table gives the median ms of forward plus backward (CUDA events, after warm-up calls that
compile), the ms of building the mask alone (once per layer), the peak memory beyond the inputs,
and the flex output's largest difference from the dense mask's. Each shape starts from a fresh
``torch._dynamo`` cache, so flex is compiled for that shape alone, as in a training run.

On CPU every ``reset`` row takes the dense mask (flex_attention has no backward pass there),
so ``--device cpu`` checks this script, not the kernels.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import Tensor

from longhorn_zoo.hookspecs import MixerArgs
from longhorn_zoo.ops import REFERENCE, get_backend_preference, set_backend_preference
from longhorn_zoo.plugins.llama.attention import Attention, _document_mask, document_block_mask

FULL = {"dim": 2048, "heads": 16, "shapes": [(8, 2048), (2, 8192)], "dtype": torch.bfloat16}
TINY = {"dim": 64, "heads": 4, "shapes": [(2, 200), (1, 520)], "dtype": torch.float32}
VARIANTS = ("causal", "dense mask", "flex")
"""Row labels; the backend preference of each: ``flex`` is ``auto``, ``dense mask`` the reference."""


def document_starts(bsz: int, seqlen: int, device: str, seed: int = 0) -> Tensor:
    """(B, T) bool: a document starts at each token with probability 4 / T (mean length T / 4)."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(bsz, seqlen, generator=gen) < 4 / seqlen).to(device)


def build_layer(dim: int, heads: int, seqlen: int, dtype: torch.dtype, device: str) -> Attention:
    """One attention layer of a 24-layer model, initialised as the trainer does, in ``dtype``."""
    torch.manual_seed(0)
    layer = Attention(MixerArgs(dim, 0, 24, seqlen, {"n_heads": heads, "rope_theta": 10000.0}))
    layer.to(device=device, dtype=dtype)
    layer.init_weights()
    return layer


class Timer:
    """Median ms of a callable: CUDA events on a GPU, ``perf_counter`` on CPU."""

    def __init__(self, device: str, warmup: int, reps: int) -> None:
        self.cuda = device == "cuda"
        self.warmup, self.reps = warmup, reps

    def __call__(self, fn: Callable[[], object]) -> float:
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.reps):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def peak_mib(fn: Callable[[], object], device: str) -> float | None:
    """MiB one call allocates at its peak beyond what was allocated before it (None on CPU)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def time_shape(layer: Callable[..., Tensor], params: list[Tensor], bsz: int, seqlen: int, dim: int,
               dtype: torch.dtype, device: str, timer: Timer) -> list[dict]:  # fmt: skip
    """One row per variant at (bsz, seqlen): fwd+bwd ms, mask ms, peak MiB, and flex's difference from dense."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(bsz, seqlen, dim, generator=gen).to(device, dtype).requires_grad_()
    cot = torch.randn(bsz, seqlen, dim, generator=gen).to(device, dtype)
    reset = document_starts(bsz, seqlen, device)
    masks = {
        "dense mask": lambda: _document_mask(reset, None, bsz, seqlen, 0, reset.device),
        "flex": lambda: document_block_mask(reset),
    }
    rows, outs = [], {}
    before = get_backend_preference()
    for name in VARIANTS:
        set_backend_preference(REFERENCE if name == "dense mask" else "auto")
        docs = {} if name == "causal" else {"reset": reset}

        def step(docs: dict = docs) -> None:
            torch.autograd.grad(layer(x, **docs), [x, *params], cot)

        try:
            outs[name] = layer(x, **docs).detach().float()  # with grad, as timed: no compile for no_grad alone
            ms = timer(step)
            rows.append(
                {
                    "B": bsz,
                    "T": seqlen,
                    "variant": name,
                    "ms": ms,
                    "peak": peak_mib(step, device),
                    "mask_ms": timer(masks[name]) if name in masks else None,
                }
            )
        finally:
            set_backend_preference(before)
    rows[-1]["diff"] = (outs["flex"] - outs["dense mask"]).abs().max().item()
    return rows


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def print_table(rows: list[dict]) -> None:
    print("| B | T | variant | fwd+bwd ms | mask ms | peak MiB | max abs diff vs dense |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['B']} | {r['T']} | {r['variant']} | {r['ms']:.2f} | {_cell(r['mask_ms'], '.3f')} | "
            f"{_cell(r['peak'], '.0f')} | {_cell(r.get('diff'), '.2e')} |",
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="dim 64, 4 heads, T 200 and 520, float32")
    parser.add_argument("--compile", action="store_true", help="torch.compile(fullgraph=True) the layer, as "
                        "compile.enable does each block")  # fmt: skip
    parser.add_argument("--reps", type=int, default=10, help="timed calls per cell (after 3 warm-up calls)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit(
            "benchmarks.doc_mask times GPU kernels; torch.cuda.is_available() is False here "
            "(use --device cpu --tiny to smoke-test the script)"
        )
    shape = TINY if args.tiny else FULL
    dim, heads, dtype = shape["dim"], shape["heads"], shape["dtype"]
    where = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(
        f"# {where}, torch {torch.__version__}, dim {dim}, {heads} heads, {dtype}, "
        f"{'compiled' if args.compile else 'eager'} layer, documents of mean length T / 4",
        flush=True,
    )
    timer = Timer(args.device, warmup=3, reps=args.reps)
    rows = []
    for bsz, seqlen in shape["shapes"]:
        attn = build_layer(dim, heads, seqlen, dtype, args.device)
        layer = torch.compile(attn, fullgraph=True) if args.compile else attn
        rows += time_shape(layer, list(attn.parameters()), bsz, seqlen, dim, dtype, args.device, timer)
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
