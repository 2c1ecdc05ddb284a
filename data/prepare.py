"""Prepare token shards for ``data.dataset = "shards"``.

    python data/prepare.py --source slimpajama --tokenizer gpt2 --out /data/slimpajama_gpt2 \
        --val-split validation --max-tokens 100_000_000_000 --num-proc 32

writes ``OUT/train`` and ``OUT/val``; train with ``data.shard_dir = OUT``. See docs/data.md.
"""

from __future__ import annotations

import argparse
import os
import sys

from longhorn_zoo.data.errors import DataError
from longhorn_zoo.data.prepare import prepare
from longhorn_zoo.data.sources import HUB_ALIASES, TextSource


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Tokenize a text source into resumable token shards.")
    p.add_argument("--source", required=True,
                   help=f"hub dataset id or alias ({', '.join(HUB_ALIASES)}), or a local txt/jsonl/parquet "
                        "file, glob or folder")
    p.add_argument("--out", required=True, help="output folder (gets train/ and val/)")
    p.add_argument("--tokenizer", default="gpt2",
                   help="bytes, gpt2, r50k_base, cl100k_base, o200k_base or a .tiktoken file")
    p.add_argument("--text-field", default="text", help="column holding the document text")
    p.add_argument("--hf-config", default="", help="hub dataset config name (e.g. sample-10BT)")
    p.add_argument("--hf-revision", default="", help="hub dataset branch, tag or commit (refs/convert/parquet "
                   "reads the Parquet export of a script-based dataset)")
    p.add_argument("--sample-by", default="paragraph", choices=("line", "paragraph", "document"),
                   help="txt files: what one document is")
    p.add_argument("--val-split", default="", help="source split for validation; empty holds out --val-docs")
    p.add_argument("--val-docs", type=int, default=1000, help="leading train documents held out for validation")
    p.add_argument("--splits", default="train,val", help="comma-separated splits to write")
    p.add_argument("--num-proc", type=int, default=os.cpu_count() or 1, help="tokenizer processes")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard (about)")
    p.add_argument("--max-tokens", type=int, default=0, help="stop the train split after this many tokens")
    p.add_argument("--chunk-docs", type=int, default=256, help="documents per tokenizer task")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    a = p.parse_args(argv)
    source = TextSource(a.source, a.text_field, a.hf_config, a.sample_by, a.val_split, a.val_docs,
                        a.hf_revision)
    try:
        indexes = prepare(source, a.tokenizer, a.out, tuple(a.splits.split(",")), a.num_proc, a.shard_tokens,
                          a.max_tokens, a.chunk_docs, not a.no_progress)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for split, index in indexes.items():
        print(f"{split}: {index['tokens']:,} tokens, {index['docs']:,} documents, {len(index['shards'])} shards")
    return 0


if __name__ == "__main__":
    sys.exit(main())

