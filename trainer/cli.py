"""The ``longhorn-zoo`` command: one installed entry point with a subcommand per tool.

    longhorn-zoo train debug_longhorn --training.steps 20    # a shipped config by name, or a TOML path
    longhorn-zoo plugins                                     # the installed mixers and their op backends
    longhorn-zoo conformance longhorn                        # the conformance suite on one mixer

Each subcommand hands its arguments to the ``main`` of one module, which also runs as
``python -m MODULE`` (shown by ``longhorn-zoo --help``); ``longhorn-zoo COMMAND --help``
prints that command's options. Modules are imported only when their command runs.
"""

from __future__ import annotations

import difflib
import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    """A subcommand: ``module.function(argv)`` with ``prefix`` put before the user's arguments."""

    module: str
    function: str
    summary: str
    prefix: tuple[str, ...] = ()

    def entry(self) -> Callable[[list[str]], int | None]:
        return getattr(importlib.import_module(self.module), self.function)


COMMANDS: dict[str, Command] = {
    "train": Command("longhorn_zoo.train", "run_command",
                     "train from a TOML file or a shipped config's name, in one process"),
    "eval": Command("longhorn_zoo.eval", "main", "validation loss and length extrapolation of a trained run, "
                    "or its MQAR accuracy sweep"),
    "generate": Command("longhorn_zoo.generate", "main", "sample text from a trained run (recurrent decoding)"),
    "export": Command("longhorn_zoo.checkpoint", "main", "write a DCP checkpoint's model weights as one "
                      "torch.save file", ("export",)),
    "hf-export": Command("longhorn_zoo.export", "main", "write a trained run as a Hugging Face model folder "
                         "(safetensors, config.json, tokenizer; needs the hf extra)"),
    "lm-eval": Command("longhorn_zoo.lm_eval", "main", "run lm-evaluation-harness tasks on a trained run "
                       "(needs the hf extra)"),
    "plugins": Command("longhorn_zoo.registry", "main", "list the installed mixer plugins and their op backends"),
    "prepare": Command("longhorn_zoo.data.prepare", "main", "tokenize a text source into token shards "
                       "(needs the data extra)"),
    "conformance": Command("longhorn_zoo.conformance.__main__", "main", "run the conformance suite on "
                           "installed mixers (needs pytest: the conformance extra)"),
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("longhorn-zoo")
    except PackageNotFoundError:
        return "unknown (not installed)"


def usage() -> str:
    """The text of ``longhorn-zoo --help``."""
    width = max(map(len, COMMANDS))
    lines = ["usage: longhorn-zoo COMMAND [ARGS ...]", "       longhorn-zoo COMMAND --help", "",
             "Train, evaluate and test sequence-mixer plugins. Commands:", ""]
    for name, cmd in COMMANDS.items():
        module = cmd.module.removesuffix(".__main__")
        lines.append(f"  {name:<{width}}  {cmd.summary}")
        lines.append(f"  {'':<{width}}  (python -m {module}{''.join(' ' + p for p in cmd.prefix)})")
    lines += ["", "Several processes or GPUs: run_train.sh from a checkout, or",
              "  torchrun --nproc-per-node N -m longhorn_zoo.train CONFIG"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run ``longhorn-zoo COMMAND ARGS``; returns the command's exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"longhorn-zoo {_version()}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        print(f"longhorn-zoo: unknown command {name!r}; commands: {', '.join(COMMANDS)}.{hint}", file=sys.stderr)
        return 2
    cmd = COMMANDS[name]
    return int(cmd.entry()([*cmd.prefix, *rest]) or 0)


if __name__ == "__main__":
    sys.exit(main())
