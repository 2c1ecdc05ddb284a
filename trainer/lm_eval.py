"""lm-evaluation-harness on a trained model: ``python -m longhorn_zoo.lm_eval --checkpoint DIR --tasks paper``.

The checkpoint is a training checkpoint (anything ``longhorn_zoo.eval`` reads), which is first
exported to a model folder (``--export-dir``, or a temporary folder), or a model folder
itself. The tasks run through lm-eval's own ``hf`` model on that folder, as
``lm_eval --model hf --model_args pretrained=FOLDER,trust_remote_code=True`` would, with
longhorn-zoo's ``transformers`` classes registered in the process. ``--tasks`` takes lm-eval
task names and the suites below; ``--include-path`` adds a folder of task YAML files.

The suites are the zero-shot tasks of the papers this zoo reproduces, and the average
printed after lm-eval's table uses the metric they report for each task (accuracy, or
length-normalised accuracy for HellaSwag, ARC-Challenge and OpenBookQA):

* ``mamba``: the Mamba paper's and README's zero-shot table (LAMBADA, HellaSwag, PIQA,
  ARC-Easy, ARC-Challenge, WinoGrande, OpenBookQA);
* ``longhorn``: the 8 tasks of the Longhorn paper's 1.3B table, which follows GLA and
  DeltaNet (LAMBADA, PIQA, HellaSwag, WinoGrande, ARC-Easy, ARC-Challenge, SIQA, BoolQ);
* ``paper``: both.

Needs the ``hf`` extra; the tasks' datasets come from the Hugging Face hub (or its cache).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

# The metric the papers report for each task (lm-eval's names).
PAPER_METRICS = {
    "lambada_openai": "acc", "hellaswag": "acc_norm", "piqa": "acc", "arc_easy": "acc",
    "arc_challenge": "acc_norm", "winogrande": "acc", "openbookqa": "acc_norm", "social_iqa": "acc", "boolq": "acc",
}
SUITES = {
    "mamba": ("lambada_openai", "hellaswag", "piqa", "arc_easy", "arc_challenge", "winogrande", "openbookqa"),
    "longhorn": ("lambada_openai", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "social_iqa",
                 "boolq"),
}
SUITES["paper"] = tuple(dict.fromkeys(SUITES["mamba"] + SUITES["longhorn"]))


def expand_tasks(tasks: str) -> list[str]:
    """Comma-separated lm-eval task names and suite names (``mamba``, ``longhorn``, ``paper``), in order, once each."""
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    return list(dict.fromkeys(n for name in names for n in SUITES.get(name, (name,))))


def paper_average(results: dict[str, dict[str, Any]]) -> tuple[float, dict[str, float]] | None:
    """The mean of each evaluated paper task's reported metric, and the per-task values; None if none ran."""
    scores = {task: float(results[task][f"{metric},none"]) for task, metric in PAPER_METRICS.items()
              if task in results and f"{metric},none" in results[task]}
    return (sum(scores.values()) / len(scores), scores) if scores else None


def run_lm_eval(folder: Path, tasks: list[str], batch_size: int = 1, device: str = "cpu", dtype: str = "float32",
                limit: float | None = None, num_fewshot: int | None = None, include_path: Path | None = None,
                max_length: int | None = None, bootstrap_iters: int = 100000) -> dict[str, Any]:
    """lm-eval's ``simple_evaluate`` with its ``hf`` model on model folder ``folder``; returns its result dict."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    import longhorn_zoo.hf  # noqa: F401  (registers the model type, so no remote code is needed)

    model_args = {"pretrained": str(folder), "dtype": dtype}
    if max_length is not None:
        model_args["max_length"] = max_length
    manager = None
    if include_path is not None:  # indexing lm-eval's own thousands of tasks takes half a minute: skip it if we can
        manager = TaskManager(include_path=str(include_path), include_defaults=False)
        if not set(tasks) <= set(manager.all_tasks):
            manager = None
    manager = manager or TaskManager(include_path=str(include_path) if include_path else None)
    return lm_eval.simple_evaluate(model="hf", model_args=model_args, tasks=tasks, num_fewshot=num_fewshot,
                                   batch_size=batch_size, device=device, limit=limit, task_manager=manager,
                                   bootstrap_iters=bootstrap_iters, log_samples=False)


def main(argv: list[str] | None = None) -> int:
    """The command line; returns the exit status."""
    from longhorn_zoo.checkpoint import CheckpointError
    from longhorn_zoo.config import ConfigError
    from longhorn_zoo.data import DataError
    from longhorn_zoo.export import export_run
    from longhorn_zoo.model_folder import CONFIG, FolderError

    p = argparse.ArgumentParser(prog="python -m longhorn_zoo.lm_eval", description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="a training checkpoint (dump folder, checkpoint folder, step-N, model.pt) or a model folder")
    p.add_argument("--config", type=Path, help="training config (default: config.toml next to the checkpoint)")
    p.add_argument("--tasks", default="paper", help="comma-separated lm-eval tasks and suites: mamba, longhorn, paper")
    p.add_argument("--export-dir", type=Path, help="keep the exported model folder here (default: a temporary one)")
    p.add_argument("--include-path", type=Path, help="a folder of extra lm-eval task YAML files")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="float32", help="the dtype the model runs in (float32, bfloat16)")
    p.add_argument("--limit", type=float, help="only this many documents per task (a fraction if below 1)")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples per prompt (default: each task's own, 0 here)")
    p.add_argument("--max-length", type=int, help="longest context in tokens (default: the training context)")
    p.add_argument("--output", type=Path, help="write lm-eval's results as JSON here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.checkpoint
        try:
            if not (folder / CONFIG).is_file():
                folder = export_run(args.checkpoint, args.export_dir or Path(tmp) / "model", args.config)
        except (CheckpointError, ConfigError, DataError, FolderError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        out = run_lm_eval(folder, expand_tasks(args.tasks), args.batch_size, args.device, args.dtype, args.limit,
                          args.num_fewshot, args.include_path, args.max_length)
    from lm_eval.utils import make_table

    print(make_table(out))
    average = paper_average(out["results"])
    if average is not None:
        mean, scores = average
        print(f"paper average over {len(scores)} tasks: {mean:.4f} ("
              + ", ".join(f"{t} {PAPER_METRICS[t]} {v:.4f}" for t, v in scores.items()) + ")")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps({"results": out["results"], "config": out.get("config", {})}, indent=1,
                                          default=str) + "\n")
        print(f"results: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
