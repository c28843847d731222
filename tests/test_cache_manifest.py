"""A disk cache's manifest is checked field by field before anything is mapped: each field
made invalid on its own is refused with a CacheCorruptError that names that field, and the
intact manifest passes. (test_reliability_disk corrupts whole folders; this is the table.)"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from fastft.cache import FeatureCache, disk
from fastft.errors import CacheCorruptError

pytestmark = pytest.mark.usefixtures("fresh_registry")


@pytest.fixture(scope="module")
def manifests(tmp_path_factory):
    """(folder, manifest) of an fp32 and an int8 disk cache."""
    root = tmp_path_factory.mktemp("manifests")
    torch.manual_seed(0)
    prefix = nn.Linear(5, 3).eval()
    data = (torch.randn(12, 5), torch.arange(12) % 2)
    out = {}
    for dtype in ("fp32", "int8"):
        cache = FeatureCache.build(
            prefix, data, dtype=dtype, tier="disk", cache_dir=root / dtype, progress=False
        )
        folder = root / dtype / cache.fingerprint
        out[dtype] = folder, json.loads((folder / disk.MANIFEST).read_text())
    return out


def tap(m):
    return m["taps"][0]


# (name, which cache, how the manifest is changed, what the error names)
BREAKS = [
    ("not an object", "fp32", lambda m: [m], "a JSON list, not an object"),
    ("fingerprint", "fp32", lambda m: m.update(fingerprint=""), "no fingerprint"),
    ("parts", "fp32", lambda m: m.update(parts={"weights": 1}), "parts must map names to strings"),
    ("created", "fp32", lambda m: m.update(created="yesterday"), "created must be a time"),
    ("created inf", "fp32", lambda m: m.update(created=float("inf")), "created must be a time"),
    ("status", "fp32", lambda m: m.update(status="done"), "status 'done'"),
    ("num_rows", "fp32", lambda m: m.update(num_rows=0), "num_rows and num_views must be"),
    ("num_views", "fp32", lambda m: m.update(num_views=True), "num_rows and num_views must be"),
    ("taps", "fp32", lambda m: m.update(taps=[]), "taps must be a non-empty list"),
    ("tap name", "fp32", lambda m: tap(m).update(name="labels"), "tap name 'labels'"),
    ("tap shape", "fp32", lambda m: tap(m).update(shape=[2, 2]), "do not agree"),
    ("tap dtype", "fp32", lambda m: tap(m).update(dtype="float64"), "storage dtype 'float64'"),
    ("tap pool", "fp32", lambda m: tap(m).update(pool=None), "pool"),
    (
        "tap size",
        "fp32",
        lambda m: (m.update(num_rows=2**40), tap(m).update(dim=2**10, shape=[2**10])),
        "is not a real size",
    ),
    ("scales file", "fp32", lambda m: tap(m).update(scales_file="x.bin"), "only an int8 tap"),
    ("no scales", "int8", lambda m: tap(m).update(scales_file=None), "only an int8 tap"),
    ("labels", "fp32", lambda m: m.update(labels=None), "no labels"),
    ("labels shape", "fp32", lambda m: m["labels"].update(shape=[-1]), "labels shape [-1]"),
    (
        "shared file",
        "int8",
        lambda m: tap(m).update(scales_file=tap(m)["file"]),
        "two arrays share one file",
    ),
]


@pytest.mark.parametrize("name, which, change, message", BREAKS, ids=[b[0] for b in BREAKS])
def test_each_invalid_field_is_refused_by_name(manifests, name, which, change, message):
    folder, manifest = manifests[which]
    assert disk.validate_manifest(copy.deepcopy(manifest), folder)  # the intact one passes
    broken = copy.deepcopy(manifest)
    replaced = change(broken)
    if isinstance(replaced, list):  # a change that replaces the whole manifest
        broken = replaced
    with pytest.raises(CacheCorruptError, match="invalid manifest") as info:
        disk.validate_manifest(broken, folder)
    assert message in str(info.value) and folder.name in str(info.value)
    assert "remove the cache and rebuild it" in str(info.value)


@pytest.mark.parametrize(
    "version, says",
    [(0, "an older fastft wrote it"), (99, "a newer fastft wrote it"), ("3", "it is never read")],
)
def test_another_format_version_says_which_side_is_newer(manifests, version, says):
    folder, manifest = manifests["fp32"]
    with pytest.raises(CacheCorruptError, match="format version") as info:
        disk.validate_manifest({**manifest, "format_version": version}, folder)
    assert says in str(info.value)
    if version == "3":
        assert "wrote it" not in str(info.value)  # not a version number: no side to name


def test_a_missing_or_resized_array_file_is_refused(manifests, tmp_path):
    folder, manifest = manifests["fp32"]
    disk.check_sizes(folder, manifest)
    copy_dir = tmp_path / folder.name
    copy_dir.mkdir()
    for array in disk.arrays(manifest):
        (copy_dir / array.file).write_bytes((folder / array.file).read_bytes())
    first = disk.arrays(manifest)[0].file
    with open(copy_dir / first, "ab") as f:
        f.write(b"\0")
    with pytest.raises(CacheCorruptError, match=first):
        disk.check_sizes(copy_dir, manifest)
    (copy_dir / first).unlink()
    with pytest.raises(CacheCorruptError, match=f"{first} is missing"):
        disk.check_sizes(copy_dir, manifest)
