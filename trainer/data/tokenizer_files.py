"""Hugging Face tokenizer files for every tokenizer of the zoo: what an exported model folder carries.

:func:`write_tokenizer_files` writes ``tokenizer.json`` (a ``tokenizers`` file) and
``tokenizer_config.json`` so that ``AutoTokenizer.from_pretrained(folder)`` (and so
lm-eval) and :func:`longhorn_zoo.data.tokenizer.build_tokenizer` on the written
``tokenizer.json`` encode text to the ids the model trained on:

* a ``tokenizer.json`` is copied;
* a tiktoken encoding (a name or a ``.tiktoken`` file) becomes a byte-level BPE with the
  encoding's pre-tokenization pattern and its merges recovered from the ranks;
* ``bytes`` becomes a byte-level vocabulary of 256 ids with no merges, id 0 (NUL) being
  the special ``<|endoftext|>``.

``tokenizers`` is imported here only, inside the functions.
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Any

from longhorn_zoo.data.tokenizer import ENDOFTEXT, ByteTokenizer, HFTokenizer, TiktokenTokenizer, Tokenizer


@cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map of the 256 byte values to printable characters (byte-level BPE's alphabet)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _text(token: bytes) -> str:
    table = bytes_to_unicode()
    return "".join(table[b] for b in token)


def _split(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes] | None:
    """The two parts byte-pair merging joins into ``token``, using only tokens of lower rank than it."""
    limit, parts = ranks[token], [bytes([b]) for b in token]
    while len(parts) > 2:
        pairs = [(ranks.get(a + b, limit), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        rank, i = min(pairs)
        if rank >= limit:
            return None
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return (parts[0], parts[1]) if len(parts) == 2 else None


def bpe_from_ranks(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The byte-level vocabulary and the merges (in rank order) of tiktoken ``ranks``."""
    vocab = {_text(t): r for t, r in ranks.items()}
    merges = []
    for token in sorted((t for t in ranks if len(t) > 1), key=ranks.__getitem__):
        parts = _split(token, ranks)
        if parts is not None:  # a token no merge reaches is never produced by tiktoken either
            merges.append((_text(parts[0]), _text(parts[1])))
    return vocab, merges


def onig_pattern(pattern: str) -> str:
    """A tiktoken (fancy-regex) pattern as ``tokenizers``' Oniguruma reads it the same way.

    Oniguruma reads ``X{1,3}+`` as ``(X{1,3})+``, not as the possessive ``X{1,3}`` tiktoken
    means, so the ``+`` is dropped. Where nothing follows the repeat in its alternative (as in
    tiktoken's cl100k and o200k patterns) there is nothing to backtrack for, and the greedy
    repeat matches what the possessive one does. ``++``, ``*+`` and ``?+`` are possessive in both.
    """
    return re.sub(r"(\{\d+(?:,\d*)?\})\+", r"\1", pattern)


def _byte_level(vocab: dict[str, int], merges: list[tuple[str, str]], pattern: str | None,
                specials: dict[str, int]) -> Any:
    """A byte-level BPE; ``specials`` keep their ids (in the vocabulary, so gaps between ids stay)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE(vocab | specials, merges, ignore_merges=True))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.pre_tokenizer = byte_level if pattern is None else pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(onig_pattern(pattern)), behavior="isolated"), byte_level])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in specials])
    return tok


def rust_tokenizer(tok: Tokenizer) -> Any:
    """A ``tokenizers.Tokenizer`` that encodes text to the ids ``tok`` gives, with its EOS as special token."""
    if isinstance(tok, HFTokenizer):
        return tok.tok
    if isinstance(tok, ByteTokenizer):  # NUL is EOS: ByteTokenizer drops NUL bytes, and so does this
        table = bytes_to_unicode()
        return _byte_level({table[b]: b for b in range(1, 256)}, [], None, {ENDOFTEXT: 0})
    if isinstance(tok, TiktokenTokenizer):
        return _byte_level(*bpe_from_ranks(tok.enc._mergeable_ranks), tok.enc._pat_str, dict(tok.enc._special_tokens))
    raise TypeError(f"no Hugging Face tokenizer for {type(tok).__name__}")


def write_tokenizer_files(tok: Tokenizer, folder: Path, model_max_length: int) -> list[Path]:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` of ``tok`` into ``folder``; returns the paths."""
    rust = rust_tokenizer(tok)
    eos = rust.id_to_token(tok.eos_id)
    tokenizer_json = folder / "tokenizer.json"
    rust.save(str(tokenizer_json))
    config = folder / "tokenizer_config.json"
    config.write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "bos_token": eos, "unk_token": None,
        "model_max_length": model_max_length, "clean_up_tokenization_spaces": False, "add_bos_token": False,
        "longhorn_zoo_tokenizer": tok.name}, indent=1) + "\n")
    return [tokenizer_json, config]
