"""A disk-cache build killed (SIGKILL) at every kind of point resumes to the same bytes.

Each case runs a real builder process that SIGKILLs itself at one precise point (hooks set
in the worker only), then builds again in this process and compares the cache's data files
byte for byte with an uninterrupted build. The prefix computes with small integers, so its
output is exact whatever the thread count or summation order: equal bytes are the proof
that no partial chunk was accepted and every lost chunk was recomputed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fastft.cache import FeatureCache, disk, journal, registry
from fastft.errors import CacheError

ROOT = Path(__file__).resolve().parent.parent
N, BATCH = 200, 10
CHUNKS = N // BATCH

SETUP = textwrap.dedent("""
    import torch
    from torch import nn

    class TwoTaps(nn.Module):
        '''Two taps from integer weights on integer inputs: every output is exact in fp32.'''
        def __init__(self, on_call=None):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.a = nn.Linear(8, 48, bias=False)
            self.b = nn.Linear(8, 16, bias=False)
            with torch.no_grad():
                for lin in (self.a, self.b):
                    lin.weight.copy_(torch.randint(-3, 4, lin.weight.shape, generator=g).float())
            self.calls, self.on_call = 0, on_call
            self.fastft_key_ignore = ("calls", "on_call")  # test instrumentation

        def forward(self, x):
            self.calls += 1
            if self.on_call is not None:
                self.on_call(self.calls)
            return self.a(x), torch.relu(self.b(x))

    def make(on_call=None):
        g = torch.Generator().manual_seed(1)
        X = torch.randint(-4, 5, (200, 8), generator=g).float()
        y = torch.randint(0, 5, (200,), generator=g)
        return TwoTaps(on_call), (X, y)

    def build(prefix, data, cache_dir):
        from fastft.cache import FeatureCache, disk, disk_build, journal, registry, writer
        return FeatureCache.build(prefix, data, tier="disk", dtype="int8", batch_size=10,
                                  cache_dir=cache_dir, progress=False)
""")
namespace: dict = {}
exec(SETUP, namespace)

# Each point: the hook that kills the worker. ``die()`` is SIGKILL of the worker itself.
WORKER = SETUP + textwrap.dedent("""
    import json as _json, os, signal, sys, time
    from pathlib import Path
    from fastft.cache import disk, disk_build, journal, registry, writer

    point, cache_dir = sys.argv[1], sys.argv[2]
    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    disk_build.COMMIT_INTERVAL_S = 0.0  # commit after every chunk: kill points are exact
    on_call = None
    if point == "in_prefix":  # inside the 8th prefix call: chunk 7 not written at all
        on_call = lambda k: k == 8 and die()
    elif point == "mid_chunk":  # chunk 7: tap a written, tap b and labels not
        check = writer.check_finite
        def _check_finite(store, rows, name, start, view, views):
            check(store, rows, name, start, view, views)
            if int(start[0]) == 70 and name == "tap0":  # start: the rows' sample positions
                die()
        writer.check_finite = _check_finite
    elif point == "written_not_committed":  # chunk 7 fully in the mapped files, not fsynced
        write = writer.Writer.write
        def write_then_die(self, chunk, *a):
            write(self, chunk, *a)
            if chunk.start == 70:
                die()
        writer.Writer.write = write_then_die
    elif point == "fsynced_not_journaled":  # chunk 7's bytes durable, the journal not written
        save, saves = journal.Journal.save, [0]
        def save_or_die(self):
            saves[0] += 1
            if saves[0] == 8:
                die()
            save(self)
        journal.Journal.save = save_or_die
    elif point in ("journal_torn", "journal_not_renamed"):
        # the 8th journal: half a tmp file / the tmp file not renamed
        dump, replace, n = _json.dump, os.replace, [0]
        def torn_dump(payload, f, **kw):
            if Path(f.name).name == "journal.json.tmp":
                n[0] += 1
                if n[0] == 8 and point == "journal_torn":
                    text = _json.dumps(payload, **kw)
                    f.write(text[: len(text) // 2]); f.flush(); os.fsync(f.fileno())
                    die()
            dump(payload, f, **kw)
        def replace_or_die(src, dst):
            if point == "journal_not_renamed" and Path(dst).name == "journal.json" and n[0] == 8:
                die()
            replace(src, dst)
        disk.json.dump, disk.os.replace = torn_dump, replace_or_die
    elif point in ("before_complete", "before_manifest"):  # every chunk committed / files made
        write_json = disk.write_json_atomic
        def write_or_die(path, payload, **kw):
            if path.name == "manifest.json":
                if (point == "before_complete") == (payload.get("status") == "complete"):
                    die()
            write_json(path, payload, **kw)
        disk.write_json_atomic = write_or_die
    elif point == "timed_commits":  # the real commit interval: some chunks written, not committed
        disk_build.COMMIT_INTERVAL_S = 0.25
        on_call = lambda k: (time.sleep(0.06), k == 15 and die())
    else:
        raise SystemExit(f"unknown point {point}")
    prefix, data = make(on_call)
    build(prefix, data, cache_dir)
    print("finished without being killed")
""")

#: point -> chunks committed when the worker dies (None: depends on timing)
POINTS = {
    "in_prefix": 7,
    "mid_chunk": 7,
    "written_not_committed": 7,
    "fsynced_not_journaled": 7,
    "journal_torn": 7,
    "journal_not_renamed": 7,
    "before_complete": CHUNKS,
    "before_manifest": 0,
    "timed_commits": None,
}
DATA_FILES = ("tap0.bin", "tap0.scales.bin", "tap1.bin", "tap1.scales.bin", "labels.bin")


pytestmark = pytest.mark.usefixtures("fresh_registry")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Bytes of every data file and the journal of an uninterrupted build."""
    root = tmp_path_factory.mktemp("reference")
    prefix, data = namespace["make"]()
    cache = namespace["build"](prefix, data, root)
    registry.clear()
    files = {name: (cache.path / name).read_bytes() for name in DATA_FILES}
    journal = json.loads((cache.path / disk.JOURNAL).read_text())
    return cache.fingerprint, files, journal


def killed_worker(point: str, cache_dir: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", WORKER, point, str(cache_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -9, f"{point}: rc={proc.returncode}\n{proc.stdout}\n{proc.stderr}"


def committed_chunks(folder: Path) -> int:
    path = folder / disk.JOURNAL
    return len(json.loads(path.read_text())["chunks"]) if path.exists() else 0


@pytest.mark.parametrize("point", list(POINTS))
@pytest.mark.reliability(
    "builder SIGKILLed at 9 points: in the prefix, mid-chunk (one tap written), written but not "
    "fsynced, fsynced but not journaled, half-written journal, journal not renamed, before "
    "'complete', before the first manifest, with the real commit interval",
    "next build resumes from the journal, recomputes exactly the uncommitted chunks, and its "
    "files equal an uninterrupted build byte for byte",
)
def test_killed_build_resumes_to_identical_bytes(point, tmp_path, reference):
    fp, ref_files, ref_journal = reference
    killed_worker(point, tmp_path)
    folder = tmp_path / fp
    committed = committed_chunks(folder)
    if POINTS[point] is not None:
        assert committed == POINTS[point]
    else:
        assert 0 < committed < 15
    if (folder / disk.MANIFEST).exists():
        # The interrupted cache is never opened as features, and what its journal lists is intact.
        with pytest.raises(CacheError, match="incomplete"):
            FeatureCache.open(folder)
        assert journal.verify_folder(folder)["complete"] is (committed == CHUNKS)
    prefix, data = namespace["make"]()
    cache = namespace["build"](prefix, data, tmp_path)
    assert (
        prefix.calls == CHUNKS - committed
    )  # committed chunks are reused, every other one recomputed
    assert cache.fingerprint == fp and cache.verify()["complete"]
    for name in DATA_FILES:
        assert (folder / name).read_bytes() == ref_files[name], (
            f"{name} differs after a kill at {point}"
        )
    assert json.loads((folder / disk.JOURNAL).read_text()) == ref_journal
    assert not (folder / (disk.JOURNAL + ".tmp")).exists()
