"""The conformance suite catches broken mixers, names the mixer and the property, and passes a correct one.

The mixers live in a throwaway distribution ``lz-broken-mixers`` (a ``*.dist-info``
folder with ``entry_points.txt`` on sys.path), one entry point per mixer. Each is
the correct mixer ``good`` (an exponential moving average) with one fault.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from longhorn_zoo.conformance import Conformance, ConformanceError, checks
from longhorn_zoo.conformance.distributed import distributed_problems
from longhorn_zoo.conformance.documents import check_documents
from longhorn_zoo.registry import get_registry

BASE = '''
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from longhorn_zoo.hookspecs import MixerSpec
from longhorn_zoo.ops import define_scan_op

DEFAULTS = Path(__file__).with_name("defaults.toml")


class Good(nn.Module):
    """h_t = decay h_{t-1} + W_in x_t,  y_t = W_out h_t."""

    decay = 0.5

    def __init__(self, args):
        super().__init__()
        self.w_in = nn.Linear(args.dim, args.dim, bias=False)
        self.w_out = nn.Linear(args.dim, args.dim, bias=False)

    def scan(self, u, h, reset=None):
        outs = []
        for t, u_t in enumerate(u.unbind(1)):
            if reset is not None:
                h = h.masked_fill(reset[:, t, None], 0.0)
            h = self.decay * h + u_t
            outs.append(h)
        return torch.stack(outs, 1), h

    def forward(self, x, state=None, *, return_state=False, reset=None):
        u = self.w_in(x)
        hs, h = self.scan(u, u.new_zeros(u[:, 0].shape) if state is None else state, reset)
        y = self.w_out(hs)
        return (y, h) if return_state else y

    def step(self, x, state):
        u = self.w_in(x)
        h = self.decay * (u.new_zeros(u.shape) if state is None else state) + u
        return self.w_out(h), h

    def init_weights(self):
        nn.init.trunc_normal_(self.w_in.weight, std=0.5)
        nn.init.trunc_normal_(self.w_out.weight, std=0.5)


def spec(name, build, ops=()):
    return [MixerSpec(name=name, build=build, defaults=DEFAULTS, ops=ops)]
'''

# entry point name -> body of its plugin module (after `from lz_broken_base import *`)
MIXERS = {
    "good": "",
    "peeker": '''
class Mixer(Good):
    def forward(self, x, state=None, *, return_state=False):
        return super().forward(x + F.pad(x[:, 1:], (0, 0, 0, 1)), state, return_state=return_state)
''',
    "bad_step": '''
class Mixer(Good):
    def step(self, x, state):
        u = self.w_in(x)
        h = 0.6 * (u.new_zeros(u.shape) if state is None else state) + u
        return self.w_out(h), h
''',
    "leaks_documents": '''
class Mixer(Good):
    def forward(self, x, state=None, *, return_state=False, reset=None):
        return super().forward(x, state, return_state=return_state)
''',
    "no_reset": '''
class Mixer(Good):
    def forward(self, x, state=None, *, return_state=False):
        return super().forward(x, state, return_state=return_state)
''',
    "bad_split": '''
class Mixer(Good):
    def forward(self, x, state=None, *, return_state=False):
        return super().forward(x, None, return_state=return_state)
''',
    "no_init": '''
class Mixer(Good):
    def init_weights(self):
        nn.init.trunc_normal_(self.w_in.weight, std=0.5)
''',
    "meta_alloc": '''
class Mixer(Good):
    def __init__(self, args):
        super().__init__(args)
        self.register_buffer("scale", torch.ones(args.dim, device="cpu"))
''',
    "wrong_dtype": '''
class Mixer(Good):
    def forward(self, x, state=None, *, return_state=False):
        out = super().forward(x, state, return_state=return_state)
        return (out[0].float(), out[1]) if return_state else out.float()
''',
    "nan_grad": '''
class Mixer(Good):
    def forward(self, x, state=None, *, return_state=False):
        y, h = super().forward(x, state, return_state=True)
        y = y + torch.sqrt(torch.relu(y) * 0)
        return (y, h) if return_state else y
''',
    "graph_break": '''
class Mixer(Good):
    def forward(self, x, state=None, *, return_state=False):
        torch._dynamo.graph_break()
        return super().forward(x, state, return_state=return_state)
''',
    "unsaved_buffer": '''
class Mixer(Good):
    def __init__(self, args):
        super().__init__(args)
        self.register_buffer("scale", torch.empty(args.dim), persistent=False)

    def forward(self, x, state=None, *, return_state=False):
        return super().forward(x * self.scale, state, return_state=return_state)

    def step(self, x, state):
        return super().step(x * self.scale, state)

    def init_weights(self):
        super().init_weights()
        nn.init.uniform_(self.scale, 0.5, 1.5)
''',
    "rank_dependent": '''
import torch.distributed as dist

class Mixer(Good):
    def forward(self, x, state=None, *, return_state=False):
        if dist.is_initialized():
            x = x * (1 + dist.get_rank())
        return super().forward(x, state, return_state=return_state)
''',
    "bad_fake_op": '''
def ema(u: torch.Tensor) -> tuple[torch.Tensor]:
    return (torch.cumsum(u, dim=1),)

def ema_fake(u):
    return (u.new_empty(u.shape[0], u.shape[1] + 1, u.shape[2]),)

def examples(dtype, gen):
    return [(torch.randn(1, 3, 2, dtype=dtype, generator=gen),)]

OP = define_scan_op("lz_broken::bad_fake", ema, ema_fake, example_inputs=examples)
Mixer = Good
OPS = (OP,)
''',
    "ignores_reset": '''
def cumsum(u: torch.Tensor, initial_state: torch.Tensor | None,
           reset: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.cumsum(u, dim=1) + (0 if initial_state is None else initial_state.unsqueeze(1))
    return y, y[:, -1].clone()

def fake(u, initial_state, reset):
    return u.new_empty(u.shape), u.new_empty(u.shape[0], u.shape[2])

def examples(dtype, gen):
    return [(torch.randn(1, 4, 2, dtype=dtype, generator=gen), torch.randn(1, 2, dtype=dtype, generator=gen), None)]

OP = define_scan_op("lz_broken::ignores_reset", cumsum, fake, example_inputs=examples)
Mixer = Good
OPS = (OP,)
''',
    "bad_backward": '''
from longhorn_zoo.ops import Backend

def double(u: torch.Tensor) -> tuple[torch.Tensor]:
    return (2 * u,)

def examples(dtype, gen):
    return [(torch.randn(1, 3, 2, dtype=dtype, generator=gen),)]

OP = define_scan_op("lz_broken::bad_backward", double, lambda u: (u.new_empty(u.shape),), example_inputs=examples)
OP.register_backend(Backend("wrong", "cpu", lambda: True, forward=double, backward=lambda inputs, out, grads: grads))
Mixer = Good
OPS = (OP,)
''',
    "bad_fake_dtype": '''
def ema(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.cumsum(u, dim=1)
    return y, y[:, -1].clone()

def ema_fake(u):  # declares a float32 final state; the reference returns the input's dtype
    state_dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
    return u.new_empty(u.shape), u.new_empty(u.shape[0], u.shape[2], dtype=state_dtype)

def examples(dtype, gen):
    return [(torch.randn(1, 3, 2, dtype=dtype, generator=gen),)]

OP = define_scan_op("lz_broken::bad_fake_dtype", ema, ema_fake, example_inputs=examples)
Mixer = Good
OPS = (OP,)
''',
    "unlisted_op": '''
def double(u: torch.Tensor) -> tuple[torch.Tensor]:
    return (2 * u,)

OP = define_scan_op("lz_broken::unlisted", double, lambda u: (u.new_empty(u.shape),))

class Mixer(Good):
    def forward(self, x, state=None, *, return_state=False):
        return super().forward(OP(x)[0] / 2, state, return_state=return_state)
''',
    "crashes": '''
class Mixer(Good):
    def forward(self, x, state=None, *, return_state=False):
        return x @ torch.ones(3, 3)
''',
    "no_examples": '''
def ema(u: torch.Tensor) -> tuple[torch.Tensor]:
    return (torch.cumsum(u, dim=1),)

OP = define_scan_op("lz_broken::no_examples", ema, lambda u: (torch.empty_like(u),))
Mixer = Good
OPS = (OP,)
''',
}

HOOK = '''
from longhorn_zoo.hookspecs import hookimpl

@hookimpl
def longhorn_zoo_mixers():
    return spec({name!r}, globals().get("Mixer", Good), globals().get("OPS", ()))
'''


@pytest.fixture(scope="module")
def broken_plugins(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Install ``lz-broken-mixers`` on sys.path for this module and make the registry see it."""
    root = tmp_path_factory.mktemp("broken_plugins")
    (root / "lz_broken_base.py").write_text(BASE)
    (root / "defaults.toml").write_text("mlp = false\n[mixer]\n")
    info = root / "lz_broken_mixers-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lz-broken-mixers\nVersion: 0.1\n")
    lines = ["[longhorn_zoo.mixers]"]
    for name, body in MIXERS.items():
        source = "from lz_broken_base import *\n" + textwrap.dedent(body) + HOOK.format(name=name)
        (root / f"lz_broken_{name}.py").write_text(source)
        lines.append(f"{name} = lz_broken_{name}")
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    sys.path.insert(0, str(root))
    get_registry.cache_clear()
    yield root
    sys.path.remove(str(root))
    for mod in [m for m in sys.modules if m.startswith("lz_broken")]:
        del sys.modules[mod]
    get_registry.cache_clear()


CHECKS = ["contract", "shapes", "causality", "step", "state_split", "gradients", "ops", "resets", "documents",
          "checkpoint", "compile"]


def run_check(name: str, prop: str) -> None:
    check = check_documents if prop == "documents" else getattr(checks, f"check_{prop}")
    check(Conformance(name))


def test_a_correct_mixer_passes_every_check(broken_plugins: Path) -> None:
    assert not get_registry().errors
    for prop in CHECKS:
        run_check("good", prop)


BROKEN = [
    ("peeker", "causality", r"output at position 0 changed when only inputs after position 0 changed"),
    ("bad_step", "step", r"step\(\) from state None disagrees with forward\(\)"),
    ("bad_split", "state_split", r"splitting the sequence after 1 tokens and passing the state changes"),
    ("no_init", "contract", r"leaves \['layers.0.mixer.w_out.weight', .*uninitialised \(NaN\)"),
    ("meta_alloc", "contract", r"allocates real tensors under torch.device\('meta'\): \['layers.0.mixer.scale'"),
    ("wrong_dtype", "shapes", r"forward maps \(2, 24, 64\) torch.bfloat16 to \(2, 24, 64\) torch.float32"),
    ("nan_grad", "gradients", r"non-finite gradients in \[.*'layers.0.mixer.w_in.weight'"),
    ("graph_break", "compile", r"raised .*graph_break"),
    ("unsaved_buffer", "checkpoint", r"output after save and load differs.*non-persistent buffers.*scale"),
    ("bad_fake_op", "ops", r"lz_broken::bad_fake: torch.library.opcheck on example 0 raised"),
    ("no_examples", "ops", r"op lz_broken::no_examples has no example inputs"),
    ("bad_backward", "ops", r"lz_broken::bad_backward: gradcheck on example 0 raised GradcheckError"),
    ("ignores_reset", "resets", r"lz_broken::ignores_reset: output 0 after a reset at token 2 differs from a fresh"),
    ("leaks_documents", "documents", r"row 0: the outputs from a document start at token 8 change when only earlier"),
    ("no_reset", "documents", r"forward\(x, reset=...\); forward must take reset=None.* raised TypeError"),
    ("bad_fake_dtype", "ops", r"lz_broken::bad_fake_dtype: opcheck on example 0 in torch.bfloat16 \(the fake's "
                              r"output dtypes must match the reference's\) raised"),
    ("unlisted_op", "ops", r"forward calls the scan ops \['lz_broken::unlisted'\], which MixerSpec.ops does not"),
    ("crashes", "checkpoint", r"the LM's forward before saving raised RuntimeError"),
    ("crashes", "compile", r"the eager block's forward and backward \(the reference\) raised RuntimeError"),
]


@pytest.mark.parametrize(("mixer", "prop", "detail"), BROKEN, ids=[f"{case[0]}-{case[1]}" for case in BROKEN])
def test_broken_mixer_is_caught_with_its_name_and_property(broken_plugins: Path, mixer: str, prop: str,
                                                           detail: str) -> None:
    with pytest.raises(ConformanceError, match=rf"^mixer '{mixer}' breaks {prop}: .*{detail}") as info:
        run_check(mixer, prop)
    assert (info.value.mixer, info.value.property) == (mixer, prop)


@pytest.mark.slow
def test_distributed_check_catches_a_rank_dependent_mixer_and_passes_a_correct_one(broken_plugins: Path) -> None:
    good, bad = distributed_problems([Conformance("good"), Conformance("rank_dependent")])
    assert good is None
    assert bad is not None and "on 2 ranks" in bad and "1 rank" in bad


def test_pytest_mixer_option_runs_the_suite_and_reports_mixer_and_property(broken_plugins: Path,
                                                                           tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(broken_plugins), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-m", "pytest", "--mixer", "peeker", "-k", "causality or contract",
                          "-p", "no:cacheprovider", "-q"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "1 failed, 1 passed" in out.stdout
    assert "mixer 'peeker' breaks causality: output at position 0 changed" in out.stdout


def test_the_docs_give_the_sizes_the_suite_runs_at() -> None:
    from longhorn_zoo.conformance import MixerConformance

    docs = (Path(__file__).resolve().parents[1] / "docs" / "plugins.md").read_text()
    harness = Conformance("any")
    for attr in ("dim", "n_layers", "seq_len"):
        assert getattr(harness, attr) == getattr(MixerConformance, attr)
        assert f"`{attr}` ({getattr(MixerConformance, attr)})" in docs, attr
