"""Model folders: a trained LM as ``config.json``, safetensors weights and its tokenizer's files.

The layout is a Hugging Face model folder (``python -m longhorn_zoo.export`` writes it)::

    config.json                    model_type "longhorn_zoo": the mixer and its options (a hybrid stack:
                                   its pattern and every mixer's table), the sizes, the vocabulary, the
                                   tokenizer and the plugin that provides each mixer
    model.safetensors              the weights; past max_shard_size bytes they are split into
                                   model-00001-of-0000N.safetensors ... and model.safetensors.index.json
    tokenizer.json                 the tokenizer the model trained with (none for MQAR models),
    tokenizer_config.json            see longhorn_zoo.data.tokenizer_files
    configuration_longhorn_zoo.py  shims naming longhorn_zoo.hf's classes, for
    modeling_longhorn_zoo.py         from_pretrained(..., trust_remote_code=True) without importing it

Tensor names are the LM's parameter names under ``model.`` (``model.layers.0.mixer.in_proj.weight``),
the names the ``transformers`` model (``longhorn_zoo.hf``) has. With tied embeddings
``model.output.weight`` is not stored. :func:`load_folder` gives our ``LM`` back with the same
weights; ``safetensors`` is imported only inside the functions that read or write them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from longhorn_zoo.checkpoint import EXPORT_DTYPES
from longhorn_zoo.config import BLOCK_KEYS, JobConfig
from longhorn_zoo.config import Model as ModelConfig
from longhorn_zoo.data.tokenizer import Tokenizer
from longhorn_zoo.hookspecs import MixerSpec
from longhorn_zoo.model import LM, ModelArgs, block_kinds

MODEL_TYPE = "longhorn_zoo"
CONFIG, WEIGHTS, INDEX = "config.json", "model.safetensors", "model.safetensors.index.json"
PREFIX = "model."
DEFAULT_SHARD_SIZE = 5 * 2**30
SHIMS = {
    "configuration_longhorn_zoo.py": "from longhorn_zoo.hf.configuration import LonghornZooConfig  # noqa: F401\n",
    "modeling_longhorn_zoo.py": "from longhorn_zoo.hf.modeling import LonghornZooForCausalLM  # noqa: F401\n",
}
AUTO_MAP = {"AutoConfig": "configuration_longhorn_zoo.LonghornZooConfig",
            "AutoModelForCausalLM": "modeling_longhorn_zoo.LonghornZooForCausalLM"}


class FolderError(ValueError):
    """A model folder that cannot be written or read; the message names the file and the fix."""


SHAPE_KEYS = ("norm", "mlp_activation", "mlp_multiple_of", "mlp_hidden", "mlp_depth_scaled_init", "position_embedding")
"""The other [model] keys that shape the network, written to ``config.json`` as they are (a stack's
MLP keys, :data:`~longhorn_zoo.config.BLOCK_KEYS`, are in its ``mixers`` tables instead)."""


def parse_size(text: str) -> int:
    """Bytes in ``"5GB"``, ``"500MB"``, ``"64KiB"`` or a plain number (decimal and binary units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", text, re.IGNORECASE)
    if m is None:
        raise FolderError(f"max shard size {text!r} is not a size; write e.g. 5GB, 500MB or 1000000")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2).upper() or " "))


def _plugin(name: str) -> dict[str, str]:
    """The distribution, version and entry point that provide the mixer ``name``."""
    from longhorn_zoo.registry import get_registry

    source = get_registry().get(name).source
    return {"distribution": source.dist, "version": source.version, "entry_point": source.entry_point}


def folder_config(cfg: JobConfig, tokenizer: Tokenizer | None, dtype: str) -> dict[str, Any]:
    """The ``config.json`` of a model trained with ``cfg``; ``tokenizer`` is the one it trained with.

    One mixer: ``mixer``, ``mixer_options``, the MLP keys and ``plugin``. A hybrid stack: ``mixer``
    (the names joined by ``+``, informative), ``pattern``, ``mixers`` (each mixer's resolved
    ``[model.mixers.<name>]`` table: its options and its blocks' MLP keys) and ``plugins`` (by mixer).
    """
    from importlib.metadata import PackageNotFoundError, version

    m = cfg.model
    try:
        zoo_version = version("longhorn-zoo")
    except PackageNotFoundError:
        zoo_version = "unknown"
    if m.pattern:
        mixers = {"pattern": list(m.pattern), "mixers": {name: dict(t) for name, t in m.mixers.items()}}
        mlp, plugins = {}, {"plugins": {name: _plugin(name) for name in m.mixers}}
    else:
        mixers = {"mixer_options": dict(m.mixer)}
        mlp, plugins = {"mlp": m.mlp, "mlp_ratio": m.mlp_ratio}, {"plugin": _plugin(m.name)}
    return {
        "model_type": MODEL_TYPE, "architectures": ["LonghornZooForCausalLM"], "auto_map": dict(AUTO_MAP),
        "mixer": m.name, **mixers, "dim": m.dim, "n_layers": m.n_layers,
        "vocab_size": m.vocab_size, "max_seq_len": cfg.training.seq_len, "norm_eps": m.norm_eps, **mlp,
        "tie_word_embeddings": m.tie_embeddings,
        **{k: getattr(m, k) for k in SHAPE_KEYS if not (m.pattern and k in BLOCK_KEYS)},
        **plugins,
        "tokenizer": None if tokenizer is None else tokenizer.name,
        "eos_token_id": None if tokenizer is None else tokenizer.eos_id,
        "dtype": dtype, "longhorn_zoo_version": zoo_version,
    }


def _spec(name: str, plugin: Mapping[str, str] | None) -> MixerSpec:
    """The installed spec of mixer ``name``; a FolderError naming ``plugin`` (its distribution) if none is."""
    from longhorn_zoo.registry import PluginError, get_registry

    try:
        return get_registry().get(name).spec
    except PluginError as e:
        plugin = plugin or {}
        raise FolderError(f"{e}\nThe model needs the plugin that provides mixer {name!r}: pip install "
                          f"{plugin.get('distribution', '?')}=={plugin.get('version', '?')}") from None


def _build_stack(config: Mapping[str, Any]) -> LM:
    """Our LM for the ``config.json`` of a hybrid stack: block i of mixer ``pattern[i % len(pattern)]``."""
    pattern, tables, plugins = list(config["pattern"]), config.get("mixers") or {}, config.get("plugins") or {}
    for name in dict.fromkeys(pattern):
        _spec(name, plugins.get(name))
        if missing := [k for k in BLOCK_KEYS if k not in tables.get(name, {})]:
            raise FolderError(f"config.json: mixers.{name} (the table of mixer {name!r} of pattern {pattern}) "
                              f"lacks {', '.join(missing)}; export the model again with longhorn-zoo hf-export")
    m = ModelConfig(name=config["mixer"], dim=config["dim"], n_layers=config["n_layers"],
                    vocab_size=config["vocab_size"], norm_eps=config["norm_eps"],
                    tie_embeddings=config["tie_word_embeddings"], pattern=pattern,
                    mixers={name: dict(tables[name]) for name in dict.fromkeys(pattern)},
                    **{k: config[k] for k in SHAPE_KEYS if k in config and k not in BLOCK_KEYS})
    return LM(ModelArgs.from_config(m, config["max_seq_len"]), kinds=block_kinds(m))


def build_lm(config: Mapping[str, Any]) -> LM:
    """Our LM for a ``config.json`` (a dict or a ``LonghornZooConfig``'s dict), on the default device, unset.

    A config with a ``pattern`` is a hybrid stack; without one, every block is ``mixer``.
    """
    if config.get("pattern"):
        return _build_stack(config)
    name = config["mixer"]
    spec = _spec(name, config.get("plugin"))
    m = ModelConfig(name=name, dim=config["dim"], n_layers=config["n_layers"], vocab_size=config["vocab_size"],
                    norm_eps=config["norm_eps"], mlp=config["mlp"], mlp_ratio=config["mlp_ratio"],
                    tie_embeddings=config["tie_word_embeddings"], mixer=dict(config["mixer_options"]),
                    **{k: config[k] for k in SHAPE_KEYS if k in config})  # folders written before them: defaults
    return LM(ModelArgs.from_config(m, config["max_seq_len"]), spec, m.mixer)


def _shards(tensors: dict[str, Tensor], max_bytes: int) -> list[dict[str, Tensor]]:
    """``tensors`` in order, cut into groups of at most ``max_bytes`` (a bigger tensor is a group alone)."""
    groups: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if groups[-1] and size + n > max_bytes:
            groups.append({})
            size = 0
        groups[-1][name] = t
        size += n
    return groups


def write_weights(state: Mapping[str, Tensor], folder: Path, dtype: str, max_shard_size: int,
                  tied: bool) -> list[Path]:
    """Write ``state`` (our LM's names) as safetensors in ``folder``, sharded past ``max_shard_size`` bytes."""
    from safetensors.torch import save_file

    tensors = {PREFIX + k: v.detach().to("cpu", EXPORT_DTYPES[dtype]).contiguous() for k, v in state.items()
               if not (tied and k == "output.weight")}
    groups = _shards(tensors, max_shard_size)
    if len(groups) == 1:
        save_file(groups[0], str(folder / WEIGHTS), metadata={"format": "pt"})
        return [folder / WEIGHTS]
    files = [folder / f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    weight_map = {}
    for path, group in zip(files, groups):
        save_file(group, str(path), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, path.name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return [*files, folder / INDEX]


def save_folder(model: LM, cfg: JobConfig, out: Path, tokenizer: Tokenizer | None, dtype: str = "float32",
                max_shard_size: int = DEFAULT_SHARD_SIZE) -> Path:
    """Write ``model`` (trained with ``cfg`` and ``tokenizer``) as a model folder ``out``; returns ``out``."""
    from longhorn_zoo.data.tokenizer_files import write_tokenizer_files

    if dtype not in EXPORT_DTYPES:
        raise FolderError(f"dtype {dtype!r} is not one of {', '.join(EXPORT_DTYPES)}")
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("model*.safetensors"), out / INDEX]:  # a previous export's shards
        stale.unlink(missing_ok=True)
    write_weights(model.state_dict(), out, dtype, max_shard_size, cfg.model.tie_embeddings)
    if tokenizer is not None:
        write_tokenizer_files(tokenizer, out, cfg.training.seq_len)
    for name, text in SHIMS.items():
        (out / name).write_text(text)
    (out / CONFIG).write_text(json.dumps(folder_config(cfg, tokenizer, dtype), indent=1) + "\n")
    return out


def read_config(folder: Path) -> dict[str, Any]:
    """The ``config.json`` of a model folder, checked to be one of ours."""
    path = folder / CONFIG
    if not path.is_file():
        raise FolderError(f"{folder} is not a model folder: no {CONFIG}; write one with python -m longhorn_zoo.export")
    config = json.loads(path.read_text())
    if config.get("model_type") != MODEL_TYPE:
        raise FolderError(f"{path} has model_type {config.get('model_type')!r}, not {MODEL_TYPE!r}")
    return config


def read_weights(folder: Path) -> dict[str, Tensor]:
    """Every tensor of a model folder (one file or shards), under our LM's names."""
    from safetensors.torch import load_file

    if (folder / INDEX).is_file():
        files = sorted(set(json.loads((folder / INDEX).read_text())["weight_map"].values()))
    elif (folder / WEIGHTS).is_file():
        files = [WEIGHTS]
    else:
        raise FolderError(f"{folder} holds neither {WEIGHTS} nor {INDEX}")
    state: dict[str, Tensor] = {}
    for name in files:
        if not (folder / name).is_file():
            raise FolderError(f"{folder / INDEX} lists {name}, which is missing")
        state.update(load_file(str(folder / name)))
    return {k.removeprefix(PREFIX): v for k, v in state.items()}


def load_folder(folder: Path, device: torch.device | str = "cpu") -> tuple[LM, dict[str, Any]]:
    """Our LM (float32, eval mode, on ``device``) from a model folder, and its ``config.json``."""
    config = read_config(folder)
    with torch.device("meta"):
        model = build_lm(config)
    model.to_empty(device=device)
    model.init_weights()
    missing, unexpected = model.load_state_dict(read_weights(folder), strict=False)
    if config["tie_word_embeddings"]:
        missing = [k for k in missing if k != "output.weight"]
    if missing or unexpected:
        raise FolderError(f"the weights in {folder} do not match mixer {config['mixer']!r}: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}")
    return model.eval(), config
