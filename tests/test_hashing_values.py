"""fastft.hashing by value, kind by kind: equal content gives the same digest, a change in
what the kind holds gives another, and what cannot be read is reported as opaque.

A cache key is only as sound as these: a value kind hashed by identity would miss a change
(a stale cache served), one hashed by its address would never reuse a cache.
"""

from __future__ import annotations

import enum
import functools
import re
import sys
import types
import weakref
from collections import defaultdict, namedtuple

import numpy as np
import pytest
import torch
from torch import nn

from fastft.hashing import ContentHasher, content_hash, first_difference
from fastft.hashing.content import _MAX_DEPTH

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*quantized tensor creation functions:UserWarning",
    "ignore:Sparse:UserWarning",
    "ignore:the matrix subclass:PendingDeprecationWarning",
)


def digest(obj) -> str:
    hexdigest, opaque = content_hash(obj)
    assert opaque == [], opaque
    return hexdigest


def opaque(obj) -> list[str]:
    return content_hash(obj)[1]


class Color(enum.Enum):
    RED = 1
    BLUE = 2


Point = namedtuple("Point", "x y")
Pair = namedtuple("Pair", "x y")


class Holder:
    @staticmethod
    def double(x):
        return 2 * x

    @staticmethod
    def triple(x):
        return 3 * x

    @property
    def size(self):
        return 1

    @property
    def length(self):
        return 2


def sparse(values):
    return torch.sparse_coo_tensor(torch.tensor([[0, 2, 0], [1, 0, 1]]), values, (3, 3))


def quantized_per_channel(scale0: float):
    x = torch.tensor([[0.5, -1.0], [2.0, 0.25]])
    scales = torch.tensor([scale0, 0.02], dtype=torch.float64)
    return torch.quantize_per_channel(x, scales, torch.zeros(2, dtype=torch.long), 0, torch.qint8)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def masked(mask):
    return np.ma.masked_array([1.0, 2.0, 3.0], mask=mask)


# (same content built twice, and a change of what the kind holds)
KINDS = {
    "sparse": (lambda: sparse(torch.tensor([1.0, 2.0, 3.0])), lambda: sparse(torch.ones(3))),
    "quantized per tensor": (
        lambda: torch.quantize_per_tensor(torch.tensor([0.5, 1.0]), 0.1, 0, torch.qint8),
        lambda: torch.quantize_per_tensor(torch.tensor([0.5, 1.0]), 0.2, 0, torch.qint8),
    ),
    "quantized per channel": (
        lambda: quantized_per_channel(0.01),
        lambda: quantized_per_channel(0.03),
    ),
    "masked array": (lambda: masked([0, 1, 0]), lambda: masked([0, 0, 1])),
    "object array": (
        lambda: np.array([1, "a"], dtype=object),
        lambda: np.array([1, "b"], dtype=object),
    ),
    "structured array": (
        lambda: np.zeros(2, dtype=[("a", "f4"), ("b", "i4")]),
        lambda: np.zeros(2, dtype=[("a", "f4"), ("c", "i4")]),
    ),
    "long plain list": (lambda: list(range(20)), lambda: list(range(19)) + [99]),
    "long plain dict": (
        lambda: {f"w{i}": i for i in range(20)},
        lambda: {**{f"w{i}": i for i in range(20)}, "w7": -1},
    ),
    "defaultdict": (lambda: defaultdict(list, a=[1]), lambda: defaultdict(set, a=[1])),
    "namedtuple": (lambda: Point(1, 2), lambda: Pair(1, 2)),
    "staticmethod": (
        lambda: Holder.__dict__["double"],
        lambda: Holder.__dict__["triple"],
    ),
    "property": (lambda: Holder.__dict__["size"], lambda: Holder.__dict__["length"]),
    "enum": (lambda: Color.RED, lambda: Color.BLUE),
    "op": (lambda: torch.ops.aten.add.Tensor, lambda: torch.ops.aten.mul.Tensor),
    "finfo": (lambda: torch.finfo(torch.float32), lambda: torch.finfo(torch.float16)),
    "regex": (lambda: re.compile("a+"), lambda: re.compile("a+", re.IGNORECASE)),
    "generator": (lambda: generator(1), lambda: generator(2)),
    "lru_cache": (
        lambda: functools.lru_cache(maxsize=4)(abs),
        lambda: functools.lru_cache(maxsize=8)(abs),
    ),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_a_kind_is_hashed_by_what_it_holds(kind):
    make, changed = KINDS[kind]
    assert digest(make()) == digest(make())
    assert digest(changed()) != digest(make())


def test_a_sparse_tensor_is_hashed_as_its_coalesced_value():
    indices = torch.tensor([[0, 0, 2], [1, 1, 0]])  # (0, 1) twice: 1 + 2 once coalesced
    twice = torch.sparse_coo_tensor(indices, torch.tensor([1.0, 2.0, 4.0]), (3, 3))
    once = torch.sparse_coo_tensor(torch.tensor([[0, 2], [1, 0]]), torch.tensor([3.0, 4.0]), (3, 3))
    assert digest(twice) == digest(once)


def test_a_parameter_is_hashed_like_the_tensor_it_holds():
    x = torch.arange(6.0).reshape(2, 3)
    assert digest(nn.Parameter(x.clone())) == digest(x)


def test_a_mapping_proxy_is_hashed_like_its_dict():
    d = {"a": 1, "b": [2, 3]}
    assert digest(types.MappingProxyType(d)) == digest(dict(d))


def test_sets_do_not_depend_on_insertion_order():
    assert digest({3, 1, 2}) == digest({1, 2, 3})
    assert digest(frozenset("abc")) != digest(frozenset("abd"))


def test_a_matrix_is_not_its_plain_array():
    a = np.arange(4.0).reshape(2, 2)
    assert digest(np.asmatrix(a)) != digest(a)


def test_a_str_subclass_is_hashed_by_its_value_not_its_str_method():
    class Loud(str):
        def __str__(self):
            return "always the same"

    assert digest(Loud("a")) != digest(Loud("b"))
    assert digest(Loud("a")) != digest("a")  # its class counts too


def test_a_weak_reference_is_hashed_by_its_referent():
    a, b = torch.ones(2), torch.zeros(2)
    assert digest(weakref.ref(a)) == digest(weakref.ref(a.clone()))
    assert digest(weakref.ref(a)) != digest(weakref.ref(b))


def test_standard_streams_are_seen_by_name():
    assert digest(sys.stdout) == digest(sys.stdout)


@pytest.mark.parametrize(
    "make, why",
    [
        (lambda: torch.empty(3, device="meta"), "a meta tensor"),
        (lambda: torch.eye(3).to_sparse_csr(), "layout torch.sparse_csr"),
        (lambda: (i for i in range(3)), "generator, whose content cannot be read"),
        (lambda: memoryview(b"abc"), "memoryview, whose content cannot be read"),
    ],
    ids=["meta", "csr", "generator", "memoryview"],
)
def test_what_cannot_be_read_is_opaque(make, why):
    found = opaque(make())
    assert len(found) == 1 and why in found[0], found


def test_nesting_beyond_the_limit_is_opaque_not_a_crash():
    deep: list = []
    for _ in range(_MAX_DEPTH + 5):
        deep = [deep]
    found = opaque(deep)
    assert found and f"nested more than {_MAX_DEPTH} levels deep" in found[0]


def test_an_object_that_fails_when_read_is_opaque():
    class Broken:
        __slots__ = ()

        def __reduce_ex__(self, protocol):
            raise RuntimeError("unreadable")

        def __getstate__(self):
            raise RuntimeError("unreadable")

    found = opaque(Broken())
    assert found and "cannot be read (RuntimeError: unreadable)" in found[0], found


def test_hasher_options_are_checked():
    with pytest.raises(ValueError, match="weights must be"):
        ContentHasher(weights="all")
    with pytest.raises(ValueError, match="weights='apart'"):
        ContentHasher().weights_hexdigest()


def test_first_difference_of_traces():
    a = [("layer.weight", b"1"), ("layer.bias", b"2")]
    assert first_difference(a, list(a)) is None
    assert first_difference(a, [("layer.weight", b"1"), ("layer.bias", b"3")]) == "layer.bias"
    assert first_difference(a, a[:1]) == "layer.bias"  # one trace stops early
    assert first_difference(a[:1], a) == "layer.bias"
