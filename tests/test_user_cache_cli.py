"""The cache says what it did (one log line per build), prunes what will not be used again,
and its command line reads like one: options after the subcommand, readable info and verify."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from fastft.cache import FeatureCache, manage, registry
from fastft.cache.telemetry import because
from fastft.cli import main

from helpers.caches import build_on_disk


@pytest.fixture(autouse=True)
def fresh_process():
    """Each test sees only its own cache dir (this process's caches are found by key)."""
    registry.clear()


def prefix(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5)).requires_grad_(False)


def data(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def labelled_build(p, X_y, root, label):
    """A disk build whose progress label ("train cache") names it, as a FineTuner's does."""
    return FeatureCache.build(
        p, X_y, tier="disk", dtype="fp32", batch_size=10, cache_dir=root, progress=label
    )


def reason(cache) -> str:
    return cache.telemetry["reason"]


def decisions(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "fastft.cache"]


def set_last_use(cache, seconds_ago: float) -> None:
    t = manage.time.time() - seconds_ago
    os.utime(cache.path / "manifest.json", (t, t))


# ---------------------------------------------------------------------------- the log line
def test_one_line_per_build_says_hit_or_why_it_was_rebuilt(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fastft")
    p, X_y = prefix(), data()
    first = labelled_build(p, X_y, tmp_path, "train cache")
    (line,) = decisions(caplog)
    assert line.startswith("train cache: built in ") and f"disk at {first.path}" in line
    # Why it was built ("new: no cache with this key" in a fresh process; the nearest cache
    # this process saw otherwise) ends the line.
    assert "fp32" in line and "40x5" in line and line.endswith(f"({because(reason(first))})")

    caplog.clear()
    labelled_build(p, X_y, tmp_path, "train cache")
    assert decisions(caplog) == [
        f"train cache: hit on disk at {first.path} (0.001 MiB, fp32, 40x5)"
    ]

    caplog.clear()
    with torch.no_grad():
        p[0].weight.add_(1.0)
    labelled_build(p, X_y, tmp_path, "val cache")
    (line,) = decisions(caplog)
    assert line.startswith("val cache: built in ")
    assert line.endswith("(rebuilt because the frozen weights changed)")


def test_fit_labels_its_train_and_val_caches(tmp_path, caplog):
    import fastft

    caplog.set_level(logging.INFO, logger="fastft")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5))
    ft = fastft.FineTuner(model, num_classes=3, cache="disk", cache_dir=tmp_path)
    X, y = data(32)
    ft.fit((X, y), val=(X[:16], y[:16]), epochs=1, batch_size=8)
    lines = decisions(caplog)
    assert sum(line.startswith("train cache: built") for line in lines) == 1
    (val,) = (line for line in lines if line.startswith("val cache: built"))
    # Its nearest cache is the train cache, other data: not "rebuilt", nothing was replaced.
    assert val.endswith("(no cache of these data yet: new data, or the data changed)")


SCRIPT = textwrap.dedent(
    """
    import logging, sys, torch
    from torch import nn
    from fastft import FeatureCache
    p = nn.Sequential(nn.Linear(6, 5)).requires_grad_(False)
    X, y = torch.randn(20, 6), torch.randint(0, 3, (20,))
    FeatureCache.build(p, (X, y), tier="host")
    FeatureCache.build(p, (X + 2, y), tier="host", progress=False)  # asked to be quiet
    print("--- silenced", file=sys.stderr, flush=True)
    logging.getLogger("fastft").setLevel(logging.WARNING)
    FeatureCache.build(p, (X + 1, y), tier="host")
    """
)


def test_the_line_is_printed_without_logging_setup_unless_quiet_or_silenced(tmp_path):
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, FASTFT_CACHE_DIR=str(tmp_path)),
    )
    assert out.returncode == 0, out.stderr
    before, after = out.stderr.split("--- silenced")
    assert before.count("cache: built in") == 1 and "host memory (new: no cache" in before
    assert "cache:" not in after


# ---------------------------------------------------------------------------- prune
def three_caches(root):
    """An old cache, the newer one that supersedes it (other weights), and another data's."""
    p, X_y = prefix(), data()
    old = build_on_disk(p, X_y, root)
    with torch.no_grad():
        p[0].bias.add_(1.0)
    new = build_on_disk(p, X_y, root)
    other = build_on_disk(p, data(30, seed=1), root)
    set_last_use(old, 300)
    return old, new, other


def test_prune_keeps_the_newest_per_model_and_data(tmp_path, capsys):
    old, new, other = three_caches(tmp_path)
    assert main(["cache", "prune", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"removed {old.fingerprint[:12]}" in out
    assert f"superseded by {new.fingerprint[:12]} (the frozen weights changed)" in out
    assert not old.path.exists() and new.path.exists() and other.path.exists()
    assert main(["cache", "prune", "--cache-dir", str(tmp_path)]) == 0
    assert "nothing to prune" in capsys.readouterr().out


def test_dry_run_deletes_nothing(tmp_path, capsys):
    old, new, other = three_caches(tmp_path)
    assert (
        main(["cache", "prune", "--dry-run", "--max-size", "1", "--cache-dir", str(tmp_path)]) == 0
    )
    out = capsys.readouterr().out
    assert f"would remove {old.fingerprint[:12]}" in out and "removed" not in out.replace(
        "would remove", ""
    )
    assert old.path.exists() and new.path.exists() and other.path.exists()


def test_max_size_evicts_the_least_recently_used(tmp_path, capsys):
    p = prefix()
    caches = [build_on_disk(p, data(40, seed=s), tmp_path) for s in range(3)]
    for age, cache in zip((100, 300, 200), caches):  # caches[1] is the least recently used
        set_last_use(cache, age)
    size = manage.info(caches[0].path)["disk_bytes"]
    assert main(["cache", "prune", "--max-size", str(2 * size), "--cache-dir", str(tmp_path)]) == 0
    assert "least recently used" in capsys.readouterr().out
    assert [c.path.exists() for c in caches] == [True, False, True]
    assert main(["cache", "prune", "--max-size", "1", "--cache-dir", str(tmp_path)]) == 0
    assert not any(c.path.exists() for c in caches)


def test_older_than_removes_caches_unused_for_that_long(tmp_path):
    p = prefix()
    recent, stale = (build_on_disk(p, data(40, seed=s), tmp_path) for s in range(2))
    set_last_use(stale, 3 * 86400)
    done = manage.prune(tmp_path, older_than_days=2)
    assert [e["fingerprint"] for e in done if e["removed"]] == [stale.fingerprint]
    assert recent.path.exists() and not stale.path.exists()


def test_the_size_cap_after_a_build_never_evicts_a_cache_in_use(tmp_path, monkeypatch):
    p = prefix()
    held = build_on_disk(p, data(40, seed=0), tmp_path)  # held by this test: in use
    set_last_use(held, 900)
    unused = build_on_disk(p, data(40, seed=1), tmp_path)
    set_last_use(unused, 600)
    fingerprint = unused.fingerprint
    del unused
    registry.forget(fingerprint)  # no longer used by this process
    monkeypatch.setenv("FASTFT_CACHE_MAX_SIZE", "1")
    newest = build_on_disk(p, data(40, seed=2), tmp_path)
    assert held.path.exists() and newest.path.exists()
    assert not (tmp_path / fingerprint).exists()


def test_prune_never_touches_what_fastft_does_not_own(tmp_path, capsys):
    old, new, _ = three_caches(tmp_path)
    (old.path / "notes.txt").write_text("mine")  # someone's file in a superseded cache
    plain = tmp_path / "photos"
    plain.mkdir()
    (plain / "cat.jpg").write_text("x")
    elsewhere = tmp_path.parent / (tmp_path.name + "-elsewhere")
    linked = build_on_disk(prefix(), data(40, seed=5), elsewhere)
    set_last_use(linked, 10**6)
    (tmp_path / linked.fingerprint).symlink_to(linked.path)  # a link in the cache dir
    assert main(["cache", "prune", "--max-size", "1", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert (old.path / "notes.txt").read_text() == "mine" and "files fastft did not write" in out
    assert (plain / "cat.jpg").exists()
    assert linked.path.exists() and "symbolic link" in out
    assert not new.path.exists()  # a fastft cache it owns: evicted for --max-size


def test_max_size_that_cannot_be_read_is_a_clear_error(tmp_path, capsys):
    assert main(["cache", "prune", "--max-size", "lots", "--cache-dir", str(tmp_path)]) == 2
    assert "cannot read --max-size='lots'" in capsys.readouterr().err


# ---------------------------------------------------------------------------- the command line
@pytest.fixture
def disk_cache(tmp_path):
    return build_on_disk(prefix(), data(), tmp_path), tmp_path


def test_options_are_accepted_after_the_subcommand(disk_cache, capsys):
    cache, root = disk_cache
    assert main(["cache", "ls", "--cache-dir", str(root)]) == 0
    assert cache.fingerprint[:12] in capsys.readouterr().out
    assert main(["cache", "ls", "--cache-dir", str(root), "--json"]) == 0
    (entry,) = json.loads(capsys.readouterr().out)
    assert entry["fingerprint"] == cache.fingerprint and entry["complete"] is True
    assert main(["cache", "--cache-dir", str(root), "ls", "--json"]) == 0  # both places at once
    assert json.loads(capsys.readouterr().out)[0]["fingerprint"] == cache.fingerprint
    with pytest.raises(SystemExit):
        main(["cache", "ls", "--help"])
    helptext = capsys.readouterr().out
    assert "--cache-dir" in helptext and "--json" in helptext


def test_info_says_complete_dtype_shapes_and_what_it_caches(disk_cache, capsys):
    cache, root = disk_cache
    assert main(["cache", "info", cache.fingerprint[:10], "--cache-dir", str(root)]) == 0
    fields = dict(
        line.split(": ", 1) for line in capsys.readouterr().out.splitlines() if ": " in line
    )
    fields = {k.strip(): v for k, v in fields.items()}
    assert fields["complete"] == "yes" and fields["dtype"] == "fp32"
    assert fields["rows x dims"] == "40x5"
    assert (
        fields["model"] == "Sequential (35 frozen parameters)"
        and fields["data"] == "the (X, y) tensors, 40 samples"
    )
    assert "KiB" in fields["size on disk"] and "ago" in fields["created"]


class Interrupted(nn.Module):
    """A prefix whose build is interrupted (Ctrl-C) in its third batch."""

    def __init__(self):
        super().__init__()
        self.inner, self.calls = prefix(), 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 3:
            raise KeyboardInterrupt
        return self.inner(x)


def test_an_interrupted_cache_reads_as_partial(tmp_path, capsys):
    with pytest.raises(KeyboardInterrupt):
        build_on_disk(Interrupted(), data(), tmp_path)
    (folder,) = (p for p in tmp_path.iterdir() if not p.name.startswith("."))
    assert main(["cache", "ls", "--cache-dir", str(tmp_path)]) == 0
    assert " partial " in capsys.readouterr().out
    assert main(["cache", "info", folder.name, "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "complete: no (2 chunk(s) committed; building it again resumes)" in out
    assert main(["cache", "verify", folder.name, "--cache-dir", str(tmp_path)]) == 0
    assert "is intact but partial: 2 chunk(s) committed" in capsys.readouterr().out


def test_verify_prints_a_verdict(disk_cache, capsys):
    cache, root = disk_cache
    assert main(["cache", "verify", cache.fingerprint, "--cache-dir", str(root)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"ok: cache {cache.fingerprint[:12]} is complete and intact")
    assert "{" not in out
    assert main(["cache", "verify", cache.fingerprint, "--cache-dir", str(root), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["complete"] is True
