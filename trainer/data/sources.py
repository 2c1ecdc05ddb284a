"""Text sources: documents streamed from a Hugging Face hub dataset or from local files.

A source is a hub dataset id (or an alias below), or a local txt/jsonl/parquet file,
glob or folder (compressed files such as ``.jsonl.zst`` too). Everything is read
with ``datasets`` in streaming mode, so nothing is loaded whole. ``datasets`` is
imported only when a source is opened.

Validation documents come from a named split of the source (``val_split``) or, when
that is empty, are the first ``val_docs`` documents of the train split, which the
train side then skips.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import Any

from longhorn_zoo.data.errors import DataError, DataUnavailableError, offline

HUB_ALIASES = {
    "slimpajama": "cerebras/SlimPajama-627B",
    "openwebtext": "Skylion007/openwebtext",
    "fineweb-edu": "HuggingFaceFW/fineweb-edu",
}
BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
COMPRESSIONS = (".gz", ".zst", ".bz2", ".xz", ".lz4")
READ_BATCH = 512  # documents decoded from arrow at a time
READ_BYTES = 1 << 20  # bytes of a txt or jsonl file parsed at a time


@dataclass(frozen=True)
class TextSource:
    """Where documents come from and how to read them.

    Attributes:
        source: hub dataset id or alias, or a local file, glob or folder.
        text_field: the column holding each document's text (txt files: always ``text``).
        hf_config: the hub dataset's config name, or "" for its default.
        hf_revision: the hub dataset's branch, tag or commit, or "" for main (``refs/convert/parquet``
            reads the hub's Parquet export of a dataset that still ships a loading script).
        sample_by: txt files only: one document per ``line``, ``paragraph`` or ``document`` (file).
        val_split: the source's split used for validation, or "" to hold out ``val_docs``.
        val_docs: how many leading train documents are held out when ``val_split`` is "".
    """

    source: str
    text_field: str = "text"
    hf_config: str = ""
    sample_by: str = "paragraph"
    val_split: str = ""
    val_docs: int = 1000
    hf_revision: str = ""

    def documents(self, split: str) -> Iterator[str]:
        """The texts of ``split`` ("train" or "val"), in a fixed order."""
        if split not in ("train", "val"):
            raise DataError(f"split must be train or val, got {split!r}")
        if self.val_split:
            return self._read("train" if split == "train" else self.val_split)
        if split == "val" and self.val_docs <= 0:
            raise DataError(f"{self.source} has no validation documents: set data.val_split to a split of "
                            "the source or data.val_docs > 0")
        docs = self._read("train")
        return islice(docs, self.val_docs) if split == "val" else islice(docs, self.val_docs, None)

    def _read(self, split: str) -> Iterator[str]:
        """Open ``split`` and check its first batch now, so bad input fails before training starts."""
        batches = open_dataset(self, split).iter(batch_size=READ_BATCH)
        first = next(batches, None)
        if first is None:
            raise DataError(f"{self.source} (split {split!r}) holds no documents")
        if self.text_field not in first:
            raise DataError(f"{self.source} has no text field {self.text_field!r}; its fields are "
                            f"{', '.join(first)}. Set data.text_field (longhorn-zoo prepare: --text-field)")
        return chain.from_iterable(batch[self.text_field] for batch in chain([first], batches))


def _builder(path: str) -> str | None:
    """The ``datasets`` builder for a file name, ignoring a compression suffix."""
    p = Path(path)
    suffix = p.suffix if p.suffix not in COMPRESSIONS else Path(p.stem).suffix
    return BUILDERS.get(suffix)


def _check_files(files: list[str], where: str) -> str:
    """The one builder that reads all ``files``; raises on none, mixed formats or empty files."""
    if not files:
        raise DataError(f"no files match {where}")
    builders = {_builder(f) for f in files}
    if None in builders or len(builders) > 1:
        raise DataError(f"{where} must hold files of one format among {', '.join(BUILDERS)} (optionally "
                        f"compressed); found {', '.join(sorted({Path(f).name for f in files})[:5])}")
    empty = [f for f in files if os.path.getsize(f) == 0]
    if empty:
        raise DataError(f"empty file: {empty[0]}" + (f" (and {len(empty) - 1} more)" if len(empty) > 1 else ""))
    return builders.pop()


def _looks_local(source: str) -> bool:
    return (source.startswith((".", "/", "~")) or glob.has_magic(source) or Path(source).suffix != ""
            or os.path.exists(source))


def open_dataset(src: TextSource, split: str) -> Any:
    """A streaming ``datasets.IterableDataset`` of ``split`` of the source."""
    try:
        import datasets
    except ImportError:
        raise DataError("text sources need the datasets package: pip install 'longhorn-zoo[data]'") from None
    datasets.disable_progress_bars()
    source = os.path.expanduser(src.source)
    if not source:
        raise DataError("data.source is empty; set it to a hub dataset id or a local file, glob or folder")
    if source in HUB_ALIASES or not _looks_local(source):
        return _open_hub(HUB_ALIASES.get(source, source), src, split)
    if os.path.isdir(source):
        files = [f for f in glob.glob(os.path.join(source, "**", "*"), recursive=True) if os.path.isfile(f)
                 and not Path(f).name.startswith((".", "README"))]
        builder = _check_files(files, f"folder {source}")
        return _load(datasets, source, src, split, builder)
    files = sorted(glob.glob(source)) if glob.has_magic(source) else [source]
    if not glob.has_magic(source) and not os.path.isfile(source):
        raise DataError(f"data source {source} does not exist (nor is it a hub dataset id like org/name)")
    builder = _check_files(files, source)
    if split != "train":
        raise DataError(f"local files {source} have only a train split; leave data.val_split empty and hold out "
                        "documents with data.val_docs")
    return _load(datasets, builder, src, split, builder, data_files=files)


def _load(datasets: Any, path: str, src: TextSource, split: str, builder: str, **kw: Any) -> Any:
    if builder == "text":
        kw["sample_by"] = src.sample_by
    if builder in ("text", "json"):  # bounds the bytes read and parsed at once (datasets' default is 10 MiB)
        kw["chunksize"] = READ_BYTES
    if builder == "parquet":
        kw["batch_size"] = READ_BATCH
    try:
        return datasets.load_dataset(path, name=src.hf_config or None, split=split, streaming=True, **kw)
    except ValueError as e:
        raise DataError(f"cannot read split {split!r} of {src.source}: {e}") from e


def _open_hub(repo: str, src: TextSource, split: str) -> Any:
    """Stream a hub dataset; offline, use its cached snapshot or fail naming how to pre-fetch it."""
    import datasets
    from huggingface_hub import constants, snapshot_download

    if offline(constants.ENDPOINT.split("//")[-1].split("/")[0]):
        try:
            local = snapshot_download(repo, repo_type="dataset", revision=src.hf_revision or None,
                                      local_files_only=True)
        except Exception:
            raise DataUnavailableError(
                f"hub dataset {repo!r} is not cached in {constants.HF_HUB_CACHE} and the hub cannot be reached "
                "(or HF_HUB_OFFLINE is set). Pre-fetch it on a machine with network: "
                f"`hf download --repo-type dataset {repo}` with HF_HOME (or HF_HUB_CACHE) pointing at a shared "
                "cache, then set the same HF_HOME here; or download it with --local-dir DIR and set data.source "
                "to DIR; or run longhorn-zoo prepare there and train from the token shards") from None
        return _load(datasets, local, src, split, "")
    try:
        return datasets.load_dataset(repo, name=src.hf_config or None, split=split, streaming=True,
                                     revision=src.hf_revision or None)
    except Exception as e:
        raise DataError(f"cannot stream hub dataset {repo!r} (config {src.hf_config or 'default'}, split "
                        f"{split!r}): {e}. A dataset that still ships a loading script can be read from its "
                        "Parquet export with data.hf_revision = 'refs/convert/parquet'") from e
