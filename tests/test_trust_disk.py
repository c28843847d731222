"""Trust: disk caches are what they claim to be, open at any size, and fastft deletes only
what it owns.

- ``fastft cache rm`` removes only fastft cache folders (valid manifest naming the folder's own
  fingerprint, nothing else inside), never ``.``, the cache dir, a folder above it, or
  through a link; a folder of the working directory never shadows a cache.
- A cache larger than the machine's memory opens (read-only shared mappings).
- A complete cache is checked before use: folder, manifest and requested key agree; labels
  and features match their checksums (altered labels, a NaN written into the features).
- Links planted where fastft writes (the lock, a temporary file, the cache folder) are refused.
- Readers racing a build or a removal get a clear error or a consistent answer, never a
  raw ``FileNotFoundError``.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import shutil
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import fastft.cache as fcache
from fastft import FineTuner
from fastft.cache import FeatureCache, disk, folders, journal, registry
from fastft.cache.fingerprint import FORMAT_VERSION
from fastft.errors import CacheCorruptError, CacheError, CacheLockedError, CacheTooLargeError

from helpers.data import labelled

ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("fresh_registry")


def prefix(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh())


def data(n=64, seed=1):
    return labelled(n, seed=seed)


def build(root, p=None, d=None, **kw):
    kw.setdefault("batch_size", 8)
    return FeatureCache.build(
        p or prefix(), d or data(), dtype="fp32", tier="disk", cache_dir=root, progress=False, **kw
    )


def run_cli(*args, cwd=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "fastft.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=120,
    )


# ---------------------------------------------------------------------------- cache rm
@pytest.fixture
def webapp(tmp_path):
    """A folder that is not a cache but holds a manifest.json (a web app's)."""
    app = tmp_path / "work" / "myapp"
    app.mkdir(parents=True)
    (app / "manifest.json").write_text('{"name": "my web app", "start_url": "/"}')
    (app / "index.html").write_text("<html></html>")
    return app


@pytest.mark.parametrize("argument", ["myapp", "./myapp", "."])
@pytest.mark.reliability(
    "fastft cache rm on a folder that is not a cache but holds a manifest.json: by name "
    "(myapp), by path (./myapp), and '.' from inside it",
    "refused with a message, exit status 2, nothing deleted",
)
def test_rm_never_deletes_what_fastft_does_not_own(tmp_path, webapp, argument):
    cwd = webapp if argument == "." else webapp.parent
    proc = run_cli("cache", "--cache-dir", str(tmp_path / "caches"), "rm", argument, cwd=cwd)
    assert proc.returncode == 2 and proc.stderr.startswith("fastft: error:"), proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in webapp.iterdir()) == ["index.html", "manifest.json"]


def test_a_local_folder_never_shadows_a_cache(tmp_path, monkeypatch):
    root = tmp_path / "caches"
    cache = build(root)
    work = tmp_path / "work"
    decoy = work / cache.fingerprint[:8]
    decoy.mkdir(parents=True)
    (decoy / "manifest.json").write_text(json.dumps({"format_version": FORMAT_VERSION}))
    monkeypatch.chdir(work)
    assert fcache.info(cache.fingerprint[:8], root)["path"] == str(cache.path)
    assert fcache.remove(cache.fingerprint[:8], root) == cache.path
    assert not cache.path.exists() and decoy.exists()


@pytest.mark.parametrize(
    "case", ["link", "stranger file", "other fingerprint", "the cache dir", "above it"]
)
@pytest.mark.reliability(
    "fastft cache rm of a link to a cache, a cache folder holding a file fastft did not write, "
    "a folder whose manifest names another fingerprint, the cache dir, a folder above it",
    "refused, nothing deleted",
)
def test_rm_refuses_everything_but_its_own_folders(tmp_path, case):
    root = tmp_path / "caches"
    cache = build(root)
    folder = cache.path
    if case == "link":
        target = tmp_path / "link"
        target.symlink_to(folder, target_is_directory=True)
    elif case == "stranger file":
        (folder / "notes.txt").write_text("mine")
        target = folder
    elif case == "other fingerprint":
        target = root / ("f" * 40)
        shutil.copytree(folder, target)
    elif case == "the cache dir":
        target = root
    else:
        target = tmp_path
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(CacheError, match="not removing|not a fastft cache folder"):
        fcache.remove(target, root)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_rm_removes_its_own_cache_and_waits_for_no_builder(tmp_path):
    root = tmp_path / "caches"
    cache = build(root)
    with folders.build_lock(root, cache.fingerprint):
        with pytest.raises(CacheLockedError, match="being built"):
            fcache.remove(cache.fingerprint, root)
    assert fcache.remove(cache.fingerprint, root) == cache.path
    assert not cache.path.exists()


# ----------------------------------------------------------------------- a cache larger than memory
def _memory_bytes() -> int:
    fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return sum(int(fields[k].split()[0]) * 1024 for k in ("MemTotal", "SwapTotal"))


@pytest.mark.reliability(
    "a complete disk cache larger than the machine's RAM + swap (sparse files)",
    "opens (read-only shared mapping, nothing reserved), gathers rows, checksums checked "
    "chunk by chunk on first read (raw OSError ENOMEM before)",
)
def test_a_cache_larger_than_memory_opens(tmp_path):
    dim, chunk = 4096, 4096  # fp32 rows of 16 KiB; 64 MiB chunks
    rows = -(-int(_memory_bytes() * 1.25) // (dim * 4 * chunk)) * chunk
    fp = "b" * 40
    folder = tmp_path / fp
    folder.mkdir()
    tap_bytes, label_bytes = rows * dim * 4, rows * 8
    for name, size in (("tap0.bin", tap_bytes), ("labels.bin", label_bytes)):
        with open(folder / name, "wb") as f:
            f.truncate(size)  # sparse: no disk space, reads as zeros
    zero_tap, zero_labels = zlib.crc32(bytes(chunk * dim * 4)), zlib.crc32(bytes(chunk * 8))
    chunks = [
        [0, s, chunk, {"tap0.bin": zero_tap, "labels.bin": zero_labels}]
        for s in range(0, rows, chunk)
    ]
    (folder / disk.JOURNAL).write_text(json.dumps({"chunks": chunks}))
    manifest = {
        "format_version": FORMAT_VERSION,
        "fingerprint": fp,
        "parts": {},
        "status": "complete",
        "created": 0.0,
        "num_rows": rows,
        "num_views": 1,
        "dtype": "fp32",
        "pool": "none",
        "taps": [
            {
                "name": "tap0",
                "dim": dim,
                "shape": [dim],
                "dtype": "float32",
                "pool": "none",
                "file": "tap0.bin",
                "scales_file": None,
            }
        ],
        "labels": {"dtype": "int64", "shape": [], "file": "labels.bin"},
    }
    (folder / disk.MANIFEST).write_text(json.dumps(manifest))
    assert tap_bytes > _memory_bytes()
    if Path("/proc/sys/vm/overcommit_memory").read_text().strip() == "0":
        # What opened caches before: a private writable mapping, charged to RAM + swap in full.
        with open(folder / "tap0.bin", "rb") as f, pytest.raises(OSError) as info:
            mmap.mmap(
                f.fileno(), tap_bytes, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE
            )
        assert info.value.errno == errno.ENOMEM
    cache = FeatureCache.open(folder)
    (got,) = cache.gather(torch.tensor([0, rows // 2, rows - 1]))
    assert got.shape == (3, dim) and not got.any()
    assert cache.nbytes == tap_bytes + label_bytes


# ---------------------------------------------------------------------- complete caches are checked
@pytest.mark.parametrize("damage", ["labels altered", "NaN in the features"])
@pytest.mark.reliability(
    "a complete cache whose labels.bin was altered, or with a NaN written into its features",
    "open() raises CacheCorruptError; a build rebuilds it; training never sees it",
)
def test_damaged_complete_caches_never_reach_training(tmp_path, damage):
    X, y = data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    ft = FineTuner(
        model,
        num_classes=3,
        cache="disk",
        cache_dtype="fp32",
        cache_dir=str(tmp_path),
        verbose=False,
    )
    ft.fit((X, y), epochs=1, batch_size=8)
    folder = ft.cache.path
    registry.clear()
    if damage == "labels altered":
        stored = np.memmap(folder / "labels.bin", dtype=np.int64, mode="r+")
        stored[5] = (stored[5] + 1) % 3
    else:
        stored = np.memmap(folder / "tap0.bin", dtype=np.float32, mode="r+")
        stored[100] = np.nan
    stored.flush()
    del stored
    with pytest.raises(CacheCorruptError, match="checksum mismatch"):
        FeatureCache.open(folder)
    history = ft.fit((X, y), epochs=1, batch_size=8)
    assert ft.cache.telemetry["reason"].startswith("rebuilt: the cache on disk was corrupt")
    assert torch.equal(ft.cache.labels, y) and np.isfinite(history[-1]["loss"])


@pytest.mark.reliability(
    "a large cache (checked chunk by chunk) with a NaN written into one chunk",
    "rows of intact chunks are read; reading a row of the damaged chunk raises "
    "CacheCorruptError before any of it is used",
)
def test_large_caches_are_checked_before_each_chunk_is_first_read(tmp_path, monkeypatch):
    cache = build(tmp_path)
    folder = cache.path
    del cache
    registry.clear()
    tap = np.memmap(folder / "tap0.bin", dtype=np.float32, mode="r+").reshape(64, 16)
    tap[20, 3] = np.nan  # sample 20: in the chunk of samples 16..23
    del tap
    monkeypatch.setattr(journal, "VERIFY_AT_OPEN_BYTES", 0)
    opened = FeatureCache.open(folder)
    (rows,) = opened.gather(torch.arange(0, 16))
    assert torch.isfinite(rows).all()
    with pytest.raises(CacheCorruptError, match=r"tap0.bin \(view 0, samples 16\.\.23\)"):
        opened.gather(torch.tensor([1, 17]))


@pytest.mark.reliability(
    "a cache folder holding the manifest of another cache (copied or renamed)",
    "never opened as the folder's key: CacheCorruptError, and a build of that key rebuilds",
)
def test_a_folder_must_hold_its_own_cache(tmp_path):
    real = build(tmp_path)
    other = build(tmp_path, p=prefix(seed=5))
    shutil.rmtree(other.path)
    shutil.copytree(real.path, other.path)  # real's files under other's name
    registry.clear()
    with pytest.raises(CacheCorruptError, match="named by its own fingerprint"):
        FeatureCache.open(other.path)
    again = build(tmp_path, p=prefix(seed=5))
    assert again.telemetry["hit"] is False and "corrupt" in again.telemetry["reason"]
    assert json.loads((other.path / disk.MANIFEST).read_text())["fingerprint"] == other.fingerprint


# ---------------------------------------------------------------- links planted where fastft writes
@pytest.mark.parametrize("where", ["lock", "temporary file", "cache folder"])
@pytest.mark.reliability(
    "a symbolic link planted at the build lock, at a temporary file of an atomic write, or "
    "as the cache folder itself",
    "CacheError naming the link; the link's target is never created or written",
)
def test_planted_links_are_never_followed(tmp_path, where):
    fp = build(tmp_path / "probe").fingerprint
    registry.clear()  # the same key is built below in another folder
    root = tmp_path / "caches"
    victim = tmp_path / "victim"
    if where == "lock":
        (root / disk.LOCKS).mkdir(parents=True)
        (root / disk.LOCKS / f"{fp}.lock").symlink_to(victim)
        with pytest.raises(CacheError, match="symbolic link"):
            build(root)
        assert not victim.exists()
    elif where == "temporary file":
        victim.write_text("precious")
        target = tmp_path / "state.json"
        target.with_name("state.json.tmp").symlink_to(victim)
        with pytest.raises(CacheCorruptError, match="symbolic link"):
            disk.write_json_atomic(target, {"a": 1})
        assert victim.read_text() == "precious"
    else:
        victim.mkdir()
        (victim / "keep.txt").write_text("precious")
        root.mkdir()
        (root / fp).symlink_to(victim, target_is_directory=True)
        with pytest.raises(CacheError, match="symbolic link"):
            build(root)
        assert sorted(p.name for p in victim.iterdir()) == ["keep.txt"]


# --------------------------------------------------------------------------- readers racing writers
@pytest.mark.reliability(
    "cache ls / info racing builds and removals of caches in the same folder (hundreds of rounds)",
    "a consistent list or a CacheError; never a raw FileNotFoundError",
)
def test_readers_racing_builds_and_removals(tmp_path):
    stop = threading.Event()
    failures: list[BaseException] = []

    def churn():
        seed = 0
        while not stop.is_set():
            seed += 1
            try:
                cache = build(tmp_path, p=prefix(seed % 4), d=data(n=16, seed=seed % 4))
                registry.clear()
                fcache.remove(cache.fingerprint, tmp_path)
            except (CacheLockedError, CacheError):
                continue
            except BaseException as exc:  # noqa: BLE001 - reported below
                failures.append(exc)
                return

    writer = threading.Thread(target=churn)
    writer.start()
    try:
        for _ in range(300):
            for entry in fcache.list_caches(tmp_path):
                try:
                    fcache.info(entry["path"], tmp_path)
                except CacheError:
                    pass  # removed meanwhile: said so
    finally:
        stop.set()
        writer.join()
    assert not failures, failures


# ------------------------------------------------------------ sizes checked before anything is made
@pytest.mark.parametrize("tier", ["host", "auto", "disk"])
@pytest.mark.reliability(
    "views=10**8 (a cache of petabytes)",
    "CacheTooLargeError naming the size before anything is allocated or written",
)
def test_absurd_sizes_are_refused_before_allocation(tmp_path, tier):
    X, y = data(n=16)
    with pytest.raises(CacheTooLargeError, match="needs"):
        FeatureCache.build(
            prefix(),
            (X, y),
            views=10**8,
            transform=lambda x: x,
            tier=tier,
            cache_dir=tmp_path,
            progress=False,
            dtype="fp32",
        )
    assert [p for p in tmp_path.iterdir() if p.name != ".locks"] == []


# --------------------------------------------------------------- odds and ends of removal and reuse
def test_rm_of_a_name_too_long_for_the_filesystem_is_a_clear_error(tmp_path):
    with pytest.raises(CacheError, match="no fastft cache"):
        fcache.remove("a" * 300, tmp_path)


def test_rm_by_path_leaves_the_folder_around_it_as_it_was(tmp_path):
    project = tmp_path / "project"
    cache = build(project)
    shutil.rmtree(project / disk.LOCKS)  # as if the cache had been copied here
    fcache.remove(cache.path)
    assert list(project.iterdir()) == []


@pytest.mark.reliability(
    "a corrupt cache folder that also holds a file of the user's, rebuilt",
    "CacheError naming the file; nothing deleted (never rmtree of a folder with user files)",
)
def test_a_rebuild_never_deletes_a_users_file(tmp_path):
    cache = build(tmp_path)
    folder = cache.path
    (folder / "my_notes.txt").write_text("mine")
    (folder / "tap0.bin").write_bytes(b"\0")  # truncated: corrupt
    registry.clear()
    with pytest.raises(CacheError, match="my_notes.txt"):
        build(tmp_path)
    assert (folder / "my_notes.txt").read_text() == "mine"


def test_labels_changed_in_place_in_memory_rebuild_the_cache(tmp_path):
    X, y = data()
    first = FeatureCache.build(prefix(), (X, y), tier="host", cache_dir=tmp_path, progress=False)
    first.labels[0] = (first.labels[0] + 1) % 3  # a caller edits the labels it was given
    again = FeatureCache.build(prefix(), (X, y), tier="host", cache_dir=tmp_path, progress=False)
    assert again.telemetry["hit"] is False and torch.equal(again.labels, y)
