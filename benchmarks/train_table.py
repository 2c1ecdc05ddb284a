"""The table of ``benchmarks/train_1b.sh``: tokens/s, MFU, peak memory and the ratio to Llama per shape.

    python -m benchmarks.train_table OUT --models "llama longhorn" --shapes "2048x8 8192x2"

Reads each job's last ``metrics.jsonl`` line (``OUT/<model>_<seq>x<mb>/``); a job without one is
reported from its log (out of memory, or failed).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def job_row(out: Path, name: str) -> dict[str, float] | str:
    """The job's last logged metrics, or why there are none."""
    metrics = out / name / "metrics.jsonl"
    if metrics.is_file() and metrics.read_text().strip():
        return json.loads(metrics.read_text().strip().splitlines()[-1])
    log = out / f"{name}.log"
    text = log.read_text(errors="replace") if log.is_file() else ""
    return "out of memory" if "out of memory" in text.lower() else "failed (see its log)"


def table(out: Path, models: list[str], shapes: list[str], ngpu: int) -> str:
    lines = ["| config | T x micro-batch | GPUs | tokens/s per GPU | MFU | peak mem (GiB) | vs llama_1b |",
             "|---|---|---|---|---|---|---|"]
    for shape in shapes:
        seq, mb = shape.split("x")
        base = job_row(out, f"llama_{shape}")
        for model in models:
            row = job_row(out, f"{model}_{shape}")
            cells = [f"{model}_1b", f"{seq} x {mb}", str(ngpu)]
            if isinstance(row, str):
                cells += [row, "", "", ""]
            else:
                tps = row["throughput/tokens_per_s"]
                ratio = f"{tps / base['throughput/tokens_per_s']:.2f}x" if isinstance(base, dict) else ""
                cells += [f"{tps:,.0f}", f"{row.get('throughput/mfu_pct', float('nan')):.1f}%",
                          f"{row['memory/max_active_gib']:.1f}", ratio]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the folder train_1b.sh wrote")
    parser.add_argument("--models", default="llama longhorn mamba gla retnet rwkv hybrid",
                        help="space-separated config names (train_configs/<model>_1b.toml)")
    parser.add_argument("--shapes", default="2048x8 8192x2 32768x1", help="space-separated seq_len x micro-batch")
    parser.add_argument("--ngpu", type=int, default=1)
    args = parser.parse_args(argv)
    print(table(args.out, args.models.split(), args.shapes.split(), args.ngpu))
    return 0


if __name__ == "__main__":
    sys.exit(main())
