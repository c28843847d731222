"""Trust, the frozen modules and the library code they run: a change of a frozen module's
plain attributes, tensors, hyper-parameters, weights, buffers, hooks or class, of a library
function or method it calls (also swapped in a registry), of matmul precision or of a
TorchScript attribute is seen: the cache is rebuilt and holds exactly what the prefix
computes now. The rebuild says what changed; a FineTuner fitted again sees it too.
(Scenarios of what Python code reads: test_trust_key.)
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import torch
from torch import nn

from fastft import FineTuner
from fastft.cache.fingerprint import PART_NAMES

from helpers.caches import Scenario, assert_change_is_seen, assert_holds, build_host
from helpers.data import labelled
from helpers.models import ScaledLinear, frozen_mlp

pytestmark = pytest.mark.usefixtures("fresh_registry")


# ---------------------------------------------------------------------------- scenarios
def _with_buffer():
    class Shifted(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 5)
            self.register_buffer("shift", torch.zeros(5), persistent=False)

        def forward(self, x):
            return self.lin(x) + self.shift

    return Shifted()


def _patchable():
    class Patched(nn.Module):  # a class of its own per scenario: patching it touches nothing else
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 5)

        def forward(self, x):
            return self.lin(x)

    return Patched()


def _library_method_patched():
    original = nn.LeakyReLU.forward

    def undo():
        nn.LeakyReLU.forward = original

    return Scenario(
        frozen_mlp(), lambda s: setattr(nn.LeakyReLU, "forward", lambda self, x: x * 3), undo=undo
    )


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
        handles.append(
            nn.modules.module.register_module_forward_hook(
                lambda m, i, o: o + 1 if isinstance(m, nn.LeakyReLU) else o
            )
        )

    return Scenario(frozen_mlp(), change, undo=lambda: [h.remove() for h in handles])


def _matmul_precision():
    before = torch.get_float32_matmul_precision()
    return Scenario(
        frozen_mlp(),
        lambda s: torch.set_float32_matmul_precision("medium"),
        undo=lambda: torch.set_float32_matmul_precision(before),
    )


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
        nn.functional.softmax = lambda x, dim=None, _stacklevel=3, dtype=None: original(
            x * 2, dim=dim
        )

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


SCENARIOS: dict[str, Callable[[], Scenario]] = {
    "frozen module's plain attribute": lambda: Scenario(
        ScaledLinear(), lambda s: setattr(s.prefix, "factor", 3.0)
    ),
    "frozen module's plain tensor": lambda: Scenario(
        ScaledLinear(), lambda s: s.prefix.offset.add_(1.0)
    ),
    "frozen module's nested config": lambda: Scenario(
        ScaledLinear(), lambda s: s.prefix.config.update(clip=0.5)
    ),
    "frozen hyper-parameter": lambda: Scenario(
        frozen_mlp(), lambda s: setattr(s.prefix[1], "negative_slope", 0.3)
    ),
    "frozen weight through .data": lambda: Scenario(
        frozen_mlp(), lambda s: s.prefix[0].weight.data[0, 0].add_(1e-3)
    ),
    "non-persistent buffer": lambda: Scenario(_with_buffer(), lambda s: s.prefix.shift.add_(1.0)),
    "forward hook added": lambda: Scenario(
        frozen_mlp(), lambda s: s.prefix[0].register_forward_hook(lambda m, i, o: o * 2)
    ),
    "method of the module's class patched": lambda: Scenario(
        _patchable(),
        lambda s: setattr(type(s.prefix), "forward", lambda self, x: self.lin(x) - 1.0),
    ),
    "module replaced by a twin of other weights": lambda: Scenario(
        frozen_mlp(), lambda s: s.prefix.__setitem__(0, nn.Linear(6, 8))
    ),
    "library class's method patched": _library_method_patched,
    "library function replaced (F.leaky_relu)": _library_function_replaced,
    "global module hook": _global_module_hook,
    "float32 matmul precision": _matmul_precision,
    "library function swapped for a partial": lambda: _library_function_swapped(
        functools.partial(lambda x, negative_slope=0.01, inplace=False: x * 3)
    ),
    "library function swapped for another library function": lambda: _library_function_swapped(
        nn.functional.elu
    ),
    "library function swapped for a callable object": lambda: _library_function_swapped(Doubler()),
    "library function replaced two calls down (F.softmax in attention)": (
        _softmax_replaced_two_calls_down
    ),
    "TorchScript attribute": _scripted,
    "elements of a set subclass": lambda: Scenario(HoldsASet(), lambda s: s.prefix.masked.add(1)),
}


@pytest.mark.parametrize("what", list(SCENARIOS))
@pytest.mark.reliability(
    "a change in the frozen modules or the library code they run (frozen attributes, plain "
    "tensors, hyper-parameters, weights, buffers, hooks (global ones too), patched methods "
    "and library functions, matmul precision, TorchScript attributes)",
    "the cache is rebuilt and holds prefix(transform(X)) as they are now; built again "
    "unchanged, it is reused",
)
def test_every_change_is_seen_and_nothing_else_rebuilds(tmp_path, what):
    assert_change_is_seen(SCENARIOS[what](), tmp_path)


def test_the_reason_names_what_changed(tmp_path):
    X, y = labelled(24)
    prefix = ScaledLinear()
    build_host(prefix, (X, y), tmp_path)
    prefix.factor = 5.0
    assert (
        build_host(prefix, (X, y), tmp_path).telemetry["reason"]
        == f"rebuilt: {PART_NAMES['modules']} changed"
    )
    with torch.no_grad():
        prefix.lin.weight.add_(1)
    assert (
        build_host(prefix, (X, y), tmp_path).telemetry["reason"]
        == f"rebuilt: {PART_NAMES['weights']} changed"
    )
    assert (
        build_host(prefix, (X * 2, y), tmp_path).telemetry["reason"]
        == f"rebuilt: {PART_NAMES['dataset']} changed"
    )


# ----------------------------------------------------------------- the same FineTuner, fitted again
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


@pytest.mark.parametrize(
    "change", ["hyper-parameter", "attribute traced into the graph", "module replaced"]
)
@pytest.mark.reliability(
    "the same FineTuner fitted again after a frozen hyper-parameter changed, a frozen "
    "attribute that torch.fx baked into its graph changed, or a frozen module was replaced",
    "split again and the cache rebuilt: the features are those of the model as it is now",
)
def test_a_second_fit_sees_what_changed_in_the_frozen_part(tmp_path, change):
    X, y = labelled(24)
    model = BakedScale()
    ft = FineTuner(
        model,
        num_classes=3,
        cache="host",
        cache_dtype="fp32",
        cache_dir=str(tmp_path),
        verbose=False,
    )
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


# ---------------------------------------------------------------------------- a library's registry
class FirstToken(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(input_ids=ids).last_hidden_state[:, 0]


@pytest.mark.reliability(
    "transformers: another attention function registered under the name the model uses "
    "(AttentionInterface.register('sdpa', fn), as kernel-patching libraries do)",
    "the cache is rebuilt with the new function's features",
)
def test_a_function_registered_in_a_library_registry_is_seen(tmp_path):
    transformers = pytest.importorskip("transformers")
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    bert = transformers.BertModel(
        transformers.BertConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=37,
            vocab_size=100,
            attn_implementation="sdpa",
        )
    )
    prefix = FirstToken(bert)
    X, y = (
        torch.randint(1, 100, (16, 10), generator=torch.Generator().manual_seed(0)),
        torch.zeros(16).long(),
    )
    build_host(prefix, (X, y), tmp_path)

    def halved(module, query, key, value, attention_mask, **kw):
        out, weights = sdpa_attention_forward(module, query, key, value, attention_mask, **kw)
        return out * 0.5, weights

    transformers.AttentionInterface.register("sdpa", halved)
    try:
        rebuilt = build_host(prefix, (X, y), tmp_path)
        assert rebuilt.telemetry["hit"] is False
        assert_holds(rebuilt, prefix, X)
    finally:
        transformers.AttentionInterface.register("sdpa", sdpa_attention_forward)
