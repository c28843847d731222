"""fastft.hashing on objects and module weights: a library singleton is keyed by its name,
an object with no readable state is opaque, meta weights are opaque when weights are hashed
apart, and masked parameters (trained after the cut) do not count."""

from __future__ import annotations

import re
import typing

import torch
from torch import nn

from fastft.hashing import ContentHasher, content_hash


def test_a_library_singleton_is_keyed_by_its_name():
    assert content_hash(typing.Any) == content_hash(typing.Any)
    assert content_hash(typing.Any)[0] != content_hash(typing.NoReturn)[0]
    assert content_hash(typing.Any)[1] == []


def test_an_object_with_no_readable_state_is_opaque():
    _, opaque = content_hash(re.match("a", "a"))
    assert len(opaque) == 1 and "re.Match with no readable state" in opaque[0]


def weights_apart(module, **kw) -> ContentHasher:
    return ContentHasher(weights="apart", **kw).update(module, "the frozen model")


def test_weights_hashed_apart_follow_the_content_and_the_layout_stays():
    torch.manual_seed(0)
    a = nn.Linear(3, 2)
    b = nn.Linear(3, 2)
    ha, hb = weights_apart(a), weights_apart(b)
    assert ha.hexdigest() == hb.hexdigest()  # names and shapes: the same
    assert ha.weights_hexdigest() != hb.weights_hexdigest()  # the values differ
    with torch.no_grad():
        b.weight.copy_(a.weight)
        b.bias.copy_(a.bias)
    assert weights_apart(b).weights_hexdigest() == ha.weights_hexdigest()


def test_meta_weights_are_opaque_when_hashed_apart():
    with torch.device("meta"):
        model = nn.Linear(3, 2)
    hasher = weights_apart(model)
    assert any("weight is a meta tensor" in o for o in hasher.opaque), hasher.opaque


def test_a_masked_parameter_does_not_count():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    head = model[1].weight
    before = weights_apart(model, mask_params=[head])
    with torch.no_grad():
        head.add_(1.0)  # trained after the cut
    after = weights_apart(model, mask_params=[head])
    assert (after.hexdigest(), after.weights_hexdigest()) == (
        before.hexdigest(),
        before.weights_hexdigest(),
    )
    with torch.no_grad():
        model[0].weight.add_(1.0)  # a frozen one: counts
    assert weights_apart(model, mask_params=[head]).weights_hexdigest() != after.weights_hexdigest()
