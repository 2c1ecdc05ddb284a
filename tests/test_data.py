"""The real-data path: sources, tokenizers, packing, sharding, resume, token shards, memory, bad input.

Local files only (CI has no network). Needs the ``data`` extra (datasets, tiktoken).
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp

pytest.importorskip("datasets")
tiktoken = pytest.importorskip("tiktoken")

from longhorn_zoo.config import JobConfig  # noqa: E402
from longhorn_zoo.data import DataError, build_dataloader, resolve_vocab_size  # noqa: E402
from longhorn_zoo.data.errors import DataUnavailableError  # noqa: E402
from longhorn_zoo.data.packing import PackedTextStream  # noqa: E402
from longhorn_zoo.data.prepare import prepare  # noqa: E402
from longhorn_zoo.data.shards import ShardLoader, ShardSet, ShardWriter, read_index  # noqa: E402
from longhorn_zoo.data.sources import TextSource  # noqa: E402
from longhorn_zoo.data.tokenizer import ByteTokenizer, TiktokenTokenizer, build_tokenizer  # noqa: E402

DOCS = [f"document {i}: " + "lorem ipsum " * (i % 7) for i in range(60)]


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return path


def byte_docs(stream: list[int]) -> list[bytes]:
    """Split a byte-token stream at EOS (NUL) into documents."""
    return bytes(stream).split(b"\0")


def take(loader, n: int) -> list[dict[str, torch.Tensor]]:
    return [next(loader) for _ in range(n)]


def same(a: list[dict], b: list[dict]) -> bool:
    return all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


def test_jsonl_txt_and_parquet_sources_yield_the_documents_with_held_out_validation(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_jsonl(tmp_path / "c.jsonl", DOCS)
    (tmp_path / "c.txt").write_text("\n\n".join(DOCS) + "\n")
    pq.write_table(pa.table({"body": DOCS}), tmp_path / "c.parquet", row_group_size=16)
    for source, field in [("c.jsonl", "text"), ("c.txt", "text"), ("c.parquet", "body")]:
        src = TextSource(str(tmp_path / source), text_field=field, val_docs=5)
        assert [d.strip() for d in src.documents("val")] == [d.strip() for d in DOCS[:5]], source
        assert [d.strip() for d in src.documents("train")] == [d.strip() for d in DOCS[5:]], source
    (tmp_path / "more").mkdir()
    write_jsonl(tmp_path / "more" / "a.jsonl", DOCS[:30])
    write_jsonl(tmp_path / "more" / "b.jsonl", DOCS[30:])
    for source in [tmp_path / "more", tmp_path / "more" / "*.jsonl"]:
        assert sorted(TextSource(str(source), val_docs=0).documents("train")) == sorted(DOCS)


def test_tiktoken_path_on_an_encoding_built_from_explicit_ranks(tmp_path: Path) -> None:
    ranks = {bytes([i]): i for i in range(256)} | {b"lo": 256, b"lor": 257, b"em": 258}
    enc = tiktoken.Encoding("tiny", pat_str=r"\S+|\s+", mergeable_ranks=ranks,
                            special_tokens={"<|endoftext|>": 259})
    tok = TiktokenTokenizer(enc)
    assert (tok.eos_id, tok.vocab_size, tok.dtype) == (259, 320, np.uint16)
    assert tok.pack(["lorem", "em"]).tolist() == [257, 258, 259, 258, 259]

    path = tmp_path / "tiny.tiktoken"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    from_file = build_tokenizer(str(path))
    assert from_file.pack(["lorem", "em"]).tolist() == tok.pack(["lorem", "em"]).tolist()

    cfg = JobConfig()
    cfg.data.dataset, cfg.data.tokenizer, cfg.data.val_docs = "text", str(path), 4
    cfg.data.source = str(write_jsonl(tmp_path / "c.jsonl", DOCS))
    cfg.training.local_batch_size, cfg.training.seq_len = 2, 64
    with pytest.raises(DataError, match="model.vocab_size 256 is smaller than the data's vocabulary 320"):
        build_dataloader(cfg, 0, 1)
    cfg.model.vocab_size = -1
    assert resolve_vocab_size(cfg) == 320
    batch = next(build_dataloader(cfg, 0, 1))
    assert batch["inputs"].max() < 320 and (batch["inputs"] == 259).any()
    assert torch.equal(batch["reset"][:, 1:], batch["inputs"][:, :-1] == 259)


def test_packing_joins_documents_with_eos_and_marks_document_starts(tmp_path: Path) -> None:
    src = TextSource(str(write_jsonl(tmp_path / "c.jsonl", DOCS)), val_docs=0)
    B, T = 3, 20
    batches = take(PackedTextStream(src, "train", ByteTokenizer(), B, T), 8)
    rows = [row for b in batches for row in b["inputs"].tolist()]
    stream = [t for row in rows for t in row]
    assert byte_docs(stream)[:-1] == [d.encode() for d in DOCS[: len(byte_docs(stream)) - 1]]
    labels = [t for b in batches for row in b["labels"].tolist() for t in row]
    assert labels[:-1] == stream[1:]  # the label stream is the input stream shifted by one, across rows
    reset = [r for b in batches for row in b["reset"].tolist() for r in row]
    assert reset == [True] + [prev == 0 for prev in stream[:-1]]


def test_two_ranks_read_disjoint_documents_and_sequences(tmp_path: Path) -> None:
    src = TextSource(str(write_jsonl(tmp_path / "c.jsonl", DOCS)), val_docs=0)
    seen = []
    for rank in range(2):
        loader = PackedTextStream(src, "train", ByteTokenizer(), 2, 32, rank, 2)
        stream = [t for b in take(loader, 6) for row in b["inputs"].tolist() for t in row]
        seen.append({d for d in byte_docs(stream)[1:-1]})  # whole documents only
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    assert all(int(d.split(b":")[0].split()[1]) % 2 == r for r, docs in enumerate(seen) for d in docs)

    shards = make_shards(tmp_path / "s", n_tokens=5000, shard_tokens=1500)
    loaders = [ShardLoader(shards, 4, 16, rank, 2, seed=3) for rank in range(2)]
    n, per_rank = loaders[0].n_seqs, loaders[0].per_rank
    ids = [set(loader.sequence_ids(np.arange(per_rank)).tolist()) for loader in loaders]  # one epoch
    assert not ids[0] & ids[1]
    assert len(ids[0] | ids[1]) == 2 * per_rank >= n - 1 and max(ids[0] | ids[1]) < n


def make_shards(folder: Path, n_tokens: int, shard_tokens: int, vocab: int = 50304, seed: int = 0) -> ShardSet:
    """Random documents of 1 to 99 tokens written as shards; returns them opened."""
    rng = np.random.default_rng(seed)
    meta = {"tokenizer": "test", "vocab_size": vocab, "eos_id": vocab - 1,
            "dtype": "uint16" if vocab <= 1 << 16 else "uint32"}
    writer = ShardWriter(folder, meta, shard_tokens)
    written = 0
    while written < n_tokens:
        doc = np.append(rng.integers(0, vocab - 1, rng.integers(1, 100)), vocab - 1)
        writer.append(doc, 1)
        written += len(doc)
    writer.finish()
    return ShardSet(folder)




@pytest.mark.parametrize(("old", "new"), [(2, 3), (3, 2), (1, 2), (2, 1)])
def test_shard_positions_carry_over_to_another_rank_count_in_the_same_order(tmp_path: Path, old: int,
                                                                           new: int) -> None:
    shards = make_shards(tmp_path / "s", n_tokens=6000, shard_tokens=1500)
    one = ShardLoader(shards, 1, 16, 0, 1, seed=5)
    within_epoch = one.sequence_ids(np.arange(one.n_seqs)).tolist()  # epoch 0's order, whatever the rank count
    before = [ShardLoader(shards, 3, 16, rank, old, seed=5) for rank in range(old)]
    read = [s for loader in before for _ in range(5) for s in next_ids(loader)]
    after = [ShardLoader(shards, 2, 16, rank, new, seed=5) for rank in range(new)]
    notes = {loader.load_resharded(before[rank % old].state_dict(), old) for rank, loader in enumerate(after)}
    assert len(notes) == 1 and f"from position {15 * old} of epoch 0" in notes.pop()
    upcoming = [s for _ in range(3) for loader in after for s in next_ids(loader)]
    assert sorted(read) == sorted(within_epoch[: 15 * old])  # the old ranks read the order's first positions
    start = -(-15 * old // new) * new  # every new rank starts at one position: rounded up to a multiple of new
    assert sorted(upcoming) == sorted(within_epoch[start : start + 6 * new])


def next_ids(loader: ShardLoader) -> list[int]:
    """The sequence numbers of ``loader``'s next batch (advancing it as ``next`` does)."""
    ids = loader.sequence_ids(loader.item + np.arange(loader.batch_size)).tolist()
    loader.item += loader.batch_size
    return ids


def test_a_text_stream_carries_over_to_another_rank_count_after_the_documents_read(tmp_path: Path) -> None:
    docs = [f"document {i}: " + "lorem ipsum " * (i % 7) for i in range(400)]  # more than one read-ahead chunk
    src = TextSource(str(write_jsonl(tmp_path / "c.jsonl", docs)), val_docs=0)
    old = PackedTextStream(src, "train", ByteTokenizer(), 2, 32, 0, 2)
    take(old, 3)
    new = PackedTextStream(src, "train", ByteTokenizer(), 2, 32, 0, 1)
    note = new.load_resharded(old.state_dict(), 2)
    assert 0 < old.docs_seen < len(docs) and f"after document {old.docs_seen}" in note and "skipping" in note
    stream = [t for b in take(new, 2) for row in b["inputs"].tolist() for t in row]
    first = byte_docs(stream)[0]
    assert int(first.split(b":")[0].split()[1]) == old.docs_seen  # the next document of the split


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_resume_after_k_batches_gives_the_identical_next_batches(tmp_path: Path) -> None:
    src = TextSource(str(write_jsonl(tmp_path / "c.jsonl", DOCS)), val_docs=0)
    shards = make_shards(tmp_path / "s", n_tokens=3000, shard_tokens=1000)
    makers = [lambda rank: PackedTextStream(src, "train", ByteTokenizer(), 2, 24, rank, 2),
              lambda rank: ShardLoader(shards, 4, 32, rank, 2, seed=7)]
    for make in makers:
        for rank in range(2):
            loader = make(rank)
            take(loader, 5)
            folder = tmp_path / f"ckpt{len(list(tmp_path.glob('ckpt*')))}"
            dcp.save({"data": loader.state_dict()}, checkpoint_id=folder)  # as trainer/checkpoint.py stores it
            expected = take(loader, 30)  # long enough to wrap past the end of the data
            resumed = make(rank)
            state = {"data": resumed.state_dict()}
            dcp.load(state, checkpoint_id=folder)
            resumed.load_state_dict(state["data"])
            assert same(take(resumed, 30), expected)


def test_shard_writer_and_reader_round_trip(tmp_path: Path) -> None:
    for vocab, dtype in [(50304, np.uint16), (100352, np.uint32)]:
        rng = np.random.default_rng(0)
        docs = [np.append(rng.integers(0, vocab - 1, n), vocab - 1) for n in rng.integers(1, 500, 40)]
        meta = {"tokenizer": "t", "vocab_size": vocab, "eos_id": vocab - 1, "dtype": np.dtype(dtype).name}
        writer = ShardWriter(tmp_path / str(vocab), meta, shard_tokens=2000)
        for doc in docs:
            writer.append(doc, 1)
        writer.finish()
        shards = ShardSet(tmp_path / str(vocab))
        assert all(a.dtype == dtype for a in shards.arrays) and len(shards.arrays) > 1
        assert np.array_equal(np.concatenate(shards.arrays), np.concatenate(docs))
        index = read_index(tmp_path / str(vocab))
        assert (index["docs"], index["tokens"]) == (40, sum(map(len, docs)))


def test_prepare_is_resumable_and_matches_an_uninterrupted_run(tmp_path: Path) -> None:
    src = TextSource(str(write_jsonl(tmp_path / "c.jsonl", DOCS * 20)), val_docs=10)
    full = prepare(src, "bytes", tmp_path / "full", num_proc=2, shard_tokens=4000, chunk_docs=16, progress=False)
    assert full["val"]["docs"] == 10 and full["train"]["docs"] == len(DOCS) * 20 - 10
    assert len(full["train"]["shards"]) > 3
    prepare(src, "bytes", tmp_path / "cut", shard_tokens=4000, chunk_docs=16, progress=False)
    index_path = tmp_path / "cut" / "train" / "index.json"
    index = json.loads(index_path.read_text())  # as if killed while writing the third shard
    cut = index["shards"][2:]
    index.update(shards=index["shards"][:2], complete=False, docs=sum(s["docs"] for s in index["shards"][:2]),
                 tokens=sum(s["tokens"] for s in index["shards"][:2]))
    index_path.write_text(json.dumps(index))
    (tmp_path / "cut" / "train" / cut[0]["file"]).rename(tmp_path / "cut" / "train" / "shard_00002.bin.tmp")
    with pytest.raises(DataError, match="only partly prepared"):
        ShardSet(tmp_path / "cut" / "train")
    prepare(src, "bytes", tmp_path / "cut", shard_tokens=4000, chunk_docs=16, progress=False)
    for split in ("train", "val"):
        a, b = ShardSet(tmp_path / "full" / split), ShardSet(tmp_path / "cut" / split)
        assert np.array_equal(np.concatenate(a.arrays), np.concatenate(b.arrays))
    assert not list((tmp_path / "cut" / "train").glob("*.tmp"))


def test_bad_input_gives_clear_errors(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("")
    write_jsonl(tmp_path / "c.jsonl", DOCS, field="content")
    with pytest.raises(DataError, match="does not exist"):
        TextSource(str(tmp_path / "missing.jsonl")).documents("train")
    with pytest.raises(DataError, match="empty file"):
        TextSource(str(tmp_path / "empty.jsonl")).documents("train")
    with pytest.raises(DataError, match="no text field 'text'; its fields are content, id"):
        TextSource(str(tmp_path / "c.jsonl")).documents("train")
    with pytest.raises(DataError, match="no files match"):
        TextSource(str(tmp_path / "*.parquet")).documents("train")
    with pytest.raises(DataError, match="not bytes, one of gpt2"):
        build_tokenizer("gpt3")
    with pytest.raises(DataError, match="no .*index.json: prepare token shards first"):
        ShardSet(tmp_path / "nowhere")

    make_shards(tmp_path / "s", n_tokens=2000, shard_tokens=500)
    shard = tmp_path / "s" / "shard_00001.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(DataError, match="shard_00001.bin is corrupt: .* bytes, the index says"):
        ShardSet(tmp_path / "s")
    shard.write_bytes(shard.read_bytes() + b"\xff\xff")
    with pytest.raises(DataError, match="shard_00001.bin is corrupt: ids beyond the vocab"):
        ShardSet(tmp_path / "s")
    (tmp_path / "s" / "index.json").write_text("{not json")
    with pytest.raises(DataError, match="index.json is corrupt"):
        ShardSet(tmp_path / "s")


def test_uncached_hub_dataset_or_encoding_fails_fast_offline(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken"))
    with pytest.raises(DataUnavailableError, match="'gpt2' is not cached in .*TIKTOKEN_CACHE_DIR"):
        build_tokenizer("gpt2")
    with pytest.raises(DataUnavailableError, match="'Skylion007/openwebtext' is not cached .*HF_HOME"):
        TextSource("openwebtext").documents("train")


def test_shards_feed_training_with_the_vocab_from_their_tokenizer(tmp_path: Path) -> None:
    from longhorn_zoo.train import main

    src = TextSource(str(write_jsonl(tmp_path / "c.jsonl", DOCS * 10)), val_docs=20)
    prepare(src, "bytes", tmp_path / "shards", shard_tokens=3000, progress=False)
    args = ["--model.name", "llama", "--model.dim", "32", "--model.n_layers", "1", "--model.vocab_size", "-1",
            "--training.steps", "3", "--training.local_batch_size", "2", "--training.seq_len", "32",
            "--training.device", "cpu", "--metrics.enable_tensorboard", "false",
            "--job.dump_folder", str(tmp_path / "out"), "--data.dataset", "shards",
            "--data.shard_dir", str(tmp_path / "shards")]
    assert main(args) == 0


def test_a_run_on_shards_records_their_tokenizer_for_generate(tmp_path: Path, monkeypatch, capsys) -> None:
    from longhorn_zoo import generate
    from longhorn_zoo.config import load_config
    from longhorn_zoo.tomlcompat import tomllib
    from longhorn_zoo.train import train

    src = TextSource(str(write_jsonl(tmp_path / "c.jsonl", DOCS * 10)), val_docs=20)
    prepare(src, "bytes", tmp_path / "shards", shard_tokens=3000, progress=False)
    dump = tmp_path / "out"
    cfg = load_config(None, ["--model.name", "longhorn", "--model.dim", "32", "--model.n_layers", "1",
                             "--model.vocab_size", "-1", "--training.steps", "2", "--training.local_batch_size", "2",
                             "--training.seq_len", "32", "--metrics.enable_tensorboard", "false",
                             "--checkpoint.enable", "true", "--job.dump_folder", str(dump), "--data.dataset", "shards",
                             "--data.shard_dir", str(tmp_path / "shards")])
    assert cfg.data.tokenizer == "gpt2"  # the default, which these shards were not made with
    train(cfg)
    capsys.readouterr()
    assert tomllib.loads((dump / "config.toml").read_text())["data"]["tokenizer"] == "bytes"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # gpt2 could not be fetched: generate must not need it
    assert generate.main(["--checkpoint", str(dump), "--prompt", "document", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.startswith("document")


MEMORY_PROBE = textwrap.dedent("""
    import json, os, resource, sys
    from longhorn_zoo.data.packing import PackedTextStream
    from longhorn_zoo.data.sources import TextSource
    from longhorn_zoo.data.tokenizer import ByteTokenizer

    path, B, T = sys.argv[1], 8, 4096
    loader = PackedTextStream(TextSource(path, val_docs=0), "train", ByteTokenizer(), B, T)
    next(loader)  # imports and first reads done: the baseline
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(os.path.getsize(path) // (B * T)):  # the whole corpus
        next(loader)
    print(json.dumps({"peak_growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024}))
""")


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KiB on Linux")
def test_streaming_a_corpus_larger_than_the_memory_budget_stays_under_it(tmp_path: Path) -> None:
    budget_mb = 40
    corpus = tmp_path / "big.jsonl"
    line = "x" * 8000
    with corpus.open("w") as f:
        for i in range(3 * budget_mb * 2**20 // len(line)):
            f.write(json.dumps({"text": f"{i} {line}"}) + "\n")
    assert corpus.stat().st_size > 3 * budget_mb * 2**20
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(corpus)], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert out.returncode == 0, out.stderr
    growth = json.loads(out.stdout.strip().splitlines()[-1])["peak_growth_mb"]
    assert growth < budget_mb, f"reading {corpus.stat().st_size >> 20} MiB grew the peak RSS by {growth:.0f} MiB"


def test_mqar_layout_context_then_keys_only_queries():
    from longhorn_zoo.data.mqar import IGNORE, make_batch

    pairs, seq_len, vocab = 6, 40, 64
    b = make_batch(64, seq_len, pairs, vocab, torch.Generator().manual_seed(0))
    inputs, labels = b["inputs"], b["labels"]
    assert inputs.shape == labels.shape == (64, seq_len)
    for x, y in zip(inputs.tolist(), labels.tolist()):
        keys, values = x[0 : 2 * pairs : 2], x[1 : 2 * pairs : 2]
        assert len(set(keys)) == pairs and len(set(values)) == pairs
        assert all(1 <= k < vocab // 2 for k in keys) and all(vocab // 2 <= v < vocab for v in values)
        answer = dict(zip(keys, values))
        query = x[2 * pairs :]
        scored = [t for t in range(2 * pairs, seq_len) if y[t] != IGNORE]
        # every key is asked once, at an even offset of the query section, and labelled with its value
        assert sorted(x[t] for t in scored) == sorted(keys)
        assert all((t - 2 * pairs) % 2 == 0 and y[t] == answer[x[t]] for t in scored)
        # no value is shown after the context, and nothing but padding sits between the queries
        assert not set(query) & set(values)
        assert all(x[t] == 0 for t in range(2 * pairs, seq_len) if t not in scored)
        assert all(v == IGNORE for v in y[: 2 * pairs])
    # the queries come in a random order and at random slots
    first = [x[2 * pairs] for x in inputs.tolist()]
    assert len(set(first)) > 1 and any(v == 0 for v in first)
