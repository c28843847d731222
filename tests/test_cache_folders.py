"""fastft.cache.folders: build locks that never follow links and time out with advice,
removal that deletes only what fastft wrote, and disk errors turned into what to do."""

from __future__ import annotations

import errno
import os
import threading

import pytest

from fastft.cache import folders
from fastft.cache.disk import LOCKS
from fastft.errors import CacheError, CacheLockedError, CacheTooLargeError

FINGERPRINT = "ab" * 20


def test_a_held_lock_is_seen_and_times_out_with_advice(tmp_path):
    assert not folders.is_being_built(tmp_path, FINGERPRINT)
    waits = []
    with folders.build_lock(tmp_path, FINGERPRINT):
        assert folders.is_being_built(tmp_path, FINGERPRINT)
        outcome = {}

        def second():  # flock is per open file: another descriptor waits like another process
            try:
                with folders.build_lock(
                    tmp_path, FINGERPRINT, timeout=0.2, on_wait=lambda: waits.append(1)
                ):
                    outcome["got"] = True
            except CacheLockedError as exc:
                outcome["error"] = str(exc)

        t = threading.Thread(target=second)
        t.start()
        t.join(30)
    assert "got" not in outcome and waits == [1]  # told once that it waits
    assert FINGERPRINT in outcome["error"] and "FASTFT_LOCK_TIMEOUT" in outcome["error"]
    assert not folders.is_being_built(tmp_path, FINGERPRINT)  # released on exit


def test_the_lock_timeout_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTFT_LOCK_TIMEOUT", "0.1")
    with folders.build_lock(tmp_path, FINGERPRINT):
        result = {}

        def second():
            try:
                with folders.build_lock(tmp_path, FINGERPRINT):
                    pass
            except CacheLockedError as exc:
                result["error"] = str(exc)

        t = threading.Thread(target=second)
        t.start()
        t.join(30)
    assert "for more than 0 s" in result["error"]


def test_locks_are_never_taken_through_links(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / LOCKS).symlink_to(target, target_is_directory=True)
    with pytest.raises(CacheError, match="is a symbolic link; fastft never follows links"):
        with folders.build_lock(linked, FINGERPRINT):
            pass
    planted = tmp_path / "planted"
    (planted / LOCKS).mkdir(parents=True)
    victim = tmp_path / "victim"
    (planted / LOCKS / f"{FINGERPRINT}.lock").symlink_to(victim)
    with pytest.raises(CacheError, match="lock file .* is a symbolic link"):
        with folders.build_lock(planted, FINGERPRINT):
            pass
    assert not victim.exists()  # the link's target was never created
    assert not folders.is_being_built(planted, FINGERPRINT)


def test_removing_a_missing_folder(tmp_path):
    with pytest.raises(CacheError, match="does not exist"):
        folders.remove_folder(tmp_path / "gone")
    folders.remove_folder(tmp_path / "gone", missing_ok=True)


def test_a_folder_with_strangers_is_not_removed(tmp_path):
    folder = tmp_path / ("cd" * 20)
    folder.mkdir()
    for i in range(7):
        (folder / f"notes{i}.txt").write_text("mine")
    with pytest.raises(CacheError, match=r"did not write \(notes0.txt, .*, \.\.\.\); not removing"):
        folders.remove_folder(folder)
    assert len(list(folder.iterdir())) == 7


@pytest.mark.parametrize(
    "code, says",
    [
        (errno.ENOSPC, "the disk is full"),
        (errno.EDQUOT, "the disk quota is exceeded"),
        (errno.EFBIG, "the file size limit was reached"),
    ],
)
def test_a_full_disk_says_where_to_make_room(tmp_path, code, says):
    folder = tmp_path / "cache"
    with pytest.raises(CacheError, match=says) as info:
        with folders.write_errors(folder, "writing rows", committed_rows=40):
            raise OSError(code, os.strerror(code))
    text = str(info.value)
    assert "cache_dir=" in text and "The 40 rows committed so far are kept" in text
    assert isinstance(info.value.__cause__, OSError)


def test_another_write_error_keeps_its_reason(tmp_path):
    with pytest.raises(CacheError, match="cannot write .* while opening") as info:
        with folders.write_errors(tmp_path / "c", "opening"):
            raise PermissionError(errno.EACCES, "Permission denied")
    assert "Permission denied" in str(info.value) and "Building again starts or resumes" in str(
        info.value
    )


def test_free_space_is_checked_on_the_nearest_existing_folder(tmp_path):
    folders.check_free_space(tmp_path / "not" / "made" / "yet", 1)
    with pytest.raises(CacheTooLargeError, match="the disk is full for this cache") as info:
        folders.check_free_space(tmp_path / "not" / "made", 1 << 62)
    assert str(tmp_path) in str(info.value) and "cache_dtype" in str(info.value)
