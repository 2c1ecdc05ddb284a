"""The reproduction study of issue 9: six mixers, the seed's RWKV and a Longhorn-attention hybrid, one token budget,
one table.

Each entry (``rwkv5`` is the seed's RWKV x051a beside RWKV-6's ``rwkv``; ``hybrid`` has one attention block in
eight, as ``train_configs/hybrid_*.toml``) trains (1) a byte-level language model of about 20M non-embedding
parameters on the embedded corpus, with the same context, batch and steps (so the same tokens) for all, and (2) an
MQAR model from ``train_configs/mqar_<mixer>.toml`` with the same steps for all. Then ``longhorn_zoo.eval`` measures
validation loss and perplexity at 1x-16x the training context (LM) and recall accuracy over pairs and lengths
(MQAR), and the report turns ``<out>/results.json`` into markdown.

Jobs are ``python -m longhorn_zoo.train`` / ``python -m longhorn_zoo.eval`` subprocesses run from the repository root,
``--jobs-per-gpu`` at a time on each GPU (``CUDA_VISIBLE_DEVICES``), each logging to ``<out>/logs/``.
Longhorn, Mamba and the hybrid wait for the selective-scan CUDA extension, built once at the start beside the other
jobs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))  # study_report sits beside this file, however it is loaded
from study_report import render  # noqa: E402

MIXERS = ("llama", "longhorn", "mamba", "gla", "retnet", "rwkv", "rwkv5", "hybrid")
SELECTIVE_SCAN = ("longhorn", "mamba", "hybrid")  # no MLP, twice the blocks; need the CUDA extension on a GPU
HYBRID_PERIOD = 8  # the hybrid's blocks: an attention block after every 7 Longhorn blocks (train_configs/hybrid_*.toml)
BUILD = "build selective_scan"

# Size and budget presets; an option given on the command line wins. "full" fits in one 10-minute call on
# 4 H200s (see the epilog); "tiny" runs in about a minute on the CPU (tests).
PRESETS: dict[str, dict[str, Any]] = {
    "full": {"dim": 384, "layers": 12, "seq_len": 512, "batch": 16, "lm_steps": 1500, "lr": 1e-3, "warmup": 100,
             "mqar_steps": 3000, "eval_tokens": 65536, "set": []},
    "tiny": {"dim": 32, "layers": 2, "seq_len": 32, "batch": 4, "lm_steps": 6, "lr": 3e-3, "warmup": 2,
             "mqar_steps": 6, "eval_tokens": 512,
             "set": [("mqar", "model.dim=32"), ("mqar", "training.local_batch_size=8")]},
}

PROBE = """
import json, platform, torch
from importlib import metadata
from longhorn_zoo.data.text import split_corpus
try:
    triton = metadata.version("triton")
except metadata.PackageNotFoundError:
    triton = None
train, val = split_corpus(0.05)
print(json.dumps({"python": platform.python_version(), "torch": torch.__version__, "triton": triton,
                  "cuda": torch.version.cuda, "gpus": torch.cuda.device_count(),
                  "gpu_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                  "corpus_train_bytes": len(train), "corpus_val_bytes": len(val)}))
"""

_T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"[{time.monotonic() - _T0:6.0f}s] {msg}", flush=True)


def rel(path: Path) -> str:
    """``path`` relative to the repository root (where every job runs) when inside it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def tail(path: Path, n: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.is_file() else "(no log)"


# ---------------------------------------------------------------------------------------------- jobs and queue

@dataclass
class Outcome:
    status: str  # ok | failed | skipped | stopped (SIGTERM at the time limit: saved and stopped early)
    returncode: int | None = None
    wall_s: float = 0.0
    gpu: str = ""
    why: str = ""  # skipped: the reason; failed: the log tail


@dataclass
class Job:
    """One subprocess of the study."""

    name: str
    command: list[str]
    log: Path
    after: tuple[str, ...] = ()  # jobs that must succeed first
    uses_slot: bool = True  # False: runs beside the GPU slots (the extension build)
    stoppable: bool = False  # a training run: gets SIGTERM at the time limit
    before: Callable[[], None] | None = None
    done: Callable[[Outcome], None] | None = None


def run_jobs(jobs: list[Job], gpus: list[str], per_gpu: int, time_limit: float = 0) -> dict[str, Outcome]:
    """Run ``jobs``, at most ``per_gpu`` at a time on each GPU ("cpu" for none), in order as dependencies allow.

    A failed job is reported with its log tail and the others go on; jobs after it are skipped.
    """
    devices = gpus or ["cpu"]
    threads = str(max(1, (os.cpu_count() or 1) // (len(devices) * per_gpu)))
    names = {j.name for j in jobs}
    assert all(d in names for j in jobs for d in j.after), "a dependency is not in the job list"
    pending, running, outcomes = list(jobs), [], {}
    start, stopping = time.monotonic(), False

    def finish(job: Job, out: Outcome) -> None:
        outcomes[job.name] = out
        if out.status == "failed":
            say(f"FAILED {job.name} (exit {out.returncode}) after {out.wall_s:.0f}s; last lines of {rel(job.log)}:\n"
                + "\n".join("    " + line for line in out.why.splitlines()))
        elif out.status == "skipped":
            say(f"skip   {job.name}: {out.why}")
        else:
            word = "done" if out.status == "ok" else "stopped"
            say(f"{word:6s} {job.name} in {out.wall_s:.0f}s  (log {rel(job.log)})")
        if job.done:
            job.done(out)

    try:
        while pending or running:
            if time_limit and not stopping and time.monotonic() - start > time_limit:
                stopping = True
                say(f"time limit of {time_limit:.0f}s: stopping the training runs (they save a checkpoint)")
                for job, proc, *_ in running:
                    if job.stoppable:
                        proc.send_signal(signal.SIGTERM)
            for entry in list(running):
                job, proc, gpu, t, log = entry
                if (rc := proc.poll()) is None:
                    continue
                running.remove(entry)
                log.close()
                status = "ok" if rc == 0 else "failed"
                status = "stopped" if status == "ok" and stopping and job.stoppable else status
                finish(job, Outcome(status, rc, time.monotonic() - t, gpu, tail(job.log) if rc else ""))
            load = Counter(gpu for _, _, gpu, _, _ in running if gpu)
            for job in list(pending):
                bad = [d for d in job.after if d in outcomes and outcomes[d].status in ("failed", "skipped")]
                if bad or (stopping and job.stoppable):
                    pending.remove(job)
                    why = f"{bad[0]} {outcomes[bad[0]].status}" if bad else "time limit reached"
                    finish(job, Outcome("skipped", why=why))
                    continue
                free = [d for d in devices if load[d] < per_gpu]
                if any(d not in outcomes for d in job.after) or (job.uses_slot and not free):
                    continue
                gpu = min(free, key=lambda d: load[d]) if job.uses_slot else ""
                visible = devices[0] if not gpu else gpu
                env = {**os.environ, "CUDA_VISIBLE_DEVICES": "" if visible == "cpu" else visible,
                       "PYTHONUNBUFFERED": "1"}
                env.setdefault("OMP_NUM_THREADS", threads)
                if job.before:
                    job.before()
                job.log.parent.mkdir(parents=True, exist_ok=True)
                log = job.log.open("w")
                proc = subprocess.Popen(job.command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
                pending.remove(job)
                running.append((job, proc, gpu, time.monotonic(), log))
                load[gpu] += 1 if gpu else 0
                where = f"on {'CPU' if gpu == 'cpu' else 'GPU ' + gpu}" if gpu else "beside the slots"
                say(f"start  {job.name} {where}  (log {rel(job.log)})")
            time.sleep(0.2)
    except KeyboardInterrupt:
        for _, proc, *_ in running:
            proc.terminate()
        for _, proc, *_ in running:
            proc.wait()
        raise
    return outcomes


# ---------------------------------------------------------------------------------------------- the study's runs

@dataclass
class Run:
    """One trained model: ``lm_<mixer>`` or ``mqar_<mixer>``."""

    task: str
    mixer: str
    dump: Path
    steps: int
    tokens_per_step: int | None  # None: set by the MQAR config
    train_args: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.task}_{self.mixer}"

    def train_command(self) -> list[str]:
        return [sys.executable, "-m", "longhorn_zoo.train", *self.train_args]

    def eval_command(self, tokens: int) -> list[str]:
        return [sys.executable, "-m", "longhorn_zoo.eval", "--checkpoint", rel(self.dump), "--tokens", str(tokens),
                "--out", rel(self.dump / "eval"), "--json", rel(self.dump / "eval" / "numbers.json")]


def lm_shape(mixer: str, dim: int, layers: int) -> list[str]:
    """The LM's shape: ``layers`` blocks, twice as many MLP-free ones for Longhorn, Mamba and the hybrid; heads of 64
    (the seed's 12 at dim 768; for GLA that is the value head, and RetNet's FFN is as wide as its values).

    At dim 384 this gives 21.3-21.7M non-embedding parameters (RetNet 22.7M, Longhorn 22.9M, Mamba 23.2M, the
    hybrid 21.9M, rwkv5 21.6M with its learned position embedding). RWKV-6's channel mix is 2.5 dim wide to meet the
    budget (its default 3.5 gives 25.2M); rwkv5 keeps the seed's 3 dim. The
    hybrid's attention blocks have no MLP, as its Longhorn blocks, and come one in ``HYBRID_PERIOD`` blocks (one
    in gcd(``HYBRID_PERIOD``, blocks) in a stack whose blocks are not a multiple of it, such as the tiny preset's 4).
    """
    n = layers * (2 if mixer in SELECTIVE_SCAN else 1)
    heads = max(1, dim // 64)
    if mixer == "hybrid":
        period = math.gcd(HYBRID_PERIOD, n)
        pattern = json.dumps(["longhorn"] * (period - 1) + ["llama"])
        return ["--model.pattern", pattern, "--model.dim", str(dim), "--model.n_layers", str(n),
                "--model.mixers.llama.n_heads", str(heads), "--model.mixers.llama.mlp", "false"]
    args = ["--model.name", mixer, "--model.dim", str(dim), "--model.n_layers", str(n)]
    if mixer in ("llama", "gla", "retnet"):
        args += ["--model.mixer.n_heads", str(heads)]
    if mixer == "retnet":
        args += ["--model.mlp_hidden", str(int(1.8 * dim) // heads * heads)]
    if mixer in ("rwkv", "rwkv5"):
        args += ["--model.mixer.head_size", str(min(64, dim))]
    if mixer == "rwkv":
        args += ["--model.mixer.ffn_ratio", "2.5"]
    return args


def plan(s: argparse.Namespace) -> list[Run]:
    runs = []
    for task in s.tasks:  # the long LM runs first
        for mixer in s.mixers:
            steps = s.lm_steps if task == "lm" else s.mqar_steps
            run = Run(task, mixer, s.out / "runs" / f"{task}_{mixer}", steps,
                      s.batch * s.seq_len if task == "lm" else None)
            if task == "lm":
                args = [*lm_shape(mixer, s.dim, s.layers), "--data.dataset", "bytes",
                        "--training.seq_len", str(s.seq_len), "--training.local_batch_size", str(s.batch),
                        "--optimizer.lr", str(s.lr), "--lr_scheduler.warmup_steps", str(s.warmup)]
            else:
                args = [f"train_configs/mqar_{mixer}.toml"]
            args += ["--training.steps", str(steps), "--job.dump_folder", rel(run.dump),
                     "--job.description", f"study {run.name}", "--checkpoint.enable", "true",
                     "--checkpoint.interval", str(steps), "--checkpoint.keep_latest_k", "1",
                     "--metrics.enable_jsonl", "true", "--metrics.log_freq", str(max(1, steps // 20))]
            for target, override in s.set:
                if target in (task, mixer, run.name):
                    key, _, value = override.partition("=")
                    args += [f"--{key}", value]
            run.train_args = args
            runs.append(run)
    return runs


def train_summary(run: Run) -> dict[str, Any]:
    """Steps done (the newest checkpoint), mean tokens/s after the first log interval, last training loss."""
    steps = [int(p.name[5:]) for p in (run.dump / "checkpoint").glob("step-*") if p.name[5:].isdigit()]
    jsonl = run.dump / "metrics.jsonl"
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()] if jsonl.is_file() else []
    timed = rows[1:] or rows
    return {"steps_done": max(steps, default=0),
            "tokens_per_s": sum(r["throughput/tokens_per_s"] for r in timed) / len(timed) if timed else None,
            "final_train_loss": rows[-1]["loss/train"] if rows else None}


class Study:
    """The options, the runs and ``<out>/results.json``, which every finished job updates."""

    def __init__(self, s: argparse.Namespace, argv: list[str]) -> None:
        self.s, self.runs = s, plan(s)
        self.path = s.out / "results.json"
        self.state: dict[str, Any] = json.loads(self.path.read_text()) if self.path.is_file() else {}
        self.state.setdefault("meta", {}).setdefault("commands", [])
        self.state.setdefault("runs", {})
        self.command = shlex.join(["python", "scripts/study.py", *argv])

    def log_command(self) -> None:
        """Remember this invocation for the report's list of commands."""
        if self.command not in self.state["meta"]["commands"]:
            self.state["meta"]["commands"].append(self.command)

    def save(self) -> None:
        self.s.out.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=1) + "\n")
        os.replace(tmp, self.path)

    def record(self, run: Run, phase: str, job: Job) -> Callable[[Outcome], None]:
        def done(out: Outcome) -> None:
            entry = {"status": out.status, "returncode": out.returncode, "wall_s": round(out.wall_s, 1),
                     "gpu": out.gpu, "log": rel(job.log), "command": shlex.join(["python", *job.command[1:]])}
            if out.why:
                entry["why" if out.status == "skipped" else "log_tail"] = out.why
            r = self.state["runs"].setdefault(run.name, {})
            if phase == "train":
                r.clear()
                r.update(task=run.task, mixer=run.mixer, dump=rel(run.dump))
                entry.update(steps=run.steps, tokens_per_step=run.tokens_per_step)
                if out.status != "skipped":  # else the folder may hold an older run's files
                    entry.update(train_summary(run))
            numbers = run.dump / "eval" / "numbers.json"
            if phase == "eval" and out.status == "ok" and numbers.is_file():
                entry["numbers"] = json.loads(numbers.read_text())
            r[phase] = entry
            self.save()
        return done

    def jobs(self, phases: tuple[str, ...]) -> list[Job]:
        logs = self.s.out / "logs"
        jobs = []
        if self.s.gpus and any(r.mixer in SELECTIVE_SCAN for r in self.runs):
            jobs.append(Job(BUILD, [sys.executable, "-m", "longhorn_zoo.plugins.selective_scan.cuda", "--build"],
                            logs / "build_selective_scan.log", uses_slot=False))
        build = (BUILD,) if jobs else ()
        for phase in phases:
            for run in self.runs:
                needs = build if run.mixer in SELECTIVE_SCAN else ()
                if phase == "train":
                    job = Job(f"train {run.name}", run.train_command(), logs / f"train_{run.name}.log", after=needs,
                              stoppable=True, before=lambda d=run.dump: shutil.rmtree(d, ignore_errors=True))
                else:
                    after = (*needs, f"train {run.name}") if "train" in phases else needs
                    job = Job(f"eval {run.name}", run.eval_command(self.s.eval_tokens), logs / f"eval_{run.name}.log",
                              after=after)
                job.done = self.record(run, phase, job)
                jobs.append(job)
        return jobs

    def run(self, phases: tuple[str, ...]) -> bool:
        """Run the jobs of ``phases`` (print them with --dry-run); True if every job succeeded."""
        jobs = self.jobs(phases)
        if self.s.dry_run:
            for job in jobs:
                print(shlex.join(["python", *job.command[1:]]))
            return True
        meta = self.state["meta"]
        self.log_command()
        if "train" in phases:
            meta.update(env=self.s.env, started=datetime.datetime.now().isoformat(timespec="seconds"),
                        gpus=self.s.gpus, jobs_per_gpu=self.s.jobs_per_gpu,
                        settings={k: getattr(self.s, k) for k in PRESETS["full"]})
        skipped = []
        if "eval" in phases and "train" not in phases:
            for job in [j for j in jobs if j.name.startswith("eval ")]:
                run = next(r for r in self.runs if job.name == f"eval {r.name}")
                if not (run.dump / "checkpoint").is_dir():
                    jobs.remove(job)
                    skipped.append(job.name)
                    say(f"skip   {job.name}: no checkpoint in {rel(run.dump)}")
                    job.done(Outcome("skipped", why=f"no checkpoint in {rel(run.dump)}"))
        self.save()
        where = f"GPUs {','.join(self.s.gpus)}, {self.s.jobs_per_gpu} at a time on each" if self.s.gpus \
            else f"the CPU, {self.s.jobs_per_gpu} at a time"
        say(f"{len(jobs)} job{'s' * (len(jobs) != 1)} on {where}; results in {rel(self.path)}")
        outcomes = run_jobs(jobs, self.s.gpus, self.s.jobs_per_gpu, self.s.train_time_limit)
        failed = skipped + [n for n, o in outcomes.items() if o.status in ("failed", "skipped")]
        say(f"finished: {len(outcomes) + len(skipped) - len(failed)} of {len(outcomes) + len(skipped)} jobs ok"
            + (f"; not ok: {', '.join(failed)}" if failed else ""))
        if "train" in phases:
            meta["build"] = outcomes[BUILD].status if BUILD in outcomes else None
        self.save()
        return not failed


def write_report(study: Study, md: Path) -> None:
    if study.s.phase == "report":
        study.log_command()
        study.save()
    text = render(study.state, study.s.mixers, rel(study.path))
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(text)
    print("\n".join(line for line in text.splitlines() if line.startswith("|")))
    say(f"report: {md}")


# ---------------------------------------------------------------------------------------------- command line

EPILOG = """\
examples:
  python scripts/study.py all --gpus 0,1,2,3 --train-time-limit 450   (4 GPUs: all of it within 10 minutes)
  python scripts/study.py train --tasks mqar --mqar-steps 5000         (the MQAR runs again, longer)
  python scripts/study.py eval && python scripts/study.py report --md /tmp/results.md
  python scripts/study.py all --tiny --gpus cpu --mixers llama,longhorn --out /tmp/study --md /tmp/results.md
  python scripts/study.py all --dry-run                                (print the commands only)

On a 4-GPU H200 host with the full preset (2 jobs per GPU), the LM and MQAR runs of llama, gla, retnet and
rwkv start at once; those of Longhorn, Mamba and the hybrid once the CUDA extension is built (about 2 minutes the first
time); each run is evaluated as soon as it has trained. results.json is updated after every job, so a run
cut short still leaves its numbers. Exit status 1 if any job failed or was skipped; the report is written
anyway and marks what is missing.
"""


def parse_set(text: str) -> tuple[str, str]:
    target, sep, override = text.partition(":")
    override = override.removeprefix("--")
    if not sep or "=" not in override or "." not in override.partition("=")[0]:
        raise argparse.ArgumentTypeError(f"{text!r}: expected TARGET:section.key=value, e.g. lm:optimizer.lr=2e-3")
    targets = ("lm", "mqar", *MIXERS, *(f"{t}_{m}" for t in ("lm", "mqar") for m in MIXERS))
    if target not in targets:
        raise argparse.ArgumentTypeError(f"{text!r}: the target {target!r} is none of lm, mqar, a mixer "
                                         f"({', '.join(MIXERS)}) or a run such as lm_{MIXERS[0]}")
    return target, override


def parse_list(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = list(choices) if text == "all" else [n.strip() for n in text.split(",") if n.strip()]
        bad = [n for n in names if n not in choices]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(choices)} (comma-separated) or all")
        return names
    return parse


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("runs and machine")
    g.add_argument("--mixers", type=parse_list(MIXERS), default=list(MIXERS), help="comma-separated, or all (default)")
    g.add_argument("--tasks", type=parse_list(("lm", "mqar")), default=["lm", "mqar"],
                   help="lm (byte-level language model), mqar, or both (default)")
    g.add_argument("--out", type=Path, help="runs, logs and results.json (default: outputs/study, with --tiny "
                                            "outputs/study-tiny)")
    g.add_argument("--gpus", help="comma-separated GPU ids, or cpu (default: every visible GPU, else the CPU)")
    g.add_argument("--jobs-per-gpu", type=int, default=2, help="jobs sharing one GPU at a time (CPU: at a time in all)")
    g.add_argument("--train-time-limit", type=float, default=0, metavar="SECONDS",
                   help="after this long, running training jobs get SIGTERM (they save and stop; the report says at "
                        "which step) and queued ones are skipped; evaluations still run. 0: no limit")
    g.add_argument("--set", type=parse_set, action="append", default=[], metavar="TARGET:KEY=VALUE",
                   help="an extra trainer override for the runs of TARGET: lm, mqar, a mixer or a run such as "
                        "lm_rwkv; e.g. --set lm:optimizer.lr=2e-3. Repeatable")
    g.add_argument("--dry-run", action="store_true", help="print the job commands and run nothing")
    s = common.add_argument_group("size and budget (defaults: the full preset; --tiny: the CPU test preset)")
    s.add_argument("--tiny", action="store_true", help="dim 32, 2 blocks, a few steps: minutes on one CPU core")
    s.add_argument("--dim", type=int, help="LM width (full: 384)")
    s.add_argument("--layers", type=int, help="LM blocks; Longhorn, Mamba and the hybrid get twice as many (full: 12)")
    s.add_argument("--seq-len", type=int, help="LM training context (full: 512)")
    s.add_argument("--batch", type=int, help="LM sequences per step (full: 16)")
    s.add_argument("--lm-steps", type=int, help="LM steps, the same for every mixer (full: 1500)")
    s.add_argument("--lr", type=float, help="LM peak learning rate (full: 1e-3)")
    s.add_argument("--warmup", type=int, help="LM warm-up steps (full: 100)")
    s.add_argument("--mqar-steps", type=int, help="MQAR steps, the same for every mixer (full: 3000)")
    s.add_argument("--eval-tokens", type=int, help="validation tokens per evaluated length (full: 65536)")
    p = argparse.ArgumentParser(prog="python scripts/study.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    sub = p.add_subparsers(dest="phase", required=True, metavar="{train,eval,report,all}")
    for name, text in (("train", "train every run (removes that run's old folder first)"),
                       ("eval", "evaluate every trained run"),
                       ("report", "write the markdown from results.json"),
                       ("all", "train, evaluate (each run as soon as it has trained), report")):
        sp = sub.add_parser(name, parents=[common], help=text, description=text)
        if name in ("report", "all"):
            sp.add_argument("--md", type=Path, help="markdown to write (default: docs/results.md, with --tiny "
                                                    "<out>/results.md)")
    return p


def probe() -> dict[str, Any]:
    """Versions, GPUs and corpus size, from the interpreter and repository the jobs use."""
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"error: could not import torch and the trainer:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    preset = PRESETS["tiny" if args.tiny else "full"]
    for key, value in preset.items():
        if key == "set":
            args.set = [*value, *args.set]
        elif getattr(args, key) is None:
            setattr(args, key, value)
    args.out = (args.out or ROOT / "outputs" / ("study-tiny" if args.tiny else "study")).resolve()
    if args.phase in ("report", "all"):
        args.md = (args.md or (args.out / "results.md" if args.tiny else ROOT / "docs" / "results.md")).resolve()
    if args.phase != "report":
        args.env = probe()
        if args.gpus is None:
            args.gpus = [str(i) for i in range(args.env["gpus"])]
        else:
            args.gpus = [] if args.gpus in ("", "cpu") else [g.strip() for g in args.gpus.split(",")]
    study = Study(args, argv)
    if args.phase == "report" and not study.path.is_file():
        print(f"error: no {study.path}; run `python scripts/study.py train` first", file=sys.stderr)
        return 2
    ok = args.phase == "report" or study.run(("train", "eval") if args.phase == "all" else (args.phase,))
    if args.phase in ("report", "all") and not args.dry_run:
        write_report(study, args.md)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
