"""Tokenizers for text sources: byte-level, tiktoken's standard encodings, a local ``.tiktoken`` file,
or a local Hugging Face ``tokenizer.json``.

Documents are encoded without special tokens and each is followed by ``eos_id``.
``vocab_size`` is the tokenizer's vocabulary padded up to a multiple of 64, the
size the model's embedding must have at least. ``tiktoken`` and ``tokenizers`` are
imported only here, when such a tokenizer is built.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from longhorn_zoo.data.errors import DataError, DataUnavailableError, offline

ENDOFTEXT = "<|endoftext|>"
# EOS candidates of a tokenizer.json without a tokenizer_config.json beside it, in order of preference.
EOS_NAMES = (ENDOFTEXT, "<|end_of_text|>", "</s>", "<eos>", "<|eos|>")
_BLOB = "https://openaipublic.blob.core.windows.net"
# The files tiktoken downloads (and caches under TIKTOKEN_CACHE_DIR) for each standard encoding.
TIKTOKEN_FILES = {
    "gpt2": (f"{_BLOB}/gpt-2/encodings/main/vocab.bpe", f"{_BLOB}/gpt-2/encodings/main/encoder.json"),
    "r50k_base": (f"{_BLOB}/encodings/r50k_base.tiktoken",),
    "cl100k_base": (f"{_BLOB}/encodings/cl100k_base.tiktoken",),
    "o200k_base": (f"{_BLOB}/encodings/o200k_base.tiktoken",),
}
# Pre-tokenization patterns for local .tiktoken files (those files hold only the ranks).
R50K_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
CL100K_PAT = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
              r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")


def pad_vocab(n: int, multiple: int = 64) -> int:
    """``n`` rounded up to a multiple of ``multiple``."""
    return -(-n // multiple) * multiple


class Tokenizer:
    """Turns documents into token ids. Subclasses set ``name``, ``eos_id``, ``n_vocab`` and ``encode``."""

    name: str
    eos_id: int
    n_vocab: int

    @property
    def vocab_size(self) -> int:
        """The vocabulary padded to a multiple of 64."""
        return pad_vocab(max(self.n_vocab, self.eos_id + 1))

    @property
    def dtype(self) -> np.dtype:
        """The smallest unsigned dtype that holds every id (uint16 or uint32)."""
        return np.dtype(np.uint16 if self.vocab_size <= 1 << 16 else np.uint32)

    def encode(self, texts: Sequence[str]) -> list[Sequence[int]]:
        """Token ids of each text, without EOS."""
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``; ids past the tokenizer's vocabulary (the embedding's padding) are dropped."""
        raise NotImplementedError

    def pack(self, texts: Sequence[str]) -> np.ndarray:
        """The texts' tokens, each document followed by EOS, as one array of ``self.dtype``."""
        parts: list[Any] = []
        eos = np.array([self.eos_id], dtype=self.dtype)
        for ids in self.encode(texts):
            parts += [np.asarray(ids, dtype=self.dtype), eos]
        return np.concatenate(parts) if parts else np.zeros(0, self.dtype)


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens (vocabulary 256). NUL is EOS, so NUL bytes in the text are dropped."""

    name, eos_id, n_vocab = "bytes", 0, 256

    def encode(self, texts: Sequence[str]) -> list[Sequence[int]]:
        return [np.frombuffer(t.encode("utf-8", "replace").replace(b"\0", b""), np.uint8) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < self.n_vocab).decode("utf-8", "replace")


class TiktokenTokenizer(Tokenizer):
    """A ``tiktoken.Encoding`` whose ``<|endoftext|>`` (or, failing that, ``eot_token``) is EOS."""

    def __init__(self, encoding: Any) -> None:
        self.enc = encoding
        self.name = encoding.name
        self.eos_id = encoding._special_tokens.get(ENDOFTEXT, encoding.eot_token)
        self.n_vocab = encoding.n_vocab

    def encode(self, texts: Sequence[str]) -> list[Sequence[int]]:
        return self.enc.encode_ordinary_batch(list(texts), num_threads=1)

    def decode(self, ids: Sequence[int]) -> str:
        return self.enc.decode([i for i in ids if i < self.n_vocab])


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers`` file (``tokenizer.json``), read from disk with no download.

    EOS is the ``eos_token`` of a ``tokenizer_config.json`` beside the file, else the
    first of :data:`EOS_NAMES` in its vocabulary.
    """

    def __init__(self, path: Path) -> None:
        try:
            from tokenizers import Tokenizer as RustTokenizer
        except ImportError:
            raise DataError(f"data.tokenizer {str(path)!r} needs tokenizers: pip install 'longhorn-zoo[hf]'") from None
        if not path.is_file():
            raise DataError(f"tokenizer file {path} does not exist")
        try:
            self.tok = RustTokenizer.from_file(str(path))
        except Exception as e:
            raise DataError(f"tokenizer file {path} is not a valid Hugging Face tokenizer.json: {e}") from e
        self.path, self.name = path, str(path)
        self.n_vocab = self.tok.get_vocab_size(with_added_tokens=True)
        self.eos_token = _eos_token(path, self.tok)
        self.eos_id = self.tok.token_to_id(self.eos_token)

    def encode(self, texts: Sequence[str]) -> list[Sequence[int]]:
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode([i for i in ids if i < self.n_vocab], skip_special_tokens=False)


def _eos_token(path: Path, tok: Any) -> str:
    """The EOS token of tokenizer.json ``path``: its tokenizer_config.json's, else a known EOS name."""
    config = path.with_name("tokenizer_config.json")
    if config.is_file():
        eos = json.loads(config.read_text()).get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        if eos is not None:
            if tok.token_to_id(eos) is None:
                raise DataError(f"{config} names eos_token {eos!r}, which {path} does not hold")
            return eos
    for name in EOS_NAMES:
        if tok.token_to_id(name) is not None:
            return name
    raise DataError(f"tokenizer file {path} has no EOS token: none of {', '.join(EOS_NAMES)} is in its vocabulary. "
                    f"Add one as a special token, or write {config} with an \"eos_token\" it holds")


def tiktoken_cache_dir() -> Path | None:
    """Where tiktoken caches downloads (None when caching is off), as ``tiktoken.load`` decides."""
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            return Path(os.environ[var]) if os.environ[var] else None
    return Path(tempfile.gettempdir()) / "data-gym-cache"


def _require_cached(name: str) -> None:
    """Raise DataUnavailableError if encoding ``name`` is not cached and cannot be downloaded."""
    cache = tiktoken_cache_dir()
    missing = [u for u in TIKTOKEN_FILES[name] if cache is None or
               not (cache / hashlib.sha1(u.encode()).hexdigest()).exists()]
    if missing and offline(_BLOB.split("//")[1]):
        raise DataUnavailableError(
            f"tiktoken encoding {name!r} is not cached in {cache} (TIKTOKEN_CACHE_DIR) and {_BLOB} cannot be "
            f"reached; missing: {', '.join(missing)}. Pre-fetch it on a machine with network: "
            f"TIKTOKEN_CACHE_DIR=/shared/tiktoken python -c \"import tiktoken; tiktoken.get_encoding('{name}')\", "
            "then set TIKTOKEN_CACHE_DIR=/shared/tiktoken here (or set data.tokenizer to a local .tiktoken file).")


def build_tokenizer(spec: str) -> Tokenizer:
    """``bytes``, a tiktoken encoding name (gpt2, r50k_base, cl100k_base, o200k_base), a ``.tiktoken`` path
    or a Hugging Face ``tokenizer.json`` path (any name ending in ``.json``).

    A local ``.tiktoken`` file gets ``<|endoftext|>`` as the id after its last rank, and the gpt2/r50k
    pre-tokenization pattern if its stem names one of those encodings, else cl100k's.
    """
    if spec == "bytes":
        return ByteTokenizer()
    if spec.endswith(".json"):
        return HFTokenizer(Path(spec))
    try:
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe
    except ImportError:
        raise DataError(f"data.tokenizer {spec!r} needs tiktoken: pip install 'longhorn-zoo[data]'") from None
    if spec in TIKTOKEN_FILES:
        _require_cached(spec)
        try:
            return TiktokenTokenizer(tiktoken.get_encoding(spec))
        except Exception as e:  # network or hash errors from tiktoken's download
            raise DataUnavailableError(f"could not load tiktoken encoding {spec!r}: {e}. Pre-fetch it into "
                                       "TIKTOKEN_CACHE_DIR on a machine with network") from e
    path = Path(spec)
    if path.suffix != ".tiktoken":
        raise DataError(f"data.tokenizer {spec!r} is not bytes, one of {', '.join(TIKTOKEN_FILES)}, "
                        "a path to a .tiktoken file or a path to a tokenizer.json file")
    if not path.is_file():
        raise DataError(f"tokenizer file {path} does not exist")
    try:
        ranks = load_tiktoken_bpe(str(path))
    except Exception as e:
        raise DataError(f"tokenizer file {path} is not a valid .tiktoken file: {e}") from e
    if not ranks:
        raise DataError(f"tokenizer file {path} is empty")
    pat = R50K_PAT if path.stem in ("gpt2", "r50k_base", "p50k_base") else CL100K_PAT
    enc = tiktoken.Encoding(path.stem, pat_str=pat, mergeable_ranks=ranks,
                            special_tokens={ENDOFTEXT: max(ranks.values()) + 1})
    return TiktokenTokenizer(enc)
