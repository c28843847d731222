"""Finding caches by fingerprint prefix: a unique prefix names one cache, an ambiguous one
is refused rather than guessed, and an empty cache folder lists nothing."""

from __future__ import annotations

import pytest

from fastft.cache import disk, manage
from fastft.errors import CacheError


def fake_cache(root, name):
    folder = root / name
    folder.mkdir(parents=True)
    (folder / disk.MANIFEST).write_text("{}")
    return folder


def test_a_prefix_names_one_cache_or_is_refused(tmp_path):
    first = fake_cache(tmp_path, "abc1" + "0" * 36)
    fake_cache(tmp_path, "abc2" + "0" * 36)
    (tmp_path / ("abc3" + "0" * 36)).mkdir()  # no manifest: not a cache
    assert manage.resolve("abc1", tmp_path) == first
    with pytest.raises(CacheError, match="'abc' matches 2 caches .* give more of the fingerprint"):
        manage.resolve("abc", tmp_path)
    with pytest.raises(CacheError, match="no fastft cache 'abc3'"):
        manage.resolve("abc3", tmp_path)


def test_listing_a_cache_folder_that_does_not_exist_gives_nothing(tmp_path):
    assert manage.list_caches(tmp_path / "never-made") == []


def test_an_unreadable_cache_is_listed_as_such(tmp_path):
    fake_cache(tmp_path, "ef" * 20)  # "{}": not a valid manifest
    (entry,) = manage.list_caches(tmp_path)
    assert entry["status"] == "unreadable" and entry["fingerprint"] == "ef" * 20
    assert "format version None" in entry["error"]
