"""Fuzzing the readers of a cache folder: any manifest or journal, random bytes, random JSON
or a valid one mutated, gives a FastFTError or a correct cache, never another exception.

"Correct" is checked, not assumed: whenever a fuzzed folder opens, its rows are compared
with the rows of the pristine cache, and whenever a build accepts it, the result's bytes
equal a clean build's.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fastft.cache as fcache
from fastft.cache import FeatureCache, disk, journal, registry
from fastft.errors import FastFTError

FUZZ = settings(
    max_examples=int(__import__("os").environ.get("FASTFT_FUZZ_EXAMPLES", 60)),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def make():
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(6, 16, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.randint(-3, 4, lin.weight.shape, generator=g).float())
    X = torch.randint(-4, 5, (40, 6), generator=g).float()
    return lin, (X, torch.randint(0, 3, (40,), generator=g))


def build(root, prefix=None, data=None):
    if prefix is None:
        prefix, data = make()
    registry.clear()
    return FeatureCache.build(
        prefix, data, tier="disk", dtype="int8", batch_size=10, cache_dir=root, progress=False
    )


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A complete cache folder, its rows, and its data files' bytes."""
    root = tmp_path_factory.mktemp("pristine")
    cache = build(root)
    rows = cache.gather(torch.arange(40))[0].clone()
    files = {p.name: p.read_bytes() for p in cache.path.iterdir() if p.suffix == ".bin"}
    manifest = json.loads((cache.path / disk.MANIFEST).read_text())
    journal = json.loads((cache.path / disk.JOURNAL).read_text())
    return root, cache.path.name, rows, files, manifest, journal


class Copy:
    """A fresh copy of the pristine cache dir per example (hypothesis reuses the fixture)."""

    def __init__(self, pristine):
        self.tmp = tempfile.TemporaryDirectory()
        self.root = Path(self.tmp.name) / "cache"
        shutil.copytree(pristine[0], self.root)
        self.folder = self.root / pristine[1]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.tmp.cleanup()


def read_everything(folder: Path, rows: torch.Tensor) -> None:
    """Every reader of a folder: each must raise FastFTError or give correct rows."""
    try:
        cache = FeatureCache.open(folder)
    except FastFTError:
        pass
    else:  # it opened: then it must hold the true rows
        torch.testing.assert_close(cache.gather(torch.arange(40))[0], rows, rtol=0, atol=0)
        del cache
    for call in (
        lambda: fcache.info(folder),
        lambda: fcache.verify(folder),
        lambda: journal.verify_folder(folder),
        lambda: disk.read_manifest(folder),
        lambda: journal.Journal(folder),
    ):
        try:
            call()
        except FastFTError:
            pass
    listed = fcache.list_caches(folder.parent)  # list never raises: unreadable caches say so
    assert len(listed) == 1


def build_again(c: Copy, files: dict) -> None:
    """A build over the fuzzed folder: FastFTError, or a cache whose files equal the clean ones."""
    try:
        cache = build(c.root)
    except FastFTError:
        return
    try:  # a complete cache with a damaged journal opens (its rows are intact); verify() reports it
        assert cache.verify()["complete"]
    except FastFTError:
        pass
    for name, data in files.items():
        assert (cache.path / name).read_bytes() == data, name


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=12), inner, max_size=5)
    ),
    max_leaves=25,
)


@st.composite
def mutated(draw, base: dict):
    """``base`` with 1-3 random edits: a value replaced by random JSON, a key deleted, an
    integer nudged, a string changed, a list emptied or doubled."""
    doc = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        paths = []

        def walk(node, path, paths=paths):
            paths.append(path)
            if isinstance(node, dict):
                for k, v in node.items():
                    walk(v, path + [k])
            elif isinstance(node, list):
                for i, v in enumerate(node):
                    walk(v, path + [i])

        walk(doc, [])
        if len(paths) == 1:  # everything was deleted already
            break
        path = draw(st.sampled_from(paths[1:]))
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        key, old = path[-1], parent[path[-1]]
        op = draw(st.sampled_from(["replace", "delete", "nudge", "string", "list"]))
        if op == "delete" and isinstance(parent, dict):
            del parent[key]
        elif op == "nudge" and isinstance(old, int) and not isinstance(old, bool):
            parent[key] = old + draw(st.sampled_from([-1, 1, -old, old, 2**40]))
        elif op == "string" and isinstance(old, str):
            parent[key] = draw(
                st.sampled_from(
                    [
                        "",
                        "../" + old,
                        "/" + old,
                        old + "x",
                        old.upper(),
                        "float64",
                        "int8",
                        "tap0.bin",
                        "labels.bin",
                        "complete",
                        "building",
                    ]
                )
            )
        elif op == "list" and isinstance(old, list):
            parent[key] = draw(st.sampled_from([[], old + old, old[:1]]))
        else:
            parent[key] = draw(json_values)
    return doc


# ---------------------------------------------------------------------------- manifests
@FUZZ
@given(raw=st.binary(max_size=300))
@pytest.mark.reliability(
    "hypothesis: random bytes as manifest.json",
    "FastFTError from every reader, never another exception",
)
def test_random_bytes_manifest(pristine, raw):
    with Copy(pristine) as c:
        (c.folder / disk.MANIFEST).write_bytes(raw)
        read_everything(c.folder, pristine[2])


@FUZZ
@given(doc=json_values)
@pytest.mark.reliability(
    "hypothesis: random JSON (any type, nesting, huge ints, NaN) as manifest.json",
    "FastFTError from every reader, never another exception",
)
def test_random_json_manifest(pristine, doc):
    with Copy(pristine) as c:
        (c.folder / disk.MANIFEST).write_text(json.dumps(doc))
        read_everything(c.folder, pristine[2])


def test_deeply_nested_json_is_a_cache_error(pristine):
    with Copy(pristine) as c:
        (c.folder / disk.MANIFEST).write_text("[" * 100000 + "]" * 100000)
        read_everything(c.folder, pristine[2])


@FUZZ
@given(data=st.data())
@pytest.mark.reliability(
    "hypothesis: a valid manifest with 1-3 random edits (values, deleted keys, nudged sizes, "
    "traversal names, dtypes), as a complete and as an interrupted cache",
    "readers: FastFTError or the true rows; build(): FastFTError or bytes equal to a clean build",
)
def test_mutated_manifest(pristine, data):
    doc = data.draw(mutated(pristine[4]))
    status = data.draw(st.sampled_from(["keep", "building"]))
    if status == "building" and isinstance(doc, dict):
        doc["status"] = "building"
    with Copy(pristine) as c:
        (c.folder / disk.MANIFEST).write_text(json.dumps(doc))
        read_everything(c.folder, pristine[2])
        build_again(c, pristine[3])


# ---------------------------------------------------------------------------- journals
journals = st.one_of(
    st.binary(max_size=200).map(lambda b: ("bytes", b)),
    json_values.map(lambda d: ("json", d)),
)


@FUZZ
@given(data=st.data())
@pytest.mark.reliability(
    "hypothesis: journal.json as random bytes, random JSON, or the valid journal mutated "
    "(counts, bounds, checksums), in a complete and an interrupted cache",
    "verify/info: FastFTError or OK; a resumed build recomputes what it cannot trust and "
    "equals a clean build byte for byte",
)
def test_fuzzed_journal(pristine, data):
    kind = data.draw(st.sampled_from(["bytes", "json", "mutated"]))
    if kind == "bytes":
        raw = data.draw(st.binary(max_size=200))
    elif kind == "json":
        raw = json.dumps(data.draw(json_values)).encode()
    else:
        raw = json.dumps(data.draw(mutated(pristine[5]))).encode()
    with Copy(pristine) as c:
        (c.folder / disk.JOURNAL).write_bytes(raw)
        if data.draw(st.booleans()):
            manifest = dict(pristine[4], status="building")
            (c.folder / disk.MANIFEST).write_text(json.dumps(manifest))
        read_everything(c.folder, pristine[2])
        build_again(c, pristine[3])


# ---------------------------------------------------------------------------- the CLI
def run_cli(argv: list[str]) -> int:
    """``fastft ...`` in this process, output swallowed; argparse's usage errors exit with 2."""
    import contextlib
    import io

    from fastft.cli import main

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            return main(argv)
        except SystemExit as exc:
            return exc.code


@FUZZ
@given(data=st.data())
@pytest.mark.reliability(
    "hypothesis: `fastft cache ls|info|verify|rm` (plain and --json) on folders whose manifest "
    "or journal is random bytes, random JSON or a mutated valid file, and with random arguments",
    "exit code 0 or 2 with a message; never a traceback",
)
def test_cache_cli_on_fuzzed_folders(pristine, data):
    pytest.importorskip("fastft.cli")
    target = data.draw(st.sampled_from([disk.MANIFEST, disk.JOURNAL]))
    kind = data.draw(st.sampled_from(["bytes", "json", "mutated", "intact"]))
    base = pristine[4] if target == disk.MANIFEST else pristine[5]
    raw = {
        "bytes": lambda: data.draw(st.binary(max_size=200)),
        "json": lambda: json.dumps(data.draw(json_values)).encode(),
        "mutated": lambda: json.dumps(data.draw(mutated(base))).encode(),
        "intact": lambda: json.dumps(base).encode(),
    }[kind]()
    with Copy(pristine) as c:
        (c.folder / target).write_bytes(raw)
        name = data.draw(
            st.sampled_from(
                [c.folder.name, c.folder.name[:6], str(c.folder), "", "0", "../..", "/"]
            )
        )
        extra = data.draw(st.lists(st.text(max_size=8), max_size=2))
        for cmd in (
            ["ls"],
            ["info", name],
            ["verify", name],
            ["rm", name],
            [data.draw(st.text(max_size=6))],
        ):
            for flags in ([], ["--json"]):
                code = run_cli(
                    ["cache", "--cache-dir", str(c.root), *flags, *cmd]
                    + (extra if cmd == ["ls"] else [])
                )
                assert code in (0, 2), (cmd, flags, code)
