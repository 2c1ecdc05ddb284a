"""Loading a trained model for evaluation and generation.

A run's dump folder holds ``config.toml`` (the resolved config, written at start)
and the checkpoint folder. :func:`load_trained` accepts the dump folder, the
checkpoint folder, one ``step-N`` folder, or an exported ``model.pt``, and finds
``config.toml`` in the nearest enclosing folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from longhorn_zoo.checkpoint import CheckpointError, read_model_weights
from longhorn_zoo.config import ConfigError, JobConfig, load_config
from longhorn_zoo.model import LM, build_model


def find_config(path: Path) -> Path:
    """The ``config.toml`` in ``path`` or the closest folder above it."""
    for folder in [path if path.is_dir() else path.parent, *path.resolve().parents]:
        if (folder / "config.toml").is_file():
            return folder / "config.toml"
    raise CheckpointError(f"no config.toml found in {path} or above it; pass --config with the training config")


def load_trained(path: Path, device: torch.device | str = "cpu", config: Path | None = None,
                 overrides: list[str] | None = None) -> tuple[LM, JobConfig]:
    """The trained model (in eval mode, on ``device``) and its job config."""
    cfg = load_config(config or find_config(path), overrides)
    if path.is_file():
        weights = torch.load(path, map_location="cpu", weights_only=True)
    else:
        weights = read_model_weights(path)
    model = build_model(cfg.model, cfg.training.seq_len, "meta")
    model.to_empty(device=device)
    model.init_weights()
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path} does not match the model of {cfg.model.name!r}: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    return model.eval(), cfg


def add_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    """The ``--checkpoint``, ``--config`` and ``--device`` options of the inference commands."""
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="dump folder, checkpoint folder, step-N folder, or exported model.pt")
    parser.add_argument("--config", type=Path, help="training config (default: config.toml next to the checkpoint)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def load_from_args(args: argparse.Namespace) -> tuple[LM, JobConfig] | None:
    """:func:`load_trained` from parsed :func:`add_checkpoint_args`; prints the error and returns None on failure."""
    try:
        return load_trained(args.checkpoint, args.device, args.config)
    except (CheckpointError, ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return None
