"""Job configuration: sectioned dataclasses, TOML files and ``--section.key value`` overrides.

Each field's ``help`` metadata is its documentation and its ``--help`` text; a numeric
field's ``valid`` metadata (a :class:`Range`) is its valid range. A TOML file's sections
and keys map one to one onto these dataclasses. Precedence, lowest to highest:
dataclass defaults, the mixer plugin's defaults file, the TOML file, the command line.
Unknown sections or keys, wrong types, values out of range and unknown mixers are
errors that name the key, the value and the valid choices or range.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from longhorn_zoo.tomlcompat import tomllib


class ConfigError(ValueError):
    """A bad config value, key or file. The message names it and the fix."""


class _CliText(str):
    """A ``--model.mixer.*`` or ``--model.mixers.*`` value as typed; converted once the option's type is known."""


BLOCK_KEYS = ("mlp", "mlp_ratio", "mlp_activation", "mlp_multiple_of", "mlp_hidden", "mlp_depth_scaled_init")
"""The [model] keys of a block's MLP, which a hybrid stack sets per mixer, in its ``[model.mixers.<name>]`` table."""


@dataclass(frozen=True)
class Range:
    """The valid values of a numeric option: ``lo <= v <= hi`` (``<`` where open), or one of ``also``.

    ``Range(lo=1)`` is ">= 1", ``Range(lo=0, lo_open=True)`` is "> 0", and ``Range(lo=1, also=(-1,))``
    is "-1, or >= 1" (an option whose -1 means "automatic").
    """

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    also: tuple[int, ...] = ()

    def __contains__(self, v: float) -> bool:
        if v in self.also:
            return True
        if v != v:  # NaN is in no range
            return False
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)

    def __str__(self) -> str:
        if self.lo is not None and self.hi is not None:
            text = f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        elif self.lo is not None:
            text = f"{'>' if self.lo_open else '>='} {self.lo:g}"
        else:
            text = f"{'<' if self.hi_open else '<='} {self.hi:g}"
        return " or ".join([*(str(a) for a in self.also), text])


POSITIVE_INT = Range(lo=1)
NON_NEGATIVE = Range(lo=0)
POSITIVE = Range(lo=0, lo_open=True)
FRACTION = Range(lo=0, hi=1)


def opt(default: Any, help: str, choices: tuple[str, ...] | None = None, valid: Range | None = None) -> Any:
    """A config field with its help text, and its valid choices (strings) or range (numbers)."""
    meta = {"help": help, "choices": choices, "valid": valid}
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Job:
    dump_folder: str = opt("./outputs", "Folder for TensorBoard events, checkpoints and logs of this job.")
    description: str = opt("", "Free text describing the run; printed at start-up.")


@dataclass
class Model:
    name: str = opt("longhorn", "Mixer plugin name (see `python -m longhorn_zoo.registry`).")
    dim: int = opt(256, "Model width D.", valid=POSITIVE_INT)
    n_layers: int = opt(4, "Number of residual blocks.", valid=POSITIVE_INT)
    vocab_size: int = opt(256, "Vocabulary size; at least the data's (tokenizers pad theirs to a multiple of "
                          "64, e.g. gpt2 50304). -1 takes it from the data.", valid=Range(lo=1, also=(-1,)))
    norm: str = opt("rmsnorm", "The blocks' and the final norm: rmsnorm, or layernorm (with a weight, no bias).",
                    choices=("rmsnorm", "layernorm"))
    norm_eps: float = opt(1e-5, "Epsilon of the blocks' and the final norm.", valid=POSITIVE)
    mlp: bool = opt(True, "Add a gated MLP after the mixer in each block (plugins may default it off).")
    mlp_activation: str = opt("silu", "The MLP's gate: silu (SwiGLU) or gelu (GeGLU, RetNet's FFN).",
                              choices=("silu", "gelu"))
    mlp_ratio: float = opt(8 / 3, "MLP hidden size as a multiple of dim, rounded up to mlp_multiple_of.",
                          valid=POSITIVE)
    mlp_multiple_of: int = opt(64, "The MLP hidden size is rounded up to a multiple of this (the seed's "
                               "SwiGLU uses 256).", valid=POSITIVE_INT)
    mlp_hidden: int = opt(0, "MLP hidden size; 0 takes it from mlp_ratio and mlp_multiple_of.", valid=NON_NEGATIVE)
    mlp_depth_scaled_init: bool = opt(True, "The MLP's output projection starts at std 0.02 / sqrt(2 n_layers) "
                                      "(GPT-2's residual scaling, the seed's Llama); false: 0.02 like its other "
                                      "weights (the seed's GLA and RetNet).")
    position_embedding: bool = opt(False, "Add a learned absolute position embedding (max seq_len positions, "
                                   "counted from each document start) to the token embedding, as the seed's "
                                   "RWKV does.")
    tie_embeddings: bool = opt(False, "Share the token embedding and LM head weights.")
    op_backend: str = opt(
        "auto",
        "Scan-op backend: auto (fastest available), reference, cuda or triton. "
        "reference also gives Llama's dense document mask instead of flex_attention.",
    )
    mixer: dict = opt({}, "Mixer-specific options; valid keys come from the plugin's [mixer] defaults.")
    pattern: list = opt([], "A hybrid stack instead of one mixer: the mixer names of consecutive blocks, repeated "
                        "over n_layers (a multiple of its length), e.g. [\"longhorn\", \"longhorn\", \"longhorn\", "
                        "\"llama\"]. Leave name, the mlp* keys and [model.mixer] out: each mixer's are in "
                        "[model.mixers.<name>]. Empty: every block is model.name.")
    mixers: dict = opt({}, "Hybrid stacks: a [model.mixers.<name>] table per mixer of model.pattern, with its "
                       "options (the plugin's [mixer] keys) and its blocks' mlp, mlp_ratio, mlp_activation, "
                       "mlp_multiple_of, mlp_hidden and mlp_depth_scaled_init; each defaults to "
                       "its plugin's defaults file.")

    def block_mixers(self) -> list[str]:
        """The mixer name of each block: ``pattern`` repeated over ``n_layers``, or ``name`` in every block."""
        if not self.pattern:
            return [self.name] * self.n_layers
        return self.pattern * (self.n_layers // len(self.pattern))


@dataclass
class Optimizer:
    name: str = opt("AdamW", "Optimizer.", choices=("AdamW",))
    lr: float = opt(1e-3, "Peak learning rate.", valid=POSITIVE)
    beta1: float = opt(0.9, "AdamW beta1.", valid=Range(lo=0, hi=1, hi_open=True))
    beta2: float = opt(0.95, "AdamW beta2.", valid=Range(lo=0, hi=1, hi_open=True))
    eps: float = opt(1e-8, "AdamW epsilon.", valid=POSITIVE)
    weight_decay: float = opt(0.1, "Weight decay, applied to parameters with two or more dimensions that their module "
                               "does not list in no_weight_decay.", valid=NON_NEGATIVE)
    weight_decay_exemptions: bool = opt(True, "Honour the modules' no_weight_decay lists (Mamba's A_log); false "
                                        "decays every parameter of two or more dimensions, as the seed does.")
    implementation: str = opt("fused", "How AdamW updates the parameters: fused (fused=True, one kernel that reads "
                              "and writes each fp32 state once), foreach (foreach=True, multi-tensor kernels that "
                              "pass over the states several times) or for-loop (neither: one parameter at a time, "
                              "what torch picks on CPU). Fused is the default: in longhorn_1b's step on an H200 the "
                              "optimizer took 33.7 ms with foreach and 24.2 ms fused (docs/benchmarks.md, the "
                              "step profile).", choices=("fused", "foreach", "for-loop"))


@dataclass
class LRScheduler:
    warmup_steps: int = opt(10, "Linear warm-up steps from 0 to the peak learning rate.", valid=NON_NEGATIVE)
    decay_type: str = opt("cosine", "Schedule after warm-up.", choices=("cosine", "wsd", "constant"))
    min_lr_ratio: float = opt(0.1, "Final learning rate as a fraction of the peak.", valid=FRACTION)
    wsd_decay_ratio: float = opt(0.2, "WSD only: fraction of the steps spent in the final linear decay.",
                                 valid=FRACTION)


@dataclass
class Training:
    steps: int = opt(200, "Optimizer steps to train.", valid=POSITIVE_INT)
    local_batch_size: int = opt(16, "Sequences per micro-batch on each data-parallel rank.", valid=POSITIVE_INT)
    global_batch_size: int = opt(-1, "Sequences per optimizer step over all ranks; a multiple of local x ranks "
                                 "reached by gradient accumulation. -1 means local x ranks.",
                                 valid=Range(lo=1, also=(-1,)))
    seq_len: int = opt(128, "Tokens per sequence.", valid=POSITIVE_INT)
    max_norm: float = opt(1.0, "Gradient-norm clipping threshold (0 disables clipping).", valid=NON_NEGATIVE)
    seed: int = opt(0, "Random seed for init and data; the same seed repeats the run.", valid=NON_NEGATIVE)
    mixed_precision: str = opt("auto", "Autocast dtype: auto (bf16 on CUDA, fp32 on CPU), bf16 or fp32.",
                               choices=("auto", "bf16", "fp32"))
    device: str = opt("auto", "auto (CUDA if present, else CPU), cuda or cpu.", choices=("auto", "cuda", "cpu"))
    eval_interval: int = opt(0, "Steps between validation-loss evaluations (0: only after the last step).",
                             valid=NON_NEGATIVE)
    eval_batches: int = opt(4, "Validation batches per evaluation.", valid=POSITIVE_INT)


@dataclass
class Data:
    dataset: str = opt("bytes", "Data source: bytes (byte-level LM on the embedded corpus), mqar "
                       "(multi-query associative recall), text (tokenize `source` on the fly) or shards "
                       "(token shards from longhorn-zoo prepare; the fast path). See docs/data.md.",
                       choices=("bytes", "mqar", "text", "shards"))
    mqar_num_kv_pairs: int = opt(8, "MQAR: key-value pairs per sequence.", valid=POSITIVE_INT)
    mqar_vocab_size: int = opt(64, "MQAR: tokens used for keys and for values (each half of the range).",
                               valid=Range(lo=4))
    val_fraction: float = opt(0.05, "Fraction of the corpus held out for validation (bytes).",
                              valid=Range(lo=0, hi=1, lo_open=True, hi_open=True))
    source: str = opt("", "text: a Hugging Face hub dataset id or alias (slimpajama, openwebtext, fineweb-edu), "
                      "streamed, or a local txt/jsonl/parquet file, glob or folder.")
    hf_config: str = opt("", "text: the hub dataset's config name (e.g. sample-10BT); empty for the default.")
    hf_revision: str = opt("", "text: the hub dataset's branch, tag or commit; empty for main. "
                           "refs/convert/parquet reads the Parquet export of a script-based dataset.")
    text_field: str = opt("text", "text: the column holding each document's text.")
    txt_sample_by: str = opt("paragraph", "text, txt files: one document per line, paragraph (blank-line "
                             "separated) or document (whole file).", choices=("line", "paragraph", "document"))
    val_split: str = opt("", "text: the source's split used for validation (e.g. validation); empty holds out "
                         "the first val_docs train documents.")
    val_docs: int = opt(1000, "text: leading train documents held out for validation when val_split is empty.",
                        valid=POSITIVE_INT)
    tokenizer: str = opt("gpt2", "text: bytes (EOS = NUL, vocab 256), a tiktoken encoding (gpt2, r50k_base, "
                         "cl100k_base, o200k_base), a local .tiktoken file or a local Hugging Face tokenizer.json. "
                         "shards record their own. A run's config.toml records the one it trained with.")
    shard_dir: str = opt("", "shards: the folder longhorn-zoo prepare wrote (with train/ and val/ inside).")
    shuffle: bool = opt(True, "shards: visit the sequences in a seeded random order each epoch.")
    document_boundaries: bool = opt(False, "text, shards: keep the documents packed into a row apart: every "
                                    "mixer restarts its state (and short convs) where a document starts, and "
                                    "attention is block-causal. Turn it on for corpora of unrelated documents "
                                    "(web text), so that no token is predicted from an earlier, unrelated "
                                    "document; off, a row is one stream, as the seed trains. See docs/data.md.")


@dataclass
class Checkpoint:
    enable: bool = opt(False, "Save DCP checkpoints under <dump_folder>/<folder>/step-N and resume from the "
                       "newest complete one at start-up.")
    folder: str = opt("checkpoint", "Checkpoint folder, relative to the dump folder.")
    interval: int = opt(500, "Steps between checkpoints; the last step is always saved.", valid=POSITIVE_INT)
    keep_latest_k: int = opt(0, "Keep only the newest k complete checkpoints; 0 keeps all.", valid=NON_NEGATIVE)
    async_mode: str = opt("disabled", "disabled: save blocks training; async: copy to CPU, then write in a "
                          "background thread while training goes on.", choices=("disabled", "async"))
    load_step: int = opt(-1, "Resume from this step's checkpoint (an error if it is missing or corrupt); "
                         "-1 resumes from the newest complete one, falling back past corrupt ones.",
                         valid=Range(lo=0, also=(-1,)))
    export_on_finish: bool = opt(False, "At the end, also write <folder>/model.pt: the model weights only "
                                 "(full tensors, torch.save), loadable with torch.load(weights_only=True).")
    export_dtype: str = opt("float32", "dtype of the exported weights.", choices=("float32", "bfloat16"))
    create_seed_checkpoint: bool = opt(False, "On one rank: initialise the model, save its weights as step-0 and "
                                       "exit. Runs of any rank count that resume from it start from the same "
                                       "weights (sharded initialisation depends on the sharding).")


@dataclass
class Parallelism:
    data_parallel_shard_degree: int = opt(-1, "FSDP shard degree; -1 uses every rank not used by replication.",
                                          valid=Range(lo=1, also=(-1,)))
    data_parallel_replicate_degree: int = opt(1, "HSDP replicate degree: >1 makes a 2-D (replicate x shard) "
                                              "mesh, e.g. nodes x GPUs per node. 1 is plain FSDP.", valid=POSITIVE_INT)
    mixed_precision_reduce: str = opt("float32", "dtype of FSDP's gradient reduce-scatter (params are gathered "
                                      "in bf16 when training.mixed_precision gives bf16).",
                                      choices=("float32", "bfloat16"))


@dataclass
class Compile:
    enable: bool = opt(False, "torch.compile each block separately with fullgraph=True (no graph breaks).")
    backend: str = opt("inductor", "torch.compile backend (inductor; aot_eager to debug).")


@dataclass
class ActivationCheckpoint:
    mode: str = opt("none", "none; selective (see selective_ac_option); full: recompute every block in backward.",
                    choices=("none", "selective", "full"))
    selective_ac_option: str = opt("2", "selective only: an integer N checkpoints every N-th block; 'op' "
                                   "checkpoints every block but saves the matmul and attention outputs, "
                                   "recomputing only the cheap element-wise ops.")


@dataclass
class Float8:
    enable: bool = opt(False, "Train the Linear layers in float8 with torchao's convert_to_float8_training "
                       "(needs torchao and a GPU of compute capability 8.9+, e.g. H100/H200).")
    enable_fsdp_float8_all_gather: bool = opt(False, "All-gather FSDP parameters in float8 (halves all-gather "
                                              "bytes).")
    filter_fqns: list = opt(["output"], "Linear layers whose name contains one of these stay in high precision.")


@dataclass
class Metrics:
    log_freq: int = opt(10, "Steps between console and TensorBoard logs (the first and last steps are logged too).",
                        valid=POSITIVE_INT)
    enable_tensorboard: bool = opt(True, "Write TensorBoard events to a new folder per run, "
                                   "<dump_folder>/<save_tb_folder>/<YYYYmmdd-HHMMSS>.")
    save_tb_folder: str = opt("tb", "Parent of the runs' TensorBoard folders, relative to the dump folder.")
    enable_wandb: bool = opt(False, "Also log the same scalars to Weights & Biases (needs the wandb package; "
                             "project from $WANDB_PROJECT, default longhorn-zoo; WANDB_MODE=offline works).")
    enable_jsonl: bool = opt(False, "Also append each log step's metrics as a JSON line to "
                             "<dump_folder>/metrics.jsonl (exact floats, for tests and scripts).")


@dataclass
class Profiling:
    enable_profiling: bool = opt(False, "Trace training steps with torch.profiler: every profile_freq-th step, after 3 "
                                 "warm-up steps, is written as <save_traces_folder>/iteration_N/rankR_trace.json, "
                                 "which opens in Perfetto (ui.perfetto.dev) or TensorBoard's profiler plugin.")
    save_traces_folder: str = opt("profile_traces", "Trace folder, relative to the dump folder.")
    profile_freq: int = opt(10, "Steps between traced steps (profiling and memory snapshots).", valid=POSITIVE_INT)
    enable_memory_snapshot: bool = opt(False, "CUDA only: record the allocator's history and write "
                                       "<save_memory_snapshot_folder>/iteration_N/rankR_memory_snapshot.pickle every "
                                       "profile_freq steps and on out-of-memory (open at pytorch.org/memory_viz).")
    save_memory_snapshot_folder: str = opt("memory_snapshot", "Memory snapshot folder, relative to the dump folder.")


@dataclass
class JobConfig:
    job: Job = field(default_factory=Job)
    model: Model = field(default_factory=Model)
    optimizer: Optimizer = field(default_factory=Optimizer)
    lr_scheduler: LRScheduler = field(default_factory=LRScheduler)
    training: Training = field(default_factory=Training)
    data: Data = field(default_factory=Data)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    parallelism: Parallelism = field(default_factory=Parallelism)
    compile: Compile = field(default_factory=Compile)
    activation_checkpoint: ActivationCheckpoint = field(default_factory=ActivationCheckpoint)
    float8: Float8 = field(default_factory=Float8)
    metrics: Metrics = field(default_factory=Metrics)
    profiling: Profiling = field(default_factory=Profiling)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)


def _sections() -> dict[str, type]:
    hints = get_type_hints(JobConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(JobConfig)}


def _suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def _elsewhere(key: str) -> str:
    """Where a key that is not in the section it was given under really lives, if anywhere."""
    homes = [name for name, cls in _sections().items() if key in get_type_hints(cls)]
    return f" {key!r} is a key of [{'], ['.join(homes)}]." if homes else ""


def _coerce(where: str, value: Any, typ: type, choices: tuple[str, ...] | None, valid: Range | None = None) -> Any:
    """Check ``value`` against ``typ``, its choices and its range, converting int to float; raise ConfigError
    if it does not fit."""
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    ok = isinstance(value, typ) and not (typ is int and isinstance(value, bool))
    if not ok:
        raise ConfigError(f"{where} = {value!r} has type {type(value).__name__}, expected {typ.__name__}")
    if choices is not None and value not in choices:
        raise ConfigError(f"{where} = {value!r} is not valid; choose one of {', '.join(choices)}."
                          + _suggest(str(value), list(choices)))
    if valid is not None and value not in valid:
        raise ConfigError(f"{where} = {value!r} is out of range: it must be {valid}")
    return value


def _parse_cli_value(where: str, text: str, typ: type) -> Any:
    """Turn a command-line string into ``typ`` (TOML syntax for numbers, bools and tables)."""
    if typ is str:
        return text
    if typ is bool:
        low = text.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ConfigError(f"{where}: {text!r} is not a boolean; use true or false")
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        if typ in (int, float):
            raise ConfigError(f"{where}: {text!r} is not a number") from None
        return text


def _apply(cfg: JobConfig, table: dict[str, Any], origin: str) -> None:
    """Merge a parsed TOML table (sections of keys) into ``cfg``, checking every key."""
    sections = _sections()
    for sec_name, values in table.items():
        if sec_name not in sections:
            raise ConfigError(f"{origin}: unknown section [{sec_name}]; valid sections: {', '.join(sections)}."
                              + _suggest(sec_name, list(sections)))
        if not isinstance(values, dict):
            raise ConfigError(f"{origin}: [{sec_name}] must be a table of keys")
        section = getattr(cfg, sec_name)
        fields = {f.name: f for f in dataclasses.fields(section)}
        hints = get_type_hints(type(section))
        for key, value in values.items():
            if key not in fields:
                raise ConfigError(f"{origin}: unknown key {sec_name}.{key}; valid keys of [{sec_name}]: "
                                  f"{', '.join(fields)}." + (_elsewhere(key) or _suggest(key, list(fields))))
            if sec_name == "model" and key == "mixer":
                if not isinstance(value, dict):
                    raise ConfigError(f"{origin}: model.mixer must be a table")
                section.mixer.update(value)
                continue
            if sec_name == "model" and key == "mixers":
                for name, options in (value.items() if isinstance(value, dict) else [(None, None)]):
                    if not isinstance(options, dict):
                        raise ConfigError(f"{origin}: model.mixers must hold one table per mixer, "
                                          "[model.mixers.<name>]")
                    section.mixers.setdefault(name, {}).update(options)
                continue
            meta = fields[key].metadata
            value = _coerce(f"{origin}: {sec_name}.{key}", value, hints[key], meta["choices"], meta["valid"])
            setattr(section, key, value)


def _load_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; configs live in train_configs/")
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from e


def _is_flag(args: list[str], i: int) -> bool:
    """Whether ``args[i]`` is given bare: the last argument, or followed by another option."""
    return i + 1 >= len(args) or args[i + 1].startswith("--")


def _cli_table(overrides: list[str]) -> dict[str, dict[str, Any]]:
    """Parse ``--section.key value``, ``--section.key=value`` and bare boolean flags into a nested table.

    A bare ``--section.key`` (last, or followed by another option) sets a boolean key to true and
    ``--no-section.key`` sets it to false; any other key needs a value.
    """
    sections = _sections()
    table: dict[str, dict[str, Any]] = {}
    i = 0
    while i < len(overrides):
        arg = overrides[i]
        if not arg.startswith("--") or "." not in arg:
            raise ConfigError(f"unexpected argument {arg!r}; overrides take the form --section.key value")
        negated = arg.startswith("--no-")
        if "=" in arg:
            if negated:
                raise ConfigError(f"{arg.split('=', 1)[0]} takes no value (it means false)")
            dotted, text = arg[2:].split("=", 1)
            i += 1
        elif negated or _is_flag(overrides, i):
            dotted, text = arg[5:] if negated else arg[2:], "false" if negated else None
            i += 1
        else:
            dotted, text = arg[2:], overrides[i + 1]
            i += 2
        parts = dotted.split(".")
        sec_name = parts[0]
        if sec_name not in sections:
            raise ConfigError(f"--{dotted}: unknown section {sec_name!r}; valid sections: {', '.join(sections)}."
                              + _suggest(sec_name, list(sections)))
        if len(parts) == 3 and parts[:2] == ["model", "mixer"]:
            table.setdefault("model", {}).setdefault("mixer", {})[parts[2]] = _CliText("true" if text is None else text)
            continue
        if len(parts) == 4 and parts[:2] == ["model", "mixers"]:
            table.setdefault("model", {}).setdefault("mixers", {}).setdefault(parts[2], {})[parts[3]] = _CliText(text)
            continue
        if len(parts) != 2:
            raise ConfigError(f"--{dotted}: expected --section.key")
        key = parts[1]
        hints = get_type_hints(sections[sec_name])
        if key not in hints:
            raise ConfigError(f"--{dotted}: unknown key {key!r} of [{sec_name}]; valid keys: {', '.join(hints)}."
                              + (_elsewhere(key) or _suggest(key, list(hints))))
        if hints[key] is not bool and negated:
            raise ConfigError(f"{arg}: only boolean keys take --no-; --{dotted} is {hints[key].__name__}")
        if hints[key] is not bool and text is None:
            raise ConfigError(f"--{dotted} needs a value: --{dotted} VALUE")
        value = True if text is None else _parse_cli_value(f"--{dotted}", text, hints[key])
        table.setdefault(sec_name, {})[key] = value
    return table


def _plugin_defaults(name: str, where: str = "model.name") -> tuple[dict[str, Any], dict[str, Any], dict[str, Check]]:
    """The mixer plugin's ``[model]`` defaults, its ``[mixer]`` option table and the checks of its ``[valid]``
    table (:func:`option_checks`); ``where`` names the mixer's key."""
    from longhorn_zoo.registry import PluginError, get_registry

    try:
        entry = get_registry().get(name)
    except PluginError as e:
        raise ConfigError(f"{where}: {e}") from None
    table = _load_toml(Path(entry.spec.defaults))
    mixer_defaults = dict(table.pop("mixer", {}))
    # The registry has already rejected a plugin whose [valid] table is malformed (registry.validate_spec).
    return table, mixer_defaults, option_checks(table.pop("valid", {}), mixer_defaults)


Check = tuple[type, tuple[str, ...] | None, Range | None]
"""What :func:`_coerce` checks a value against: its type, its choices and its range."""


RANGE_KEYS = {"min": ("lo", False), "gt": ("lo", True), "max": ("hi", False), "lt": ("hi", True)}
"""The keys of a numeric option's entry in a defaults file's ``[valid]`` table, and the :class:`Range` bound
each sets (inclusive or open)."""


def option_checks(valid: Any, options: dict[str, Any]) -> dict[str, Check]:
    """The checks a plugin's ``[valid]`` table declares for its ``[mixer]`` options.

    A string option's entry is its list of choices, ``["a", "b"]``; a number's is a table of bounds, any of
    ``min``, ``max`` (inclusive), ``gt``, ``lt`` (open) and ``also`` (integers also allowed, e.g. ``[-1]``).
    Each option's default must pass its own check. Raises ValueError naming the option and what is wrong.
    """
    if not isinstance(valid, dict):
        raise ValueError(f"[valid] must be a table of option names, got {type(valid).__name__}")
    checks: dict[str, Check] = {}
    for key, entry in valid.items():
        if key not in options:
            raise ValueError(f"[valid] names {key!r}, which is not an option of [mixer]."
                             + _suggest(key, list(options)))
        default = options[key]
        typ = type(default)
        if isinstance(default, str) and isinstance(entry, list) and all(isinstance(c, str) for c in entry):
            checks[key] = (str, tuple(entry), None)
        elif typ in (int, float) and isinstance(entry, dict):
            if unknown := sorted(set(entry) - {*RANGE_KEYS, "also"}):
                raise ValueError(f"[valid] {key}: unknown bound {unknown[0]!r}; use min, max, gt, lt or also")
            bounds: dict[str, Any] = {}
            for name, (side, open_) in RANGE_KEYS.items():
                if name in entry:
                    if f"{side}_open" in bounds:
                        raise ValueError(f"[valid] {key}: give one lower and one upper bound at most")
                    bound = entry[name]
                    if isinstance(bound, bool) or not isinstance(bound, int | float):
                        raise ValueError(f"[valid] {key}.{name} = {bound!r} is not a number")
                    bounds.update({side: bound, f"{side}_open": open_})
            if not bounds:
                raise ValueError(f"[valid] {key} = {entry!r} gives no bound; use min, max, gt or lt")
            also = entry.get("also", [])
            if not isinstance(also, list) or not all(isinstance(a, int) and not isinstance(a, bool) for a in also):
                raise ValueError(f"[valid] {key}.also = {also!r} must be a list of integers")
            checks[key] = (typ, None, Range(**bounds, also=tuple(also)))
        elif isinstance(default, str) or typ in (int, float):
            want = "a list of strings (its choices)" if isinstance(default, str) else "a table of bounds ({ min = 1 })"
            raise ValueError(f"[valid] {key} = {entry!r}: the option's default is {default!r}, so its entry must be "
                             f"{want}")
        else:
            raise ValueError(f"[valid] {key}: only string and number options take an entry (its default is "
                             f"{default!r})")
        try:
            _coerce(f"its default {key}", default, *checks[key])
        except ConfigError as e:
            raise ValueError(f"[valid] {key} rejects {e}") from None
    return checks


def _block_key_checks() -> dict[str, Check]:
    """The type, choices and range of each :data:`BLOCK_KEYS` key, from its [model] field."""
    hints = get_type_hints(Model)
    return {f.name: (hints[f.name], f.metadata["choices"], f.metadata["valid"])
            for f in dataclasses.fields(Model) if f.name in BLOCK_KEYS}


def _merge_options(where: str, mixer: str, given: dict[str, Any], declared: dict[str, Any],
                   checks: dict[str, Check] | None = None) -> dict[str, Any]:
    """The ``declared`` options (key -> default, whose type is the option's) updated with the user's
    ``given`` ones, each type-checked; ``where`` is the table's key, e.g. ``model.mixer``. A key of
    ``checks`` (the plugin's ``[valid]`` table, a stack's block keys) is checked against its type, choices and
    range."""
    checks = checks or {}
    resolved = dict(declared)
    for key, value in given.items():
        if key not in declared:
            valid = ", ".join(declared) or "(none)"
            raise ConfigError(f"unknown key {where}.{key} for mixer {mixer!r}; valid keys: {valid}."
                              + _suggest(key, list(declared)))
        typ, choices, valid = checks.get(key, (type(declared[key]), None, None))
        if isinstance(value, _CliText):
            value = _parse_cli_value(f"--{where}.{key}", str(value), typ)
        resolved[key] = _coerce(f"{where}.{key}", value, typ, choices, valid)
    return resolved


def _check_pattern(value: Any) -> list[str]:
    """``model.pattern`` as given: [] (one mixer), or installed mixer names of which two or more differ."""
    from longhorn_zoo.registry import PluginError, get_registry

    pattern = _coerce("model.pattern", value, list, None)
    for i, name in enumerate(pattern):
        if not isinstance(name, str):
            raise ConfigError(f"model.pattern[{i}] = {name!r} is not a mixer name (a string)")
    for name in dict.fromkeys(pattern):
        try:
            get_registry().get(name)
        except PluginError as e:
            raise ConfigError(f"model.pattern[{pattern.index(name)}]: {e}") from None
    if pattern and len(set(pattern)) < 2:
        raise ConfigError(f"model.pattern = {pattern!r} names one mixer; a stack mixes two or more. For one "
                          f"mixer, set model.name = {pattern[0]!r} and leave model.pattern out")
    return pattern


def _stack_defaults(cfg: JobConfig, pattern: list[str],
                    given: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Check]]]:
    """Check the user's [model] keys of a stack, apply the model-wide plugin defaults, and return what each
    mixer's table declares (its blocks' MLP keys and its options, with their defaults) and the checks of
    those keys (the block keys' and the plugin's ``[valid]``).

    A plugin's MLP keys (:data:`BLOCK_KEYS`) apply to its own blocks. Its other [model] defaults apply to the
    whole model; two plugins of the stack that disagree on one are an error unless the user sets it.
    """
    for key, fix in (("name", "each block's mixer is in model.pattern"), ("mixer", "use [model.mixers.<name>]"),
                     *((k, f"set it per mixer, in [model.mixers.<name>] {k} = ...") for k in BLOCK_KEYS)):
        if key in given:
            raise ConfigError(f"model.{key} is for one mixer, and this config stacks model.pattern = {pattern}; "
                              f"{fix} (or remove model.pattern)")
    block = {f.name: f.default for f in dataclasses.fields(Model) if f.name in BLOCK_KEYS}
    checks = _block_key_checks()
    declared, rules, shared = {}, {}, {}
    for name in dict.fromkeys(pattern):
        model_defaults, mixer_defaults, option_rules = _plugin_defaults(name, "model.pattern")
        rules[name] = {**option_rules, **checks}
        origin = f"defaults file of mixer {name!r}"
        if clash := [k for k in BLOCK_KEYS if k in mixer_defaults]:
            raise ConfigError(f"{origin}: mixer option {clash[0]!r} has the name of a block key, so a stack "
                              f"cannot tell them apart in [model.mixers.{name}]; rename the option")
        own = {k: _coerce(f"{origin}: {k}", model_defaults.pop(k, v), *checks[k]) for k, v in block.items()}
        declared[name] = {**own, **mixer_defaults}
        for key, value in model_defaults.items():
            other, before = shared.setdefault(key, (name, value))
            if before != value and key not in given:
                raise ConfigError(f"the mixers of model.pattern disagree on model.{key}: {other!r} defaults it to "
                                  f"{before!r}, {name!r} to {value!r}; set model.{key} in the config")
    _apply(cfg, {"model": {key: value for key, (_, value) in shared.items()}}, "defaults files of model.pattern")
    return declared, rules


def _resolve_stack(cfg: JobConfig, declared: dict[str, dict[str, Any]], rules: dict[str, dict[str, Check]]) -> None:
    """Check the stack's pattern against n_layers and resolve each ``[model.mixers.<name>]`` table against
    ``declared`` and ``rules`` (:func:`_stack_defaults`)."""
    m = cfg.model
    if m.n_layers % len(m.pattern):
        k = len(m.pattern)
        near = " or ".join(str(n) for n in sorted({k * max(1, m.n_layers // k), k * -(-m.n_layers // k)}))
        raise ConfigError(f"model.n_layers = {m.n_layers} is not a multiple of the {k} blocks of model.pattern = "
                          f"{m.pattern}; use a multiple such as {near}, or a pattern that divides it")
    for name in m.mixers:
        if name not in declared:
            raise ConfigError(f"[model.mixers.{name}]: {name!r} is not in model.pattern = {m.pattern}; its tables "
                              f"are {', '.join(declared)}." + _suggest(name, list(declared)))
    m.mixers = {name: _merge_options(f"model.mixers.{name}", name, m.mixers.get(name, {}), options, rules[name])
                for name, options in declared.items()}
    m.name = "+".join(declared)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> JobConfig:
    """Build the job config from an optional TOML file and command-line overrides.

    Args:
        path: TOML config file, or None for the defaults.
        overrides: ``["--section.key", "value", ...]`` strings.

    Raises:
        ConfigError: on any unknown key, wrong type, bad choice or unknown mixer.
    """
    cfg = JobConfig()
    file_table = _load_toml(Path(path)) if path is not None else {}
    cli_table = _cli_table(overrides or [])
    # The mixers decide which plugin defaults apply, so settle them first.
    given = {**file_table.get("model", {}), **cli_table.get("model", {})}
    pattern = _check_pattern(given.get("pattern", []))
    if pattern:
        declared, rules = _stack_defaults(cfg, pattern, given)
    else:
        cfg.model.name = _coerce("model.name", given.get("name", cfg.model.name), str, None)
        model_defaults, mixer_defaults, option_rules = _plugin_defaults(cfg.model.name)
        _apply(cfg, {"model": model_defaults}, f"defaults file of mixer {cfg.model.name!r}")
    _apply(cfg, file_table, str(path))
    _apply(cfg, cli_table, "command line")
    if pattern:
        _resolve_stack(cfg, declared, rules)
    elif cfg.model.mixers:
        raise ConfigError(f"[model.mixers.{next(iter(cfg.model.mixers))}] is for hybrid stacks (model.pattern); "
                          f"the options of the one mixer {cfg.model.name!r} go in [model.mixer]")
    else:
        cfg.model.mixer = _merge_options("model.mixer", cfg.model.name, cfg.model.mixer, mixer_defaults, option_rules)
    return cfg


def to_toml(cfg: JobConfig) -> str:
    """Render a config as TOML (for ``--print-config``)."""

    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return repr(v)

    lines: list[str] = []
    for sec, values in cfg.to_dict().items():
        if sec == "model":  # a config names one mixer or a stack's; it writes only the keys of its kind
            unused = ("pattern", "mixers") if not cfg.model.pattern else ("name", "mixer", *BLOCK_KEYS)
            values = {k: v for k, v in values.items() if k not in unused}
        lines.append(f"[{sec}]")
        nested = {}
        for k, v in values.items():
            if isinstance(v, dict):
                nested[k] = v
            else:
                lines.append(f"{k} = {fmt(v)}")
        for k, table in nested.items():
            tables = table.items() if k == "mixers" else [(None, table)]
            for name, options in tables:
                lines.append(f"\n[{sec}.{k}{'' if name is None else '.' + name}]")
                lines.extend(f"{kk} = {fmt(vv)}" for kk, vv in options.items())
        lines.append("")
    return "\n".join(lines)


def help_text() -> str:
    """Every option with its type, default and documentation, by section."""
    out = []
    for sec_name, cls in _sections().items():
        out.append(f"[{sec_name}]")
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            choices, valid = f.metadata.get("choices"), f.metadata.get("valid")
            extra = f" {{{'|'.join(choices)}}}" if choices else f" ({valid})" if valid else ""
            out.append(f"  --{sec_name}.{f.name} {hints[f.name].__name__.upper()}{extra}  (default {default!r})")
            out.append(f"      {f.metadata['help']}")
    return "\n".join(out)


def _pop_config_file(argv: list[str]) -> str | None:
    """Remove the config file from ``argv`` and return it: a leading path or name, or ``--job.config_file``.

    ``--job.config_file PATH`` (or ``=PATH``) may stand anywhere among the overrides.
    """
    found = [i for i, a in enumerate(argv) if a == "--job.config_file" or a.startswith("--job.config_file=")]
    if argv and not argv[0].startswith("--"):
        found.insert(0, -1)
    if len(found) > 1:
        raise ConfigError("more than one config file given; pass one path or name, or one --job.config_file")
    if not found:
        return None
    i = found[0]
    if i == -1:
        return argv.pop(0)
    arg = argv.pop(i)
    if "=" in arg:
        return arg.split("=", 1)[1]
    if i >= len(argv) or argv[i].startswith("--"):
        raise ConfigError("--job.config_file needs a value: a TOML file or the name of a shipped config")
    return argv.pop(i)


USAGE = """usage: python -m longhorn_zoo.train [CONFIG] [--print-config] [--section.key VALUE ...]
       longhorn-zoo train [CONFIG] [--print-config] [--section.key VALUE ...]

Trains a causal LM whose sequence mixer comes from a plugin, in one process (run_train.sh or
torchrun for several). CONFIG is a TOML file or the name of a shipped config ({names}); it may
also be given anywhere as --job.config_file CONFIG. Boolean keys also take a bare flag:
--checkpoint.enable means true, --no-checkpoint.enable false. Precedence: command line > CONFIG >
the mixer plugin's defaults > the defaults below. Options, by TOML section:
"""


def parse_args(argv: list[str] | None = None) -> tuple[JobConfig, bool]:
    """Parse ``[CONFIG] [--print-config] [--section.key value ...]`` (see :data:`USAGE`).

    CONFIG is a path or a shipped config's name (:func:`longhorn_zoo.train_configs.resolve`).
    Returns the config and whether ``--print-config`` was given. ``--help`` prints every option
    and exits.
    """
    from longhorn_zoo import train_configs

    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(USAGE.format(names=", ".join(train_configs.names())))
        print(help_text())
        raise SystemExit(0)
    print_config = "--print-config" in argv
    argv = [a for a in argv if a != "--print-config"]
    arg = _pop_config_file(argv)
    try:
        path = None if arg is None else train_configs.resolve(arg)
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from None
    return load_config(path, argv), print_config
