"""The ``longhorn-zoo`` command: its subcommands reach the module mains, with clear help and errors."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from longhorn_zoo import cli


def test_help_lists_every_command_with_its_module(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name, cmd in cli.COMMANDS.items():
        assert f"  {name}  " in out and f"python -m {cmd.module.removesuffix('.__main__')}" in out
    assert set(cli.COMMANDS) == {"train", "eval", "generate", "export", "hf-export", "lm-eval", "plugins", "prepare",
                                 "conformance"}
    assert all(callable(cmd.entry()) for cmd in cli.COMMANDS.values())


def test_unknown_or_missing_command_is_a_clear_error(capsys):
    assert cli.main(["trian"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'trian'" in err and "Did you mean 'train'" in err
    assert cli.main([]) == 2
    assert "usage: longhorn-zoo COMMAND" in capsys.readouterr().err


def test_train_takes_a_shipped_config_by_name(capsys):
    assert cli.main(["train", "debug_longhorn", "--print-config", "--checkpoint.enable"]) == 0
    out = capsys.readouterr().out
    assert 'dump_folder = "./outputs/debug_longhorn"' in out and "enable = true" in out


@pytest.mark.parametrize(("command", "expect"), [("export", "--checkpoint"), ("prepare", "--source"),
                                                 ("eval", "--checkpoint"), ("plugins", "mixer plugins"),
                                                 ("train", "--training.steps INT")])
def test_each_command_prints_its_own_help(command, expect, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0 and expect in capsys.readouterr().out


def test_conformance_without_pytest_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pytest", None)  # import pytest raises ImportError
    assert cli.main(["conformance", "llama"]) == 1
    assert "pip install 'longhorn-zoo[conformance]'" in capsys.readouterr().err


def test_the_console_script_is_installed_and_runs():
    (script,) = entry_points(group="console_scripts", name="longhorn-zoo")
    assert script.value == "longhorn_zoo.cli:main"
    exe = Path(sys.executable).with_name("longhorn-zoo")
    out = subprocess.run([str(exe), "plugins"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    listed = {line.split()[0] for line in out.stdout.splitlines()[1:]}
    assert {"llama", "longhorn", "mamba", "gla", "retnet", "rwkv"} <= listed


def test_prepare_runs_as_a_module():
    out = subprocess.run([sys.executable, "-m", "longhorn_zoo.data.prepare", "--help"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "--source" in out.stdout and "--tokenizer" in out.stdout
