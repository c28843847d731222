"""The ``fastft`` command line: version, cache management, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

import fastft
from fastft.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fastft.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_version():
    out = run_cli("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"fastft {fastft.__version__}"


@pytest.fixture
def disk_cache(tmp_path):
    torch.manual_seed(0)
    prefix = nn.Sequential(nn.Linear(6, 5)).requires_grad_(False)
    X, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    cache = fastft.FeatureCache.build(
        prefix, (X, y), tier="disk", cache_dir=str(tmp_path), progress=False
    )
    return cache, tmp_path


def test_cache_ls_info_verify_rm(disk_cache, capsys):
    cache, root = disk_cache
    assert main(["cache", "--cache-dir", str(root), "ls"]) == 0
    listing = capsys.readouterr().out
    assert cache.fingerprint[:16] in listing and "complete" in listing

    assert main(["cache", "--cache-dir", str(root), "--json", "info", cache.fingerprint[:10]]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_rows"] == 40 and info["fingerprint"] == cache.fingerprint

    assert main(["cache", "--cache-dir", str(root), "verify", cache.fingerprint]) == 0
    assert "ok" in capsys.readouterr().out

    assert main(["cache", "--cache-dir", str(root), "rm", cache.fingerprint]) == 0
    assert main(["cache", "--cache-dir", str(root), "ls"]) == 0
    assert "no caches" in capsys.readouterr().out


def test_corrupt_cache_fails_verify_with_exit_2(disk_cache, capsys):
    cache, root = disk_cache
    data = sorted(p for p in cache.path.iterdir() if p.suffix == ".bin" and "label" not in p.name)[
        0
    ]
    raw = bytearray(data.read_bytes())
    raw[3] ^= 0xFF
    data.write_bytes(bytes(raw))
    assert main(["cache", "--cache-dir", str(root), "verify", cache.fingerprint]) == 2
    assert "fastft: error:" in capsys.readouterr().err


def test_unknown_cache_is_a_clear_error(tmp_path, capsys):
    assert main(["cache", "--cache-dir", str(tmp_path), "info", "deadbeef"]) == 2
    assert "no fastft cache 'deadbeef'" in capsys.readouterr().err


def test_bad_arguments_exit_with_usage():
    out = run_cli("demo", "--task", "imagenet")
    assert out.returncode == 2 and "invalid choice" in out.stderr
