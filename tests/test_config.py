"""Config loading: precedence, plugin defaults, and errors that name the key and the fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from longhorn_zoo.config import ConfigError, load_config, parse_args, to_toml
from longhorn_zoo.tomlcompat import tomllib


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "job.toml"
    p.write_text(text)
    return p


def test_plugin_defaults_apply_under_user_values(tmp_path):
    cfg = load_config(write(tmp_path, '[model]\nname = "longhorn"\n[model.mixer]\nd_state = 8\n'))
    assert cfg.model.mlp is False  # from plugins/longhorn/defaults.toml
    assert cfg.model.mixer == {"d_state": 8, "expand": 2, "conv_kernel": 4, "dt_rank": 0, "init": "mamba_ssm"}
    cfg = load_config(write(tmp_path, '[model]\nname = "longhorn"\nmlp = true\n'))
    assert cfg.model.mlp is True  # the user beats the plugin


def test_command_line_beats_toml(tmp_path):
    path = write(tmp_path, "[training]\nsteps = 5\n[optimizer]\nlr = 0.1\n")
    cfg = load_config(path, ["--training.steps", "7", "--optimizer.lr=0.5", "--model.mixer.d_state", "4"])
    assert (cfg.training.steps, cfg.optimizer.lr, cfg.model.mixer["d_state"]) == (7, 0.5, 4)


@pytest.mark.parametrize(
    ("text", "overrides", "match"),
    [
        ("[trainig]\nsteps = 1\n", [], r"unknown section \[trainig\].*Did you mean 'training'"),
        ("[training]\nstepz = 1\n", [], r"unknown key training.stepz.*Did you mean 'steps'"),
        ("[training]\nsteps = 'ten'\n", [], r"training.steps = 'ten' has type str, expected int"),
        ("[training]\nsteps = true\n", [], r"expected int"),
        ("[lr_scheduler]\ndecay_type = 'cosin'\n", [], r"choose one of cosine, wsd, constant.*'cosine'"),
        ("[model]\nname = 'longhron'\n", [], r"unknown mixer 'longhron'.*Did you mean 'longhorn'"),
        ("[model.mixer]\nd_stat = 3\n", [], r"model.mixer.d_stat.*valid keys: d_state.*Did you mean 'd_state'"),
        ("[model.mixer]\nd_state = 'big'\n", [], r"model.mixer.d_state = 'big'.*expected int"),
        ("", ["--training.steps", "x"], r"'x' is not a number"),
        ("", ["--trainng.steps", "1"], r"unknown section 'trainng'.*'training'"),
        ("", ["--training.max_nrom", "1"], r"unknown key 'max_nrom'.*'max_norm'"),
        ("", ["--model.mixer.expand", "two"], r"model.mixer.expand.*not a number"),
        ("[training\n", [], r"not valid TOML"),
    ],
)
def test_bad_configs_name_the_key_and_the_fix(tmp_path, text, overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(write(tmp_path, text), overrides)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["--training.steps", "-5"], r"training.steps = -5 is out of range: it must be >= 1"),
        (["--training.seq_len", "0"], r"training.seq_len = 0 is out of range: it must be >= 1"),
        (["--checkpoint.interval", "0"], r"checkpoint.interval = 0 is out of range: it must be >= 1"),
        (["--training.global_batch_size", "0"], r"global_batch_size = 0 is out of range: it must be -1 or >= 1"),
        (["--optimizer.lr", "0"], r"optimizer.lr = 0.0 is out of range: it must be > 0"),
        (["--optimizer.beta2", "1"], r"optimizer.beta2 = 1.0 is out of range: it must be in \[0, 1\)"),
        (["--data.val_fraction", "1.5"], r"val_fraction = 1.5 is out of range: it must be in \(0, 1\)"),
        (["--checkpoint.load_step", "-2"], r"load_step = -2 is out of range: it must be -1 or >= 0"),
        (["--optimizer.lr", "nan"], r"optimizer.lr = nan is out of range"),
    ],
)
def test_numbers_out_of_range_name_the_key_the_value_and_the_range(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_every_numeric_option_has_a_range_that_holds_its_default():
    import dataclasses

    from longhorn_zoo.config import JobConfig

    cfg = JobConfig()
    for section in dataclasses.fields(cfg):
        for f in dataclasses.fields(getattr(cfg, section.name)):
            value = getattr(getattr(cfg, section.name), f.name)
            if isinstance(value, int | float) and not isinstance(value, bool):
                assert f.metadata["valid"] is not None, f"{section.name}.{f.name} has no range"
                assert value in f.metadata["valid"], f"{section.name}.{f.name} default {value} out of range"



@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["--model.name", "llama", "--model.mixer.n_heads", "-2"],
         r"model.mixer.n_heads = -2 is out of range: it must be >= 1"),
        (["--model.name", "gla", "--model.mixer.head_norm", "layernorm"],
         r"head_norm = 'layernorm' is not valid; choose one of .*Did you mean 'layernorm_noaffine'"),
        (["--model.name", "rwkv", "--model.mixer.ffn_ratio", "0"], r"ffn_ratio = 0.0 is out of range: it must be > 0"),
        (["--model.pattern", '["longhorn", "llama"]', "--model.n_layers", "2", "--model.mixers.llama.n_heads", "0"],
         r"model.mixers.llama.n_heads = 0 is out of range: it must be >= 1"),
        (["--model.pattern", '["longhorn", "llama"]', "--model.n_layers", "2", "--model.mixers.longhorn.init", "x"],
         r"model.mixers.longhorn.init = 'x' is not valid; choose one of mamba_ssm, normal"),
    ],
)
def test_plugin_options_are_checked_against_the_plugins_valid_table(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_every_builtin_plugin_declares_the_valid_values_of_its_numeric_and_string_options():
    from longhorn_zoo.config import _plugin_defaults
    from longhorn_zoo.registry import get_registry

    registry = get_registry()
    builtin = [name for name in registry.names() if registry.get(name).source.dist == "longhorn-zoo"]
    assert {"llama", "longhorn", "mamba", "gla", "retnet", "rwkv", "rwkv5"} <= set(builtin)
    for name in builtin:  # an installed third-party plugin may leave [valid] out
        _, options, checks = _plugin_defaults(name)
        unchecked = [k for k, v in options.items() if isinstance(v, int | float | str) and not isinstance(v, bool)
                     and k not in checks]
        assert not unchecked, f"{name}: [valid] has no entry for {unchecked}"


@pytest.mark.parametrize(
    ("valid", "match"),
    [
        ({"widht": {"min": 1}}, r"\[valid\] names 'widht', which is not an option of \[mixer\].*'width'"),
        ({"width": ["a", "b"]}, r"width = \['a', 'b'\]: the option's default is 2, so its entry must be a table"),
        ({"flag": ["a"]}, r"flag: only string and number options take an entry \(its default is True\)"),
        ({"kind": {"min": 1}}, r"kind = .*default is 'x', so its entry must be a list of strings"),
        ({"kind": ["y", "z"]}, r"\[valid\] kind rejects its default kind = 'x' is not valid; choose one of y, z"),
        ({"width": {"min": 3}}, r"\[valid\] width rejects its default width = 2 is out of range: it must be >= 3"),
        ({"width": {"least": 1}}, r"unknown bound 'least'; use min, max, gt, lt or also"),
        ({"width": {"min": 1, "gt": 0}}, r"one lower and one upper bound at most"),
        ({"width": {"also": [0]}}, r"width = \{'also': \[0\]\} gives no bound; use min, max, gt or lt"),
        ({"width": {"max": "9"}}, r"width.max = '9' is not a number"),
        ({"width": {"min": 1, "also": [0.5]}}, r"width.also = \[0.5\] must be a list of integers"),
    ],
)
def test_a_bad_valid_table_names_the_option_and_the_fix(valid, match):
    from longhorn_zoo.config import option_checks

    with pytest.raises(ValueError, match=match):
        option_checks(valid, {"width": 2, "kind": "x", "flag": True})


def test_valid_table_bounds_and_choices():
    from longhorn_zoo.config import Range, option_checks

    checks = option_checks({"width": {"gt": 0, "max": 8, "also": [-1]}, "kind": ["x", "y"], "eps": {"min": 0}},
                           {"width": 2, "kind": "x", "eps": 1e-5})
    assert checks["kind"] == (str, ("x", "y"), None)
    assert checks["width"] == (int, None, Range(lo=0, lo_open=True, hi=8, also=(-1,)))
    assert checks["eps"][0] is float and 0.0 in checks["eps"][2] and -1e-9 not in checks["eps"][2]

def test_a_range_is_checked_in_toml_files_too(tmp_path):
    with pytest.raises(ConfigError, match=r"job.toml: training.steps = 0 is out of range: it must be >= 1"):
        load_config(write(tmp_path, "[training]\nsteps = 0\n"))


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_print_config_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, "[model]\nname = 'llama'\ndim = 96\n"), ["--model.mixer.n_heads", "3"])
    again = write(tmp_path, to_toml(cfg))
    assert tomllib.loads(again.read_text())["model"]["mixer"]["n_heads"] == 3
    assert load_config(again) == cfg


def test_every_shipped_config_loads():
    """The package's configs (what a wheel installs) are the repo's train_configs/*.toml, and all load."""
    from longhorn_zoo import train_configs

    names = train_configs.names()
    assert names == sorted(p.stem for p in Path(__file__).parents[1].glob("train_configs/*.toml"))
    for name in names:
        load_config(train_configs.path_of(name))


def test_help_lists_every_option_with_its_doc():
    out = subprocess.run([sys.executable, "-m", "longhorn_zoo.train", "--help"], capture_output=True, text=True).stdout
    assert "--training.steps INT" in out and "Optimizer steps to train." in out
    assert "--lr_scheduler.decay_type STR {cosine|wsd|constant}" in out
    assert "--training.global_batch_size INT (-1 or >= 1)" in out


def test_parse_args_reads_path_and_print_flag(tmp_path):
    path = write(tmp_path, "[training]\nsteps = 3\n")
    cfg, show = parse_args([str(path), "--print-config", "--training.seed", "4"])
    assert show and cfg.training.steps == 3 and cfg.training.seed == 4


def test_key_given_under_the_wrong_section_names_its_section(tmp_path):
    with pytest.raises(ConfigError, match=r"'lr' is a key of \[optimizer\]"):
        load_config(None, ["--training.lr", "0.1"])
    with pytest.raises(ConfigError, match=r"'seq_len' is a key of \[training\]"):
        load_config(write(tmp_path, "[model]\nseq_len = 3\n"))


def test_docs_configs_table_matches_the_configs():
    """Every row of docs/configs.md (layers x dim, context, parameters) is what the config builds."""
    import re

    from longhorn_zoo.model import build_model

    root = Path(__file__).resolve().parents[1]
    row = re.compile(r"\| `(\w+\.toml)` \| [\w+]+ \| (\d+) x (\d+) \| (\d+) \| \w+ \| [^|]+\| ([\d,]+) \| ([\d,]+) \|")
    rows = [m for line in (root / "docs" / "configs.md").read_text().splitlines() if (m := row.match(line))]
    assert len(rows) >= 30 and any("hybrid" in m.group(1) for m in rows)
    stale = []
    for m in rows:
        cfg = load_config(root / "train_configs" / m.group(1), [])
        model = build_model(cfg.model, cfg.training.seq_len, "meta")
        built = (cfg.model.n_layers, cfg.model.dim, cfg.training.seq_len, model.num_params(),
                 model.num_params(exclude_embedding=True))
        documented = tuple(int(g.replace(",", "")) for g in m.groups()[1:])
        if built != documented:
            stale.append(f"{m.group(1)}: documented {documented}, built {built}")
    assert not stale, "docs/configs.md is stale:\n" + "\n".join(stale)


def test_bare_boolean_flags_and_their_negation():
    cfg = load_config(None, ["--checkpoint.enable", "--training.steps", "3", "--no-model.mlp",
                             "--metrics.enable_jsonl"])
    assert (cfg.checkpoint.enable, cfg.model.mlp, cfg.metrics.enable_jsonl, cfg.training.steps) == (True, False,
                                                                                                   True, 3)
    assert load_config(None, ["--checkpoint.enable", "false"]).checkpoint.enable is False


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["--training.steps"], r"--training.steps needs a value"),
        (["--training.steps", "--checkpoint.enable"], r"--training.steps needs a value"),
        (["--no-training.steps"], r"only boolean keys take --no-; --training.steps is int"),
        (["--no-checkpoint.enable=true"], r"--no-checkpoint.enable takes no value"),
    ],
)
def test_flags_without_values_are_clear_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_config_file_option_anywhere_and_shipped_configs_by_name(tmp_path):
    path = write(tmp_path, "[training]\nsteps = 3\n")
    for argv in (["--training.seed", "4", "--job.config_file", str(path)],
                 ["--training.seed", "4", f"--job.config_file={path}"], [str(path), "--training.seed", "4"]):
        cfg, _ = parse_args(argv)
        assert (cfg.training.steps, cfg.training.seed) == (3, 4), argv
    by_name, _ = parse_args(["debug_longhorn"])
    by_option, _ = parse_args(["--training.seed", "1", "--job.config_file", "debug_longhorn.toml"])
    assert by_name.job.dump_folder == by_option.job.dump_folder == "./outputs/debug_longhorn"
    assert by_option.training.seed == 1 and by_name.model.dim == 128


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["debug_longhron"], r"no shipped config named 'debug_longhron'.*Did you mean debug_longhorn"),
        (["no/such/file.toml"], r"config file no/such/file.toml does not exist"),
        (["debug_llama", "--job.config_file", "debug_gla"], r"more than one config file"),
        (["--training.seed", "1", "--job.config_file"], r"--job.config_file needs a value"),
    ],
)
def test_bad_config_arguments_are_clear_errors(argv, match):
    with pytest.raises(ConfigError, match=match):
        parse_args(argv)
