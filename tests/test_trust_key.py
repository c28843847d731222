"""Trust: a cache is reused only when its features equal what the frozen part computes now.

Each scenario builds a cache, changes one thing that determines the features, builds again
and checks that the cache was rebuilt *and* holds exactly ``prefix(transform(X))`` as they
are now; then builds a third time and checks that nothing unchanged is rebuilt. Here, what
Python code reads: an argument of a partial, a default, the code, a closure, a global, a
user module or package, a function called, a transform module's weights or mode, methods
forward reaches without naming them; and the key of such a build is the same in another
process. The frozen modules and the library code they run: test_trust_key_model. What the
key cannot see, and what must be reused: test_trust_key_reuse.
"""

from __future__ import annotations

import functools
import subprocess
import sys
import textwrap
import types
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from fastft.cache import FeatureCache

from helpers.caches import Scenario, assert_change_is_seen
from helpers.data import labelled
from helpers.models import ScaledLinear, frozen_mlp

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.usefixtures("fresh_registry")


# ------------------------------------------------------------------------- what the transforms read
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


@functools.cache
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


# ---------------------------------------------------------------------------- scenarios
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


SCENARIOS: dict[str, Callable[[], Scenario]] = {
    "partial arguments": lambda: Scenario(
        frozen_mlp(),
        lambda s: {"transform": functools.partial(shift, by=1.0)},
        {"transform": functools.partial(shift, by=0.5)},
    ),
    "default argument": lambda: Scenario(
        frozen_mlp(),
        lambda s: setattr(shift, "__defaults__", (0.75,)),
        {"transform": shift},
        undo=lambda: setattr(shift, "__defaults__", (0.5,)),
    ),
    "transform module weights": lambda: Scenario(
        frozen_mlp(),
        lambda s: s.kwargs["transform"].weight.data.mul_(2),
        {"transform": nn.Linear(6, 6).requires_grad_(False)},
    ),
    "transform module hyper-parameter": lambda: Scenario(
        frozen_mlp(),
        lambda s: setattr(s.kwargs["transform"], "p", 0.5),
        {"transform": nn.Dropout(0.0).eval()},
    ),
    "global read by the transform": _module_global,
    "user module attribute read by the transform": _module_attribute,
    "function called by the transform": _redefined_helper,
    "closure cell": _closure,
    "tensor in a closure, changed in place": _tensor_in_closure,
    "code of the transform": _code_of_a_transform,
    "callable object's state": lambda: Scenario(
        frozen_mlp(), lambda s: setattr(s.kwargs["transform"], "a", 3.0), {"transform": Affine(2.0)}
    ),
    "bound method's object": lambda: Scenario(
        frozen_mlp(),
        lambda s: setattr(s.kwargs["transform"].__self__, "a", 3.0),
        {"transform": Affine(2.0).__call__},
    ),
    "user package's submodule attribute (pkg.sub.MEAN)": _package_attribute,
    "user module held as an attribute": _module_as_attribute,
    "function wrapped to look like torch's (functools.wraps)": _wraps_library,
    "lru_cache helper redefined": _lru_cache_helper,
    "transform module switched to train mode": lambda: Scenario(
        frozen_mlp(), lambda s: s.kwargs["transform"].train(), {"transform": ModeScale().eval()}
    ),
    "method a @torch.no_grad() forward calls": lambda: _offset_scenario(DecoratedForward()),
    "a child's method other than forward": lambda: _offset_scenario(CallsChildMethod()),
    "user module imported inside forward": lambda: _settings_scenario(ImportsInForward()),
    "user module passed to a helper": lambda: _settings_scenario(
        frozen_mlp(), {"transform": passes_the_module_on}
    ),
    "seed of a random transform": lambda: Scenario(
        frozen_mlp(),
        lambda s: {**s.kwargs, "seed": 1},
        {"transform": lambda x: x + torch.randn_like(x)},
        random=True,
    ),
    "batch size a transform is applied to": lambda: Scenario(
        frozen_mlp(),
        lambda s: {**s.kwargs, "batch_size": 12},
        {"transform": lambda x: x - x.mean(0)},
    ),
}


@pytest.mark.parametrize("what", list(SCENARIOS))
@pytest.mark.reliability(
    "a change of what Python code reads (partials, defaults, code, closures, globals, user "
    "modules and packages a transform or forward reads, functions it calls, wraps and "
    "lru_cache wrappers, methods forward reaches, transform modules and their mode, seeds)",
    "the cache is rebuilt and holds prefix(transform(X)) as they are now; built again "
    "unchanged, it is reused",
)
def test_every_change_is_seen_and_nothing_else_rebuilds(tmp_path, what):
    assert_change_is_seen(SCENARIOS[what](), tmp_path)


# ----------------------------------------------------------------------- the key in another process
KEY_SCRIPT = textwrap.dedent("""
    import sys, torch
    from torch import nn
    sys.path.insert(0, {tests!r})
    from helpers.data import labelled
    from helpers.models import ScaledLinear
    from test_trust_key import times_scale
    from fastft.cache import FeatureCache, registry
    torch.manual_seed(0)
    prefix = ScaledLinear()
    cache = FeatureCache.build(prefix, labelled(24), dtype="fp32", tier="disk",
                               transform=times_scale, batch_size=8,
                               cache_dir={cache_dir!r}, progress=False)
    print(cache.fingerprint)
""")


def test_the_key_is_the_same_in_another_process(tmp_path):
    """Hashes by value hold no addresses, file names or set orders: a cache built by another
    process (with another PYTHONHASHSEED) is found again."""
    script = KEY_SCRIPT.format(tests=str(ROOT / "tests"), cache_dir=str(tmp_path))
    prints = [
        subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            timeout=120,
            env={"PYTHONPATH": str(ROOT), "PYTHONHASHSEED": seed, "PATH": ""},
        )
        for seed in ("1", "2")
    ]
    assert all(p.returncode == 0 for p in prints), prints[0].stderr + prints[1].stderr
    assert prints[0].stdout == prints[1].stdout
    torch.manual_seed(0)
    here = FeatureCache.build(
        ScaledLinear(),
        labelled(24),
        dtype="fp32",
        tier="disk",
        transform=times_scale,
        batch_size=8,
        cache_dir=tmp_path,
        progress=False,
    )
    assert here.fingerprint == prints[0].stdout.strip() and here.telemetry["hit"] is True
