"""fastft.hashing on code: a function is keyed by what it reads, including modules it
imports inside its body (loaded, on disk, or nowhere to be found), builtins bound to an
object, and library functions replaced at run time."""

from __future__ import annotations

import importlib
import os
import sys

import numpy as np
import pytest
import torch.nn.functional as F

from fastft.hashing import content_hash

MODULE = "fastft_test_imported_cfg"


def uses_imported_module(x):
    import fastft_test_imported_cfg  # noqa: F401 - imported inside: the key must read it

    return x


@pytest.fixture
def module_dir(tmp_path, monkeypatch):
    """A folder on sys.path for the module the function imports, never left loaded."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, MODULE, raising=False)
    importlib.invalidate_caches()
    yield tmp_path
    sys.modules.pop(MODULE, None)


def test_an_unloaded_imported_module_is_read_from_its_source(module_dir):
    source = module_dir / f"{MODULE}.py"
    source.write_text("SCALE = 2\n")
    first, opaque = content_hash(uses_imported_module)
    assert opaque == [] and MODULE not in sys.modules  # read, not imported
    assert content_hash(uses_imported_module)[0] == first
    source.write_text("SCALE = 3\n")
    assert content_hash(uses_imported_module)[0] != first


def test_a_loaded_imported_module_is_read_by_value(module_dir):
    (module_dir / f"{MODULE}.py").write_text("SCALE = 2\n")
    module = importlib.import_module(MODULE)
    first, opaque = content_hash(uses_imported_module)
    assert opaque == []
    module.SCALE = 5  # changed in memory, not on disk: what runs is what counts
    assert content_hash(uses_imported_module)[0] != first


def test_an_imported_module_that_cannot_be_found_is_opaque(module_dir):
    _, opaque = content_hash(uses_imported_module)
    assert len(opaque) == 1 and f"imports {MODULE}, which cannot be found" in opaque[0]


def test_a_builtin_that_reads_a_file_is_opaque():
    _, opaque = content_hash(np.fromfile)
    assert len(opaque) == 1 and "numpy.fromfile reads a file" in opaque[0]
    assert content_hash(np.frombuffer)[1] == []  # reads its argument, not a file


def test_a_bound_builtin_method_is_keyed_by_its_object():
    a, b = [1, 2], [1, 3]
    assert content_hash(a.count)[0] == content_hash([1, 2].count)[0]
    assert content_hash(a.count)[0] != content_hash(b.count)[0]
    assert content_hash(a.count)[0] != content_hash(a.index)[0]


def activation(x):
    return F.gelu(x)


def test_a_replaced_library_function_changes_the_key(monkeypatch):
    plain, opaque = content_hash(activation)
    assert opaque == []
    monkeypatch.setattr(F, "gelu", F.relu)  # F.gelu = F.relu: what runs is relu
    assert content_hash(activation)[0] != plain
    monkeypatch.undo()
    assert content_hash(activation)[0] == plain


# ---------------------------------------------------------------- code that reads the outside
# A transform that reads files or processes computes what its key cannot see: opaque.
load = np.load


def imports_subprocess(x):
    import subprocess  # noqa: F401

    return x


def uses_os(x):
    return os.getcwd()


def calls_an_alias_of_np_load(x):
    return load(x)


def calls_open(x):
    with open(x) as f:
        return f.read()


def calls_np_load(x):
    return np.load(x)


def pure(x):
    return np.tanh(x) * 2


@pytest.mark.parametrize(
    "fn, why",
    [
        (imports_subprocess, "imports the module subprocess (files, sockets or processes)"),
        (uses_os, "uses the module os (files, sockets or processes)"),
        (calls_an_alias_of_np_load, "calls numpy.load (reads a file)"),
        (calls_open, "calls the builtin open()"),
        (calls_np_load, "calls numpy.load (reads a file)"),
    ],
    ids=lambda v: getattr(v, "__name__", ""),
)
def test_code_that_reads_the_outside_world_is_opaque(fn, why):
    _, opaque = content_hash(fn)
    assert len(opaque) == 1 and why in opaque[0], opaque


def test_pure_library_calls_are_not_opaque():
    assert content_hash(pure)[1] == []
