"""Hugging Face tokenizer files: a local tokenizer.json as data.tokenizer, and the files an export carries.

Needs ``tokenizers`` (the ``hf`` extra) and the ``data`` extra; the test tokenizers are trained here
on a few KB of text, offline.
"""

from __future__ import annotations

import collections
import json
import random
from pathlib import Path

import pytest
import torch

tokenizers = pytest.importorskip("tokenizers")
pytest.importorskip("datasets")

from longhorn_zoo import eval as evaluation  # noqa: E402
from longhorn_zoo import generate as generation  # noqa: E402
from longhorn_zoo.config import load_config  # noqa: E402
from longhorn_zoo.data import DataError, build_dataloader  # noqa: E402
from longhorn_zoo.data.tokenizer import CL100K_PAT, R50K_PAT, ByteTokenizer, HFTokenizer, build_tokenizer  # noqa: E402
from longhorn_zoo.data.tokenizer_files import rust_tokenizer  # noqa: E402
from longhorn_zoo.tomlcompat import tomllib  # noqa: E402
from longhorn_zoo.train import train  # noqa: E402

TEXT = "\n\n".join(f"def function_{i}(x, y):\n    return x * {i} + y  # the {i}th line, café\n" for i in range(120))
ODD = ["", "  leading and trailing  ", "tabs\tand\nnewlines\r\n", "naïve café — 東京 🙂", "x" * 50, "a\0b", "12345 678"]


def train_tokenizer_json(path: Path, vocab_size: int = 320) -> Path:
    """A byte-level BPE trained on TEXT, with <|endoftext|> as its special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def bpe_ranks(text: str, pattern: str, merges: int) -> dict[bytes, int]:
    """tiktoken-style ranks: the 256 bytes, then ``merges`` most frequent adjacent pairs, merged greedily."""
    import regex  # tiktoken's dependency, which has the \p{L} classes and possessive quantifiers

    ranks = {bytes([b]): b for b in range(256)}
    words = [[bytes([b]) for b in w.encode()] for w in regex.findall(pattern, text)]
    for _ in range(merges):
        pairs = collections.Counter(p for w in words for p in zip(w, w[1:]))
        if not pairs:
            break
        (a, b), _ = pairs.most_common(1)[0]
        ranks[a + b] = len(ranks)
        for w in words:
            i = 0
            while i < len(w) - 1:
                if (w[i], w[i + 1]) == (a, b):
                    w[i : i + 2] = [a + b]
                i += 1
    return ranks


@pytest.mark.parametrize("pattern", [R50K_PAT, CL100K_PAT], ids=["r50k", "cl100k"])
def test_a_tiktoken_encoding_converts_to_a_tokenizer_json_with_the_same_ids(pattern):
    tiktoken = pytest.importorskip("tiktoken")
    from longhorn_zoo.data.tokenizer import TiktokenTokenizer

    ranks = bpe_ranks(TEXT, pattern, 150)
    enc = tiktoken.Encoding("tiny", pat_str=pattern, mergeable_ranks=ranks,
                            special_tokens={"<|endoftext|>": len(ranks) + 3})  # a gap before the special id
    tok = TiktokenTokenizer(enc)
    rust = rust_tokenizer(tok)
    rng = random.Random(0)
    lines = TEXT.splitlines()
    samples = ODD + ["\n".join(rng.sample(lines, 6)) for _ in range(20)] + ["unseen words: zebra quokka 42"]
    for text in samples:
        assert rust.encode(text, add_special_tokens=False).ids == enc.encode_ordinary(text), repr(text)
        assert rust.decode(enc.encode_ordinary(text)) == text
    assert rust.token_to_id("<|endoftext|>") == tok.eos_id == len(ranks) + 3


def test_the_byte_tokenizer_json_gives_byte_ids_and_nul_as_eos():
    rust = rust_tokenizer(ByteTokenizer())
    for text in ODD:
        assert rust.encode(text, add_special_tokens=False).ids == list(ByteTokenizer().encode([text])[0]), repr(text)
    assert rust.token_to_id("<|endoftext|>") == 0
    assert rust.decode(list("café".encode())) == "café"


def test_tokenizer_json_files_are_checked_with_clear_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_tokenizer(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(DataError, match="not a valid Hugging Face tokenizer.json"):
        build_tokenizer(str(tmp_path / "bad.json"))
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(DataError, match="has no EOS token"):
        build_tokenizer(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "a"}))
    assert build_tokenizer(str(tmp_path / "tokenizer.json")).eos_id == 0


def test_a_tokenizer_json_trains_evaluates_generates_and_travels_with_the_export(tmp_path, capsys):
    path = train_tokenizer_json(tmp_path / "tok" / "tokenizer.json")
    tok = build_tokenizer(str(path))
    assert isinstance(tok, HFTokenizer) and tok.eos_id == 0 and tok.vocab_size == 320
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": p}) + "\n" for p in TEXT.split("\n\n")))
    dump = tmp_path / "run"
    cfg = load_config(None, ["--model.name", "longhorn", "--model.dim", "32", "--model.n_layers", "2",
                             "--model.vocab_size", "-1", "--data.dataset", "text", "--data.source", str(corpus),
                             "--data.tokenizer", str(path), "--data.val_docs", "10", "--training.seq_len", "32",
                             "--training.local_batch_size", "4", "--training.steps", "3", "--checkpoint.enable", "true",
                             "--metrics.enable_tensorboard", "false", "--job.dump_folder", str(dump)])
    batch = next(build_dataloader(cfg, 0, 1))
    assert batch["inputs"].max() < 320 and (batch["inputs"] == 0).any()  # documents end with <|endoftext|>
    train(cfg)
    recorded = tomllib.loads((dump / "config.toml").read_text())["data"]["tokenizer"]
    assert recorded == str(path.resolve()) and cfg.model.vocab_size == 320

    assert evaluation.main(["--checkpoint", str(dump), "--tokens", "256", "--out", str(tmp_path / "eval")]) == 0
    assert "validation loss" in capsys.readouterr().out
    assert generation.main(["--checkpoint", str(dump), "--prompt", "def function_", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.startswith("def function_")

    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    from longhorn_zoo.export import export_run

    folder = export_run(dump, tmp_path / "model")
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    for text in [*ODD, TEXT[:300]]:
        assert hf_tok(text)["input_ids"] == tok.encode([text])[0], repr(text)
    assert hf_tok.eos_token == "<|endoftext|>" and hf_tok.eos_token_id == 0
    assert torch.equal(torch.tensor(tok.encode(["x = 1"])[0]), hf_tok("x = 1", return_tensors="pt")["input_ids"][0])
