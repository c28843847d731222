"""fastft.cache.fingerprint on its own: each part of a key follows what it covers, bad
arguments are refused, and the advice of an opaque key names the remedy for what it missed."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
from torch import nn

from fastft.cache import fingerprint as fp
from fastft.data.sources import as_source
from fastft.errors import CacheReuseWarning, FastFTValueError


def key(prefix=None, data=None, **kw) -> fp.CacheKey:
    torch.manual_seed(0)
    prefix = prefix if prefix is not None else nn.Linear(4, 3)
    X = torch.arange(24.0).reshape(6, 4)
    data = data if data is not None else (X, torch.tensor([0, 1, 0, 1, 0, 1]))
    args = dict(
        dataset_id=None,
        transform=None,
        transform_id=None,
        views=1,
        seed=0,
        batch_size=4,
        num_workers=0,
        dtype="fp32",
        pool="mean",
        mask_key="attention_mask",
    )
    args.update(kw)
    return fp.make_key(prefix, as_source(data), **args)


def test_each_setting_changes_its_own_part_and_the_fingerprint():
    base = key()
    for change, part in [
        ({"views": 2}, "views"),
        ({"dtype": "bf16"}, "dtype"),
        ({"amp": "bf16"}, "dtype"),
        ({"pool": "max"}, "pool"),
        ({"dataset_id": "six rows"}, "dataset"),
        ({"transform": torch.tanh}, "transform"),
        ({"device": "meta"}, "numerics"),
    ]:
        other = key(**change)
        assert fp.changed_parts(base.parts, other.parts) == [part], change
        assert other.fingerprint != base.fingerprint, change
    assert key().fingerprint == base.fingerprint  # and nothing else moves it


def test_the_mask_key_counts_only_for_masked_mean():
    assert key(mask_key="a").parts["pool"] == key(mask_key="b").parts["pool"] == "mean"
    masked = {key(pool="masked_mean", mask_key=m).parts["pool"] for m in ("a", "b")}
    assert masked == {"masked_mean:a", "masked_mean:b"}


def test_the_transform_part_carries_seed_batch_size_and_id():
    part, opaque, digest = fp.transform_part(torch.tanh, None, seed=3, batch_size=8)
    assert part.endswith(",seed=3,batch=8") and digest and part.startswith(digest)
    assert opaque == []
    assert fp.transform_part(torch.tanh, None, 4, 8)[0] != part  # another seed
    assert fp.transform_part(torch.tanh, None, 3, 16)[0] != part  # another batch size
    named = fp.transform_part(torch.tanh, "tanh-v1", 3, 8)[0]
    assert named == f"id:tanh-v1|{part}"
    assert fp.transform_part(None, None, 3, 8) == ("none", [], "")


def test_a_transform_id_without_a_transform_is_refused():
    with pytest.raises(FastFTValueError, match="no transform= was given"):
        fp.transform_part(None, "crop-v2", seed=0, batch_size=8)


def test_dataset_id_replaces_reading_the_samples_but_keeps_the_labels():
    X = torch.arange(24.0).reshape(6, 4)
    y = torch.tensor([0, 1, 0, 1, 0, 1])
    part, labels, opaque = fp.dataset_part(as_source((X, y)), "mine")
    assert torch.equal(labels, y) and opaque == []
    assert fp.dataset_part(as_source((X + 1, y)), "mine")[0] == part  # samples unread
    assert fp.dataset_part(as_source((X, 1 - y)), "mine")[0] != part  # the labels count
    assert fp.dataset_part(as_source((X, y)), "theirs")[0] != part
    by_content = fp.dataset_part(as_source((X, y)), None)[0]
    assert fp.dataset_part(as_source((X + 1, y)), None)[0] != by_content


def test_numerics_follow_torchs_global_settings():
    before = fp.numerics("cpu")
    assert before.startswith("device=cpu,")
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium" if old != "medium" else "high")
        assert fp.numerics("cpu") != before
    finally:
        torch.set_float32_matmul_precision(old)
    assert fp.numerics("cpu") == before
    assert fp.numerics(torch.device("meta")).startswith("device=meta,")


def test_structure_key_ignores_addresses_and_unknown_signatures():
    class Prefix(nn.Module):
        _fastft_prefix = True

        def __init__(self, text):
            super().__init__()
            self.text = text

        def signature(self):
            return self.text

    a = Prefix("cut after <Linear at 0x7f00aa>")
    b = Prefix("cut after <Linear at 0x55ffee>")
    assert fp.structure_key(a) == fp.structure_key(b)  # where it lives in memory: no part of it
    assert fp.structure_key(Prefix("cut after <Conv>")) != fp.structure_key(a)

    class UserModule(nn.Linear):  # a signature() of a user's module is never called
        def signature(self):
            raise AssertionError("called")

    assert fp.structure_key(UserModule(2, 2)) == fp.structure_key(nn.Linear(2, 2))


def test_global_module_hooks_are_part_of_the_modules_part():
    prefix = nn.Linear(4, 3)
    plain = fp.prefix_parts(prefix)[0]
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: o * 2)
    try:
        hooked = fp.prefix_parts(prefix)[0]
    finally:
        handle.remove()
    assert fp.changed_parts(plain, hooked) == ["modules"]


def test_combine_is_order_free_and_sorts_parts_it_does_not_know():
    parts = {"weights": "w", "format": "1", "extra": "x", "another": "y"}
    assert fp.combine(parts) == fp.combine(dict(reversed(parts.items())))
    assert len(fp.combine(parts)) == 40
    assert fp.combine(parts) != fp.combine({**parts, "extra": "z"})


def test_a_given_fingerprint_is_kept_and_an_opaque_key_is_never_repeated():
    parts = {"format": "1"}
    assert fp.CacheKey(dict(parts), fingerprint="f" * 40).fingerprint == "f" * 40
    assert fp.CacheKey(dict(parts)).fingerprint == fp.combine(parts)
    once = [fp.CacheKey(dict(parts), opaque=["the data: a file"]) for _ in range(2)]
    assert not once[0].reusable and once[0].fingerprint != once[1].fingerprint


def test_describe_changes_names_the_parts_in_words():
    assert fp.describe_changes(["weights"]) == "the frozen weights"
    assert fp.describe_changes(["weights", "dataset", "views"]) == (
        "the frozen weights, the data and the number of views"
    )
    assert fp.describe_changes(["mystery"]) == "mystery"  # an unknown part by its name


@pytest.mark.parametrize(
    "opaque, advice",
    [
        (["the transform: an open file"], "transform_id="),
        (["the data: an object without state"], "dataset_id="),
        (["the frozen model: .handle (a socket)"], "fastft_key_ignore"),
    ],
)
def test_warn_not_reusable_gives_the_remedy_for_what_was_missed(opaque, advice):
    k = fp.CacheKey({"format": "1"}, opaque=list(opaque))
    with pytest.warns(CacheReuseWarning, match="built for this use only") as caught:
        fp.warn_not_reusable(k)
    text = str(caught[0].message)
    assert opaque[0] in text and advice in text
    others = {"transform_id=", "dataset_id=", "fastft_key_ignore"} - {advice}
    assert not any(o in text for o in others)


def test_warn_not_reusable_lists_three_reasons_and_counts_the_rest():
    k = fp.CacheKey({"format": "1"}, opaque=[f"the data: item {i}" for i in range(5)])
    with pytest.warns(CacheReuseWarning) as caught:
        fp.warn_not_reusable(k)
    text = str(caught[0].message)
    assert "item 2" in text and "item 3" not in text and "(and 2 more)" in text


def test_warn_if_transform_changed_only_when_its_state_moved():
    class Noisy:
        def __init__(self):
            self.calls = 0

        def __call__(self, x):
            self.calls += 1
            return x

    t = Noisy()
    _, _, digest = fp.transform_part(t, None, 0, 4)
    k = fp.CacheKey({"format": "1"}, transform_digest=digest)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fp.warn_if_transform_changed(t, k)  # unchanged: silent
        fp.warn_if_transform_changed(None, k)
    t(1)
    with pytest.warns(CacheReuseWarning, match="changed its own state"):
        fp.warn_if_transform_changed(t, k)


def test_accepts_generator():
    assert fp.accepts_generator(lambda x, generator=None: x)
    assert not fp.accepts_generator(lambda x: x)
    assert fp.accepts_generator(functools.partial(lambda x, generator: x, 1))
    assert not fp.accepts_generator(print)  # a builtin without a readable signature
    assert not fp.accepts_generator(1)  # not callable at all
