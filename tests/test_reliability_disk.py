"""Disk caches under hostile conditions: a full disk, a reader racing a builder, folders of
another format version, manifests that point outside the cache folder.

Every fault is really done: OSError(ENOSPC) raised from the write, fsync and journal paths,
a real full filesystem (a tiny tmpfs, when this runs as root), a real file-size limit
(RLIMIT_FSIZE in a subprocess), a real concurrent builder process.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import fastft.cache as fcache
from fastft.cache import FeatureCache, disk, disk_build, journal, registry
from fastft.cache.fingerprint import FORMAT_VERSION
from fastft.errors import CacheCorruptError, CacheError, FastFTError

from helpers.caches import build_on_disk

ROOT = Path(__file__).resolve().parent.parent

SETUP = textwrap.dedent("""
    import torch
    from torch import nn

    class Counting(nn.Module):
        fastft_key_ignore = ("calls", "delay", "fail_at", "pause")  # test instrumentation

        def __init__(self, delay=0.0, fail_at=None):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.lin = nn.Linear(6, 32, bias=False)
            with torch.no_grad():  # integer weights and inputs: exact, reproducible outputs
                w = torch.randint(-3, 4, self.lin.weight.shape, generator=g)
                self.lin.weight.copy_(w.float())
            self.calls, self.delay, self.fail_at = 0, delay, fail_at
            import time
            self.pause = time.sleep

        def forward(self, x):
            self.calls += 1
            if self.fail_at is not None and self.calls == self.fail_at:
                raise KeyboardInterrupt("injected")
            if self.delay:
                self.pause(self.delay)
            return self.lin(x)

    def make(**kw):
        g = torch.Generator().manual_seed(1)
        X = torch.randint(-4, 5, (100, 6), generator=g).float()
        return Counting(**kw), (X, torch.randint(0, 3, (100,), generator=g))
""")
namespace: dict = {}
exec(SETUP, namespace)
make = namespace["make"]


pytestmark = pytest.mark.usefixtures("fresh_registry")


@pytest.fixture(autouse=True)
def commit_after_every_chunk(monkeypatch):
    monkeypatch.setattr(disk_build, "COMMIT_INTERVAL_S", 0.0)  # exact fault points


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    prefix, data = make()
    registry.clear()
    cache = build_on_disk(prefix, data, tmp_path_factory.mktemp("ref"))
    registry.clear()
    return (
        cache.fingerprint,
        (cache.path / "tap0.bin").read_bytes(),
        (cache.path / "labels.bin").read_bytes(),
    )


def assert_equals_reference(cache, reference):
    fp, tap, labels = reference
    assert cache.fingerprint == fp and cache.verify()["complete"]
    assert (cache.path / "tap0.bin").read_bytes() == tap
    assert (cache.path / "labels.bin").read_bytes() == labels


def enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def only_folder(root: Path) -> Path:
    return next(p for p in root.iterdir() if not p.name.startswith("."))


# ---------------------------------------------------------------------------- disk full
@pytest.mark.reliability(
    "disk full (ENOSPC) when the cache files are created",
    "CacheError saying to free space or pass cache_dir; no folder left behind; next build succeeds",
)
def test_disk_full_at_creation(tmp_path, monkeypatch, reference):
    prefix, data = make()
    with monkeypatch.context() as m:
        m.setattr(os, "posix_fallocate", enospc)
        with pytest.raises(
            CacheError, match=r"disk is full while creating its files.*cache_dir="
        ) as info:
            build_on_disk(prefix, data, tmp_path)
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.ENOSPC
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == []
    assert_equals_reference(build_on_disk(*make(), tmp_path), reference)


@pytest.mark.parametrize("where", ["fsync", "journal"])
@pytest.mark.reliability(
    "disk full (ENOSPC) at the 4th commit: in the fsync of the data, or half-way through the "
    "journal write",
    "CacheError saying what to do; journal still lists only the 3 intact "
    "chunks; open() refuses the partial cache; next build resumes and equals a clean build",
)
def test_disk_full_during_a_commit_leaves_a_resumable_cache(
    tmp_path, monkeypatch, reference, where
):
    prefix, data = make()
    calls = [0]
    with monkeypatch.context() as m:
        if where == "fsync":
            fsync_files = journal.fsync_files

            def failing(folder, layout):
                calls[0] += 1
                if calls[0] >= 4:  # the disk stays full
                    enospc()
                fsync_files(folder, layout)

            m.setattr(journal, "fsync_files", failing)
        else:
            dump = json.dump

            def failing(
                payload, f, **kw
            ):  # half the journal reaches its tmp file, then the disk is full
                if Path(f.name).name == "journal.json.tmp":
                    calls[0] += 1
                    if calls[0] >= 4:  # the disk stays full
                        text = json.dumps(payload, **kw)
                        f.write(text[: len(text) // 2])
                        enospc()
                dump(payload, f, **kw)

            m.setattr(disk.json, "dump", failing)
        with pytest.raises(
            CacheError, match=r"disk is full while committing.*30 rows committed so far are kept"
        ):
            build_on_disk(prefix, data, tmp_path)
    folder = only_folder(tmp_path)
    assert len(json.loads((folder / disk.JOURNAL).read_text())["chunks"]) == 3
    assert journal.verify_folder(folder)["complete"] is False
    with pytest.raises(CacheError, match="incomplete"):
        FeatureCache.open(folder)
    registry.clear()
    prefix, data = make()
    cache = build_on_disk(prefix, data, tmp_path)
    assert (
        prefix.calls == 7
        and cache.telemetry["reason"] == "resumed: 30 of 100 rows were already committed"
    )
    assert_equals_reference(cache, reference)


@pytest.mark.reliability(
    "disk full (ENOSPC) when the finished cache is marked complete",
    "CacheError; the cache stays 'building'; next build finishes it without running the prefix",
)
def test_disk_full_when_marking_complete(tmp_path, monkeypatch, reference):
    write_json = disk.write_json_atomic

    def failing(path, payload, **kw):
        if path.name == disk.MANIFEST and payload.get("status") == "complete":
            enospc()
        write_json(path, payload, **kw)

    prefix, data = make()
    with monkeypatch.context() as m:
        m.setattr(disk, "write_json_atomic", failing)
        with pytest.raises(
            CacheError, match="disk is full while marking it complete.*100 rows committed"
        ):
            build_on_disk(prefix, data, tmp_path)
    with pytest.raises(CacheError, match="incomplete"):
        FeatureCache.open(only_folder(tmp_path))
    registry.clear()
    prefix, data = make()
    cache = build_on_disk(prefix, data, tmp_path)
    assert prefix.calls == 0
    assert_equals_reference(cache, reference)


@pytest.mark.reliability(
    "Ctrl-C in a build, then ENOSPC while committing what was written",
    "the KeyboardInterrupt is what the caller sees (the commit failure is logged)",
)
def test_interruption_is_not_masked_by_a_failing_commit(tmp_path, monkeypatch):
    prefix, data = make(fail_at=5)
    monkeypatch.setattr(
        disk_build, "COMMIT_INTERVAL_S", 1e9
    )  # nothing committed before the interruption
    monkeypatch.setattr(journal, "fsync_files", enospc)
    with pytest.raises(KeyboardInterrupt):
        build_on_disk(prefix, data, tmp_path)


RUN_BUILD = SETUP + textwrap.dedent("""
    import resource, signal, sys
    from fastft.cache import FeatureCache, disk, disk_build, journal, registry
    from fastft.errors import CacheError
    if sys.argv[2] == "fsize":  # a real file-size limit: writes past it fail with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, hard))
    prefix, data = make()
    try:
        FeatureCache.build(prefix, data, tier="disk", dtype="fp32", batch_size=10,
                           cache_dir=sys.argv[1], progress=False)
    except CacheError as exc:
        print("CacheError:", exc)
        raise SystemExit(3)
    print("built")
""")


def run_build(cache_dir: Path, mode: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-c", RUN_BUILD, str(cache_dir), mode],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.reliability(
    "a real file-size limit (RLIMIT_FSIZE 8 KiB) in the building process",
    "CacheError naming the file size limit, not a crash or SIGXFSZ",
)
def test_file_size_limit_is_a_clear_error(tmp_path):
    proc = run_build(tmp_path, "fsize")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert "file size limit was reached while creating its files" in proc.stdout


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A real 64 KiB filesystem (needs root and mount; skipped elsewhere)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.mark.reliability(
    "a really full filesystem (a 64 KiB tmpfs, nearly filled) under a disk build",
    "CacheError 'disk is full', never SIGBUS from a memory-mapped write (bug found: it was)",
)
def test_really_full_filesystem_is_a_clear_error(tiny_tmpfs):
    # 100 rows x 32 fp32 fit; fill the disk first so that they do not.
    (tiny_tmpfs / "filler").write_bytes(b"\0" * (60 * 1024))
    proc = run_build(tiny_tmpfs, "plain")
    assert proc.returncode == 3, f"rc={proc.returncode} (-7 is SIGBUS)\n{proc.stdout}{proc.stderr}"
    # Refused before any file is made (the free space is checked first; ENOSPC while creating
    # the files gives the same advice when the disk fills up in between).
    assert "the disk is full for this cache" in proc.stdout
    (tiny_tmpfs / "filler").unlink()
    assert run_build(tiny_tmpfs, "plain").stdout.strip() == "built"


# ---------------------------------------------------------------------------- readers and builders
BUILDER = SETUP + textwrap.dedent("""
    import sys
    from fastft.cache import FeatureCache, disk, disk_build, journal, registry
    disk_build.COMMIT_INTERVAL_S = 0.0
    prefix, data = make(delay=0.08)
    FeatureCache.build(prefix, data, tier="disk", dtype="fp32", batch_size=10,
                       cache_dir=sys.argv[1], progress=False)
""")


@pytest.mark.reliability(
    "a reader opens, lists, inspects and verifies a cache while another process builds it",
    "a clear 'another process is building it' error or the complete cache; never partial rows",
)
def test_reader_during_a_build_never_sees_partial_features(tmp_path, reference):
    fp = reference[0]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-c", BUILDER, str(tmp_path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    expected = torch.frombuffer(bytearray(reference[1]), dtype=torch.float32).view(100, 32)
    refused, opened, deadline = 0, 0, time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            done = proc.poll() is not None
            try:
                cache = FeatureCache.open(fp, cache_dir=tmp_path)
            except CacheError as exc:
                assert "another process is building it now" in str(exc) or "no fastft cache" in str(
                    exc
                ), str(exc)
                refused += "building" in str(exc)
            else:
                torch.testing.assert_close(
                    cache.gather(torch.arange(100))[0], expected, rtol=0, atol=0
                )
                opened += 1
            for call in (
                lambda: fcache.list_caches(tmp_path),
                lambda: fcache.info(fp, cache_dir=tmp_path),
                lambda: fcache.verify(fp, cache_dir=tmp_path),
            ):
                try:
                    call()
                except FastFTError:
                    pass  # a clear error; anything else fails the test
            if done:
                break
            time.sleep(0.01)
    finally:
        proc.wait(timeout=120)
    assert proc.returncode == 0, proc.stdout.read().decode()
    assert refused > 0 and opened > 0
    assert fcache.verify(fp, cache_dir=tmp_path)["complete"]


# ---------------------------------------------------------------------------- format versions
@pytest.mark.parametrize(
    "version", [FORMAT_VERSION - 1, FORMAT_VERSION + 1, str(FORMAT_VERSION), None]
)
@pytest.mark.reliability(
    "a cache folder whose manifest has an older or a newer format version, the version as a "
    "string, or none",
    "open() raises CacheCorruptError naming the version; build() rebuilds it; never misread",
)
def test_other_format_versions_are_never_read(tmp_path, version, reference):
    cache = build_on_disk(*make(), tmp_path)
    folder = cache.path
    del cache
    manifest = json.loads((folder / disk.MANIFEST).read_text())
    manifest["format_version"] = version
    (folder / disk.MANIFEST).write_text(json.dumps(manifest))
    registry.clear()
    with pytest.raises(CacheCorruptError, match="format version") as info:
        FeatureCache.open(folder)
    if isinstance(version, int):
        assert ("older" if version < FORMAT_VERSION else "newer") in str(info.value)
    assert fcache.list_caches(tmp_path)[0]["status"] == "unreadable"
    prefix, data = make()
    rebuilt = build_on_disk(prefix, data, tmp_path)
    assert prefix.calls == 10 and rebuilt.telemetry["reason"].startswith(
        "rebuilt: the cache on disk was corrupt"
    )
    assert_equals_reference(rebuilt, reference)


# ---------------------------------------------------------------------------- untrusted manifests
TRAVERSALS = [
    "../../etc/passwd",
    "/etc/passwd",
    "../victim.bin",
    "sub/tap0.bin",
    "..",
    ".",
    "",
    "manifest.json",
    "tap0.bin\0x",
    7,
    None,
]


@pytest.mark.parametrize("field", ["tap", "scales", "labels"])
@pytest.mark.parametrize("name", TRAVERSALS, ids=repr)
@pytest.mark.reliability(
    "manifest file names that escape the folder ('../../etc/passwd', '/etc/passwd', "
    "'sub/x', '..', the manifest itself, non-strings) in a complete and in an interrupted cache",
    "CacheCorruptError on open/info/verify; build() replaces the folder; no file outside "
    "is read or written",
)
def test_manifest_file_names_never_leave_the_cache_folder(tmp_path, field, name):
    root = tmp_path / "cache"
    prefix, data = make()
    cache = FeatureCache.build(
        prefix, data, tier="disk", dtype="int8", batch_size=10, cache_dir=root, progress=False
    )
    folder, fp = cache.path, cache.fingerprint
    del cache
    victim = tmp_path / "victim.bin"
    victim.write_bytes(
        b"precious" * 500
    )  # 4000 bytes: the size of tap0.bin's rows, a tempting target
    manifest = json.loads((folder / disk.MANIFEST).read_text())
    target = {
        "tap": manifest["taps"][0],
        "scales": manifest["taps"][0],
        "labels": manifest["labels"],
    }[field]
    target["scales_file" if field == "scales" else "file"] = name
    for status in ("complete", "building"):
        manifest["status"] = status
        (folder / disk.MANIFEST).write_text(json.dumps(manifest))
        registry.clear()
        for call in (
            lambda: FeatureCache.open(folder),
            lambda: fcache.info(folder),
            lambda: fcache.verify(folder),
        ):
            with pytest.raises(CacheCorruptError):
                call()
    prefix, data = make()
    rebuilt = FeatureCache.build(
        prefix, data, tier="disk", dtype="int8", batch_size=10, cache_dir=root, progress=False
    )
    assert rebuilt.fingerprint == fp and prefix.calls == 10 and rebuilt.verify()["complete"]
    assert victim.read_bytes() == b"precious" * 500
    assert Path("/etc/passwd").stat().st_size > 0


@pytest.mark.parametrize("status", ["complete", "building"])
@pytest.mark.reliability(
    "a data file replaced by a symlink to a file outside the cache (complete or interrupted)",
    "CacheCorruptError on open; build() replaces the link without writing through it",
)
def test_symlinked_data_files_are_refused(tmp_path, status):
    root = tmp_path / "cache"
    prefix, data = make()
    cache = build_on_disk(prefix, data, root)
    folder = cache.path
    del cache
    victim = tmp_path / "victim.bin"
    victim.write_bytes(
        (folder / "tap0.bin").read_bytes()
    )  # same size: the size check alone would pass
    before = victim.read_bytes()
    (folder / "tap0.bin").unlink()
    (folder / "tap0.bin").symlink_to(victim)
    manifest = json.loads((folder / disk.MANIFEST).read_text())
    manifest["status"] = status
    (folder / disk.MANIFEST).write_text(json.dumps(manifest))
    (
        folder / disk.JOURNAL
    ).unlink()  # a resume would rewrite every chunk: through the link, were it followed
    registry.clear()
    with pytest.raises(CacheCorruptError, match="symbolic link"):
        FeatureCache.open(folder)
    with pytest.raises(CacheCorruptError, match="symbolic link"):
        fcache.verify(folder)
    prefix, data = make()
    rebuilt = build_on_disk(prefix, data, root)
    assert prefix.calls == 10 and not (rebuilt.path / "tap0.bin").is_symlink()
    assert victim.read_bytes() == before


@pytest.mark.reliability(
    "an interrupted build's manifest edited to another label dtype/shape of the same size",
    "the resume notices the layout differs from the prefix's output and rebuilds; no misread",
)
def test_resume_with_a_manifest_that_lies_about_the_layout_rebuilds(tmp_path, reference):
    prefix, data = make(fail_at=5)
    with pytest.raises(KeyboardInterrupt):
        build_on_disk(prefix, data, tmp_path)
    folder = only_folder(tmp_path)
    manifest = json.loads((folder / disk.MANIFEST).read_text())
    manifest["labels"]["dtype"] = "float64"  # int64 -> float64: same bytes per label, other meaning
    (folder / disk.MANIFEST).write_text(json.dumps(manifest))
    prefix, data = make()
    cache = build_on_disk(prefix, data, tmp_path)
    assert (
        prefix.calls == 11
    )  # the check costs the first chunk once more; then everything is rebuilt
    assert cache.labels.dtype == torch.int64
    assert_equals_reference(cache, reference)
