"""lm-evaluation-harness, offline, on a tiny local task: python -m longhorn_zoo.lm_eval from a training checkpoint.

The task files and their data are written by the test; lm-eval's scores must equal the same
log-likelihoods computed directly with our LM. Needs the ``hf`` extra (lm-eval, transformers,
accelerate); skipped without it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from longhorn_zoo import lm_eval as zoo_lm_eval  # noqa: E402
from longhorn_zoo.config import load_config  # noqa: E402
from longhorn_zoo.inference import load_trained  # noqa: E402
from longhorn_zoo.train import train  # noqa: E402

DOCS = [
    {"context": "def f(x):", "continuation": " return x", "choices": ["a", "bb", "ccc"], "label": 0},
    {"context": "import os", "continuation": ".path", "choices": ["sys", "os", "re"], "label": 1},
    {"context": "for i in", "continuation": " range(3):", "choices": ["if", "elif", "else"], "label": 2},
    {"context": "class A", "continuation": "(object):", "choices": ["x = 1", "y", "zz"], "label": 1},
]
TASKS = {
    "zoo_ll": 'output_type: loglikelihood\ndoc_to_text: "{{context}}"\ndoc_to_target: "{{continuation}}"\n'
              "metric_list:\n  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
              "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n",
    "zoo_mc": 'output_type: multiple_choice\ndoc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\n'
              "doc_to_target: label\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n",
}


def write_tasks(folder: Path) -> Path:
    """The two task YAML files and their jsonl data, in ``folder``."""
    folder.mkdir()
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    for name, body in TASKS.items():
        (folder / f"{name}.yaml").write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                             f"    test: {data}\ntest_split: test\n{body}")
    return folder


@torch.no_grad()
def loglikelihood(model, context: str, continuation: str) -> tuple[float, bool]:
    """log p(continuation | context) under the byte-level model, and whether greedy decoding would produce it."""
    ctx, cont = list(context.encode()), list(continuation.encode())
    logp = model(torch.tensor([ctx + cont])[:, :-1]).log_softmax(-1)[0, len(ctx) - 1 :]
    target = torch.tensor(cont)
    return float(logp.gather(-1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())


def test_lm_eval_scores_a_checkpoint_as_our_own_log_likelihoods_do(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    dump = tmp_path / "run"
    train(load_config(None, ["--model.name", "longhorn", "--model.dim", "32", "--model.n_layers", "2",
                             "--training.seq_len", "64", "--training.local_batch_size", "4", "--training.steps", "6",
                             "--checkpoint.enable", "true", "--metrics.enable_tensorboard", "false",
                             "--job.dump_folder", str(dump)]))
    out = tmp_path / "results.json"
    assert zoo_lm_eval.main(["--checkpoint", str(dump), "--tasks", "zoo_ll,zoo_mc", "--include-path",
                             str(write_tasks(tmp_path / "tasks")), "--batch-size", "3", "--output", str(out)]) == 0
    assert "zoo_mc" in capsys.readouterr().out
    results = json.loads(out.read_text())["results"]

    model, _ = load_trained(dump)
    scored = [loglikelihood(model, d["context"], d["continuation"]) for d in DOCS]
    perplexity = math.exp(-sum(ll for ll, _ in scored) / len(DOCS))
    assert results["zoo_ll"]["perplexity,none"] == pytest.approx(perplexity, rel=1e-5)
    assert results["zoo_ll"]["acc,none"] == sum(greedy for _, greedy in scored) / len(DOCS)
    acc = acc_norm = 0
    for d in DOCS:
        lls = [loglikelihood(model, d["context"], " " + c)[0] for c in d["choices"]]
        acc += max(range(3), key=lambda i: lls[i]) == d["label"]
        acc_norm += max(range(3), key=lambda i: lls[i] / len(d["choices"][i])) == d["label"]
    assert results["zoo_mc"]["acc,none"] == acc / len(DOCS)
    assert results["zoo_mc"]["acc_norm,none"] == acc_norm / len(DOCS)


def test_paper_suites_expand_to_lm_eval_task_names_and_average_the_reported_metrics():
    assert zoo_lm_eval.expand_tasks("mamba") == ["lambada_openai", "hellaswag", "piqa", "arc_easy", "arc_challenge",
                                                 "winogrande", "openbookqa"]
    assert len(zoo_lm_eval.expand_tasks("longhorn")) == 8
    assert zoo_lm_eval.expand_tasks("paper,piqa,my_task") == [*zoo_lm_eval.SUITES["paper"], "my_task"]
    import lm_eval

    tasks = Path(lm_eval.__file__).parent / "tasks"  # their YAML files, two levels down: faster than indexing all
    files = [*tasks.glob("*/*.yaml"), *tasks.glob("*/*/*.yaml")]
    named = {line.split(":", 1)[1].strip() for f in files for line in f.read_text().splitlines()
             if line.startswith("task:")}
    assert set(zoo_lm_eval.SUITES["paper"]) <= named
    mean, scores = zoo_lm_eval.paper_average({"hellaswag": {"acc,none": 0.3, "acc_norm,none": 0.5},
                                              "piqa": {"acc,none": 0.7}, "my_task": {"acc,none": 0.0}})
    assert scores == {"hellaswag": 0.5, "piqa": 0.7} and mean == pytest.approx(0.6)
