"""The markdown report of the reproduction study (``scripts/study.py report``).

Pure functions from the study's ``results.json`` state to the text of ``docs/results.md``: the
header (machine, versions, recipe), the language-model and MQAR tables, and generated observations
against the Longhorn paper's claims, for the author to check and edit by hand.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

FACTORS = (1, 2, 4, 8, 16)  # longhorn_zoo.eval.FACTORS, without importing torch here


def num(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def eval_numbers(r: dict[str, Any] | None) -> dict[str, Any]:
    return ((r or {}).get("eval") or {}).get("numbers") or {}


def mqar_at_trained(n: dict[str, Any]) -> float | None:
    """Recall accuracy at the trained pairs and length, if the sweep has that setting."""
    hits = [row["accuracy"] for row in n.get("mqar", [])
            if row["pairs"] == n.get("mqar_num_kv_pairs") and row["seq_len"] == n.get("seq_len")]
    return hits[0] if hits else None


def trained(r: dict[str, Any] | None) -> dict[str, Any]:
    """The training record of a run that trained (to the end or to the time limit), else {}."""
    t = (r or {}).get("train") or {}
    return t if t.get("status") in ("ok", "stopped") else {}


def status(r: dict[str, Any] | None) -> str:
    """ok, or what is missing and which log says why."""
    if not r:
        return "**not run**"
    t, e = r.get("train"), r.get("eval")
    if t and t["status"] == "failed":
        return f"**train failed** (exit {t['returncode']}, `{t['log']}`)"
    if t and t["status"] == "skipped":
        return f"**train skipped** ({t['why']})"
    if not e:
        done = "**not evaluated**"
    elif e["status"] == "failed":
        done = f"**eval failed** (exit {e['returncode']}, `{e['log']}`)"
    elif e["status"] == "skipped":
        done = f"**eval skipped** ({e['why']})"
    else:
        done = "ok"
    if t and t["status"] == "stopped":
        stop = f"**stopped at step {t['steps_done']} of {t['steps']}** (time limit)"
        return stop if done == "ok" else f"{stop}; {done}"
    return done


def observations(runs: dict[str, dict[str, Any]], mixers: list[str], tokens: str) -> list[str]:
    """Plain comparisons of the measured numbers with the paper's three claims (no judgement beyond them)."""
    lm = {m: eval_numbers(runs.get(f"lm_{m}")) for m in mixers}
    lm = {m: n for m, n in lm.items() if "val_loss" in n}
    mq = {m: mqar_at_trained(eval_numbers(runs.get(f"mqar_{m}"))) for m in mixers}
    mq = {m: a for m, a in mq.items() if a is not None}
    out = []
    if lm:
        order = sorted(lm, key=lambda m: lm[m]["val_loss"])
        out.append(f"Validation loss after {tokens} tokens, lowest first: "
                   + ", ".join(f"{m} {lm[m]['val_loss']:.4f}" for m in order) + ".")
    if "longhorn" in lm and "mamba" in lm:
        d = lm["mamba"]["val_loss"] - lm["longhorn"]["val_loss"]
        verdict = ("is too small to separate at one seed (under 0.01)" if abs(d) < 0.01
                   else f"{'agrees' if d > 0 else 'disagrees'} with the claim")
        out.append(f"Sample efficiency (paper: Longhorn beats Mamba at equal tokens): Longhorn "
                   f"{lm['longhorn']['val_loss']:.4f} vs Mamba {lm['mamba']['val_loss']:.4f}, "
                   f"{'lower' if d > 0 else 'higher'} by {abs(d):.4f} nats per byte; this {verdict}.")
    if lm:
        ratios = {m: [r["ppl"] / n["extrapolation"][0]["ppl"] for r in n["extrapolation"]] for m, n in lm.items()
                  if n["extrapolation"][-1]["factor"] == FACTORS[-1]}
        short = [m for m in lm if m not in ratios]  # not evaluated that far (a learned position embedding)
        out.append(f"Perplexity at {FACTORS[-1]}x the training context over 1x: "
                   + ", ".join(f"{m} {r[-1]:.2f}" for m, r in ratios.items())
                   + (f"; not evaluated at {FACTORS[-1]}x: {', '.join(short)}" if short else "") + ".")
        if "longhorn" in ratios:
            worst = max(ratios["longhorn"])
            verdict = "agrees with" if worst <= 1.05 else "disagrees with"
            out.append(f"Length extrapolation (paper: Longhorn's perplexity stays flat to 16x): its perplexity is at "
                       f"most {worst:.2f}x the 1x value over 1x-{FACTORS[-1]}x (flat here means at most 1.05x); "
                       f"this {verdict} the claim.")
    if mq:
        order = sorted(mq, key=lambda m: -mq[m])
        out.append("MQAR accuracy at the trained setting, highest first: "
                   + ", ".join(f"{m} {100 * mq[m]:.1f}%" for m in order) + ".")
        if "longhorn" in mq:
            rank = order.index("longhorn") + 1
            out.append(f"Associative recall (paper: Longhorn recalls well): Longhorn ranks {rank} of {len(order)} "
                       f"at {100 * mq['longhorn']:.1f}%; see the sweep for longer sequences and more pairs.")
    return out or ["No evaluated runs yet."]


def count(n: float) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,.0f}"


def header(meta: dict[str, Any], results: str) -> list[str]:
    """The title, the machine and versions, and the recipe of the runs."""
    env, st, gpus = meta.get("env", {}), meta.get("settings", {}), meta.get("gpus") or []
    machine = (f"{len(gpus)} x {env.get('gpu_name')} (GPUs {','.join(gpus)}), {meta.get('jobs_per_gpu')} jobs per GPU "
               f"at a time; CUDA {env.get('cuda')}" if gpus else f"the CPU, {meta.get('jobs_per_gpu')} jobs at a time")
    build = {None: "was not used", "ok": "was built",
             "failed": f"**failed to build** (`{Path(results).parent / 'logs' / 'build_selective_scan.log'}`)"}
    tokens = st.get("lm_steps", 0) * st.get("batch", 0) * st.get("seq_len", 0)
    return [
        "# Reproduction study (issue 9)", "",
        f"Written by `scripts/study.py report` from `{results}` on {datetime.date.today().isoformat()}; "
        "running the report again rewrites this file. The numbers come from the runs it names; the last section "
        "is edited by hand.", "",
        f"- **Trained** {meta.get('started', '(not recorded)')} on {machine}. Python {env.get('python')}, "
        f"torch {env.get('torch')}, triton {env.get('triton')}; the selective-scan CUDA extension "
        f"{build.get(meta.get('build'), meta.get('build'))}.",
        f"- **Language models**: the embedded byte corpus (`data.dataset = \"bytes\"`: the Python "
        f"{env.get('python')} standard library, {env.get('corpus_train_bytes', 0):,} training and "
        f"{env.get('corpus_val_bytes', 0):,} validation bytes). Width {st.get('dim')}, {st.get('layers')} blocks "
        f"({2 * (st.get('layers') or 0)} MLP-free blocks for Longhorn, Mamba and the hybrid, whose attention blocks "
        f"come one in eight), context {st.get('seq_len')}, "
        f"{st.get('batch')} sequences per step, {st.get('lm_steps')} steps: {count(tokens)} tokens per run "
        f"({tokens / max(env.get('corpus_train_bytes', 1), 1):.2f} epochs). AdamW, peak LR {st.get('lr')}, "
        f"{st.get('warmup')} warm-up steps, cosine to 10%, {'bf16 autocast' if gpus else 'fp32'}, seed 0.",
        f"- **MQAR**: `train_configs/mqar_<mixer>.toml` (each mixer's width and LR), {st.get('mqar_steps')} steps "
        "for every mixer.",
        f"- **Evaluation** (`longhorn_zoo.eval`, fp32): validation loss and perplexity on {st.get('eval_tokens', 0):,} "
        "tokens per length at 1x-16x the training context; MQAR recall accuracy on 4 batches per setting.",
        f"- Extra overrides: {', '.join(f'`{t}:{o}`' for t, o in st.get('set', [])) or 'none'}.",
    ]


def shape(n: dict[str, Any]) -> str:
    return f"{n['n_layers']} x {n['dim']}" if n else "—"


def lm_table(runs: dict[str, Any], mixers: list[str], seq_len: int) -> list[str]:
    L = ["| mixer | layers x dim | params (non-emb.) | tokens | train tok/s | val loss | "
         + " | ".join(f"ppl {f}x ({f * seq_len})" for f in FACTORS) + " | MQAR acc | status |",
         "|---|---|---|---|---|---|" + "---|" * len(FACTORS) + "---|---|"]
    for m in mixers:
        r, n = runs.get(f"lm_{m}"), eval_numbers(runs.get(f"lm_{m}"))
        t = trained(r)
        tokens = t["steps_done"] * t["tokens_per_step"] if t.get("tokens_per_step") else None
        ppl = {e["factor"]: e["ppl"] for e in n.get("extrapolation", [])}
        cells = [m, shape(n), num(n.get("params_non_embedding"), ","), num(tokens, ","),
                 num(t.get("tokens_per_s"), ",.0f"), num(n.get("val_loss"), ".4f"),
                 *(num(ppl.get(f), ".3f") for f in FACTORS),
                 num(mqar_at_trained(eval_numbers(runs.get(f"mqar_{m}"))), ".3f"), status(r)]
        L.append("| " + " | ".join(cells) + " |")
    return L


def mqar_table(runs: dict[str, Any], mixers: list[str]) -> list[str]:
    numbers = {m: eval_numbers(runs.get(f"mqar_{m}")) for m in mixers}
    settings = sorted({(row["pairs"], row["seq_len"]) for n in numbers.values() for row in n.get("mqar", [])})
    columns = ["mixer", "layers x dim", "params (non-emb.)", "steps", *(f"{p} pairs, len {t}" for p, t in settings),
               "status"]
    L = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for m, n in numbers.items():
        r = runs.get(f"mqar_{m}")
        acc = {(row["pairs"], row["seq_len"]): row["accuracy"] for row in n.get("mqar", [])}
        cells = [m, shape(n), num(n.get("params_non_embedding"), ","),
                 num(trained(r).get("steps_done"), "d"),
                 *(num(acc.get(k), ".3f") for k in settings), status(r)]
        L.append("| " + " | ".join(cells) + " |")
    at = sorted({(n["mqar_num_kv_pairs"], n["seq_len"]) for n in numbers.values() if n})
    return L + (["", "Trained at " + ", ".join(f"{p} pairs, length {t}" for p, t in at) + "."] if at else [])


def render(state: dict[str, Any], mixers: list[str], results: str) -> str:
    meta, runs = state.get("meta", {}), state.get("runs", {})
    lm_tokens = {t["steps_done"] * t["tokens_per_step"] for m in mixers if (t := trained(runs.get(f"lm_{m}")))}
    params = [n["params_non_embedding"] for m in mixers if (n := eval_numbers(runs.get(f"lm_{m}")))]
    seq_len = meta.get("settings", {}).get("seq_len", 0)
    L = header(meta, results)
    L += ["", "## Language modelling and recall", "", *lm_table(runs, mixers, seq_len),
          "", "Train tok/s: the mean over the log intervals after the first, measured while other jobs shared the "
          "device, so compare it with care. MQAR acc: at the trained setting of the sweep below."]
    if len(lm_tokens) > 1:
        L += ["", "**Note: the language models did not all see the same number of tokens (see the tokens column).**"]
    L += ["", "## MQAR sweep", "", *mqar_table(runs, mixers)]
    failures = [(name, phase, r[phase]) for name, r in runs.items() for phase in ("train", "eval")
                if (r.get(phase) or {}).get("status") == "failed"]
    if failures:
        L += ["", "## Failed jobs"]
        for name, phase, j in failures:
            L += ["", f"`{phase} {name}` exited with {j['returncode']}; the end of `{j['log']}`:", "", "```",
                  j.get("log_tail", ""), "```"]
    jobs = [r[phase]["command"] for r in runs.values() for phase in ("train", "eval") if phase in r]
    L += ["", "## Commands", "", "From the repository root:", "", "```bash", *meta.get("commands", []), "```", "",
          "<details><summary>Every job's command</summary>", "", "```bash", *jobs,
          "```", "", "</details>", "", "## What the numbers show", "",
          "Generated from the tables above against the claims of the Longhorn paper (arXiv 2407.14207); check and "
          "edit by hand. Caveats: "
          + (f"{count(min(params))}-{count(max(params))} non-embedding parameters " if params else "")
          + "(the paper: 120M-1.3B), bytes of Python source (the paper: SlimPajama), one seed.", ""]
    tokens = count(lm_tokens.pop()) if len(lm_tokens) == 1 else "(unequal)"
    return "\n".join([*L, *(f"- {line}" for line in observations(runs, mixers, tokens))]) + "\n"
