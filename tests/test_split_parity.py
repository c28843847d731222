"""The output comparison behind a split's parity check (fastft.split.parity._diff): the
largest difference of two model outputs, infinite whenever they cannot be the same output
(another structure, shape, integer value, or NaN pattern)."""

from __future__ import annotations

import math

import pytest
import torch

from fastft.split.parity import _clone, _diff

T = torch.tensor


@pytest.mark.parametrize(
    "a, b, expected",
    [
        (T([1.0, 2.0]), T([1.0, 2.5]), 0.5),
        (T([1.0, 2.0]), T([1.0, 2.0, 3.0]), math.inf),  # another shape
        (T([1, 2]), T([1, 2]), 0.0),  # integers: equal or not, no tolerance
        (T([1, 2]), T([1, 3]), math.inf),
        (T([1.0, math.nan]), T([1.5, math.nan]), 0.5),  # NaN where the model has NaN
        (T([1.0, math.nan]), T([math.nan, 1.0]), math.inf),  # NaN elsewhere
        (T([math.nan]), T([math.nan]), 0.0),
        ({"logits": T([1.0]), "h": T([2.0])}, {"h": T([2.0]), "logits": T([1.25])}, 0.25),
        ({"logits": T([1.0])}, {"scores": T([1.0])}, math.inf),  # other keys
        ((T([1.0]), [T([2.0])]), (T([1.0]), [T([2.5])]), 0.5),
        ((T([1.0]),), (T([1.0]), T([1.0])), math.inf),  # another length
        ((), [], 0.0),
        ("cls", "cls", 0.0),  # plain values: equal or not
        (None, "cls", math.inf),
        (T([1.0]), "cls", math.inf),
    ],
)
def test_diff(a, b, expected):
    assert _diff(a, b) == expected
    assert _diff(b, a) == expected  # symmetric


def test_values_that_cannot_be_compared_differ():
    class Moody:
        def __eq__(self, other):
            raise RuntimeError("no comparing")

    assert _diff(Moody(), Moody()) == math.inf


def test_recorded_outputs_are_copies():
    x = {"h": T([1.0]), "parts": [T([2.0])], "pair": (T([3.0]),)}
    copied = _clone(x)
    x["h"].add_(1)
    x["parts"][0].add_(1)
    assert _diff(copied, {"h": T([1.0]), "parts": [T([2.0])], "pair": (T([3.0]),)}) == 0.0
    assert type(copied["pair"]) is tuple and type(copied["parts"]) is list
