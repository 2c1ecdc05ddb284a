"""Export a trained model as a Hugging Face model folder: ``python -m longhorn_zoo.export --checkpoint DIR --out F``.

The checkpoint is anything ``longhorn_zoo.eval`` reads: the dump folder, its checkpoint
folder, one ``step-N`` folder (written by any number of ranks) or an exported ``model.pt``,
with the run's ``config.toml`` found next to it or above it. The folder (see
:mod:`longhorn_zoo.model_folder`) carries the tokenizer the run trained with, and loads with
``AutoModelForCausalLM.from_pretrained`` after ``import longhorn_zoo.hf`` (see docs/interop.md).
Needs the ``hf`` extra: ``pip install 'longhorn-zoo[hf]'``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from longhorn_zoo.checkpoint import EXPORT_DTYPES, CheckpointError
from longhorn_zoo.config import ConfigError
from longhorn_zoo.data import DataError, run_tokenizer
from longhorn_zoo.data.tokenizer import build_tokenizer
from longhorn_zoo.model_folder import DEFAULT_SHARD_SIZE, FolderError, parse_size, save_folder


def export_run(checkpoint: Path, out: Path, config: Path | None = None, dtype: str = "float32",
               max_shard_size: int = DEFAULT_SHARD_SIZE, tokenizer: str | None = None) -> Path:
    """Write the model of a training checkpoint as a model folder ``out``; returns ``out``.

    Args:
        checkpoint: What :func:`longhorn_zoo.inference.load_trained` accepts.
        out: The folder to write (created; a previous export's weights in it are replaced).
        config: The training config, if not the ``config.toml`` next to the checkpoint.
        dtype: ``float32`` or ``bfloat16`` weights.
        max_shard_size: Bytes per safetensors file before the weights are split into shards.
        tokenizer: A ``data.tokenizer`` spec to carry instead of the run's own (the same tokenizer
            as a local file, say, where the run's tiktoken name cannot be downloaded).
    """
    from longhorn_zoo.inference import load_trained

    model, cfg = load_trained(checkpoint, "cpu", config)
    tok = build_tokenizer(tokenizer) if tokenizer else run_tokenizer(cfg)
    return save_folder(model, cfg, out, tok, dtype, max_shard_size)


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status."""
    p = argparse.ArgumentParser(prog="python -m longhorn_zoo.export", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="dump folder, checkpoint folder, step-N folder, or exported model.pt")
    p.add_argument("--config", type=Path, help="training config (default: config.toml next to the checkpoint)")
    p.add_argument("--out", type=Path, required=True, help="the model folder to write")
    p.add_argument("--dtype", default="float32", choices=sorted(EXPORT_DTYPES))
    p.add_argument("--max-shard-size", default="5GB", help="split the weights into files of at most this size")
    p.add_argument("--tokenizer", help="carry this tokenizer (a data.tokenizer spec) instead of the run's")
    args = p.parse_args(argv)
    try:
        out = export_run(args.checkpoint, args.out, args.config, args.dtype, parse_size(args.max_shard_size),
                         args.tokenizer)
    except (CheckpointError, ConfigError, DataError, FolderError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
