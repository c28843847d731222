"""What a piece of Python code reads, and whose code it is: the facts a cache key needs about code.

- :func:`library_version` / :func:`is_library_code`: code of the standard library and of
  installed packages (from an index or a wheel, not a local directory) is identified by name
  and installed version; anything else (scripts, notebooks, ``pip install -e .`` or
  ``pip install .`` of a local project, modules on ``sys.path``) is the user's and is hashed
  by value. A function is library code only if its bytecode lives in its package's files, so
  a user's wrapper that ``functools.wraps`` a library function stays the user's.
- :func:`global_names`, :func:`attribute_chains`, :func:`imports`: read from the bytecode
  (``dis``), so that ``self.x`` is not mistaken for the global ``x`` and ``cfg.sub.MEAN`` is
  followed through the module ``cfg.sub``.
- :func:`outside_reads`: the names through which code reads the outside world (files, other
  processes, dynamic namespaces), which no hash of objects can see.
"""

from __future__ import annotations

import dis
import functools
import json
import os
import sys
import sysconfig
import types
from importlib import metadata

__all__ = [
    "library_version",
    "is_library_module",
    "is_library_code",
    "global_names",
    "attribute_chains",
    "imports",
    "outside_reads",
    "IMPURE_BUILTINS",
]

#: Builtins that read the outside world or a namespace by computed name.
IMPURE_BUILTINS = frozenset(
    {
        "open",
        "input",
        "exec",
        "eval",
        "compile",
        "__import__",
        "breakpoint",
        "globals",
        "locals",
        "vars",
    }
)
#: Modules through which code reads files, sockets or other processes.
IMPURE_MODULES = frozenset(
    {
        "os",
        "io",
        "pathlib",
        "shutil",
        "glob",
        "fnmatch",
        "tempfile",
        "socket",
        "ssl",
        "select",
        "urllib",
        "http",
        "requests",
        "subprocess",
        "sqlite3",
        "mmap",
        "fcntl",
        "signal",
        "multiprocessing",
        "h5py",
        "zarr",
        "lmdb",
        "webdataset",
        "importlib",
        "pickle",
        "shelve",
        "dbm",
        "csv",
        "zipfile",
        "tarfile",
        "gzip",
        "bz2",
        "lzma",
        "linecache",
    }
)
#: Library functions that read files (reached as ``module.function`` or imported by name).
IMPURE_FUNCTIONS = frozenset(
    {
        "numpy.load",
        "numpy.loadtxt",
        "numpy.genfromtxt",
        "numpy.fromfile",
        "numpy.memmap",
        "numpy.fromregex",
        "torch.load",
        "torch.from_file",
        "torch.serialization.load",
        "PIL.Image.open",
        "json.load",
        "sys.modules",
        "cv2.imread",
        "imageio.imread",
        "imageio.v3.imread",
        "soundfile.read",
        "librosa.load",
        "torchaudio.load",
        "torchvision.io.read_image",
        "torchvision.io.read_file",
        "torchvision.io.decode_image",
        "safetensors.torch.load_file",
        "pandas.read_csv",
        "pandas.read_parquet",
        "pandas.read_json",
        "pandas.read_pickle",
        "pandas.read_feather",
        "pandas.read_hdf",
        "pandas.read_excel",
        "builtins.open",
        "codecs.open",
        "numpy.lib.format.open_memmap",
        "safetensors.safe_open",
        "safetensors.numpy.load_file",
        "safetensors._safetensors_rust.safe_open",
        "tokenizers.Tokenizer.from_file",
    }
)
#: Packages that are library code even when installed from a local directory (this one, in
#: development) or whose installed version names their code exactly.
ALWAYS_LIBRARY = frozenset({"fastft", "torch", "numpy", "builtins"})


# ---------------------------------------------------------------------------- whose code
def _top(module_name: str | None) -> str:
    return (module_name or "").partition(".")[0]


@functools.cache
def _distributions() -> dict[str, list[str]]:
    return metadata.packages_distributions()


def _from_local_source(dist: metadata.Distribution) -> bool:
    """Installed from a local directory or a repository (PEP 610), editable or not: the
    user's own project, whose code can change without its version."""
    try:
        direct = json.loads(dist.read_text("direct_url.json") or "{}")
    except ValueError:
        return True
    return "dir_info" in direct or "vcs_info" in direct


@functools.cache
def library_version(top: str) -> str | None:
    """``name==version`` of the library providing the top-level package ``top``; None when
    ``top`` is the user's code."""
    if top in ALWAYS_LIBRARY:
        mod = sys.modules.get(top)
        return f"{top}=={getattr(mod, '__version__', '?')}"
    if top in sys.stdlib_module_names or top in sys.builtin_module_names:
        return f"python=={sys.version.split()[0]}"
    for dist_name in _distributions().get(top, []):
        try:
            dist = metadata.distribution(dist_name)
        except metadata.PackageNotFoundError:
            continue
        if _from_local_source(dist) or not _installed(dist):
            return None
        return f"{dist_name}=={dist.version}"
    return None


def _installed(dist: metadata.Distribution) -> bool:
    """Whether a distribution's metadata lies in a folder of installed packages (not the
    ``*.egg-info`` a build left in the user's project folder, found through ``sys.path``)."""
    try:
        where = os.path.realpath(str(dist.locate_file(""))) + os.sep
    except Exception:
        return False
    return any(where.startswith(root) for root in _library_roots())


def is_library_module(module_name: str | None) -> bool:
    """True for a module of the standard library or of an installed library."""
    return bool(module_name) and library_version(_top(module_name)) is not None


def is_library_code(module_name: str | None, code: types.CodeType | None) -> bool:
    """Whether a function (its ``__module__`` and code) is library code: its module is a
    library's and its bytecode comes from a library's files (a library's decorator may wrap
    another library's function; code generated at run time by a library, with no file,
    counts as the library's). A user's function that ``functools.wraps`` a library function
    claims the library's module, but its bytecode is the user's."""
    if not is_library_module(module_name) or module_name == "builtins":
        return False
    if code is None or code.co_filename.startswith("<"):  # generated (a dataclass's __init__)
        return True
    return _file_is_library(code.co_filename)


@functools.lru_cache(maxsize=4096)
def _file_is_library(filename: str) -> bool:
    real = os.path.realpath(filename)
    for root in _library_roots():
        if real.startswith(root):
            top = real[len(root) :].split(os.sep, 1)[0].removesuffix(".py")
            return root in _stdlib_roots() or library_version(top) is not None
    return False


@functools.lru_cache(maxsize=1)
def _stdlib_roots() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    return tuple(
        os.path.realpath(paths[k]) + os.sep for k in ("stdlib", "platstdlib") if k in paths
    )


@functools.lru_cache(maxsize=1)
def _library_roots() -> tuple[str, ...]:
    """Folders that hold installed packages (site-packages) and the standard library,
    the most specific first."""
    paths = sysconfig.get_paths()
    roots = {os.path.realpath(paths[k]) + os.sep for k in ("purelib", "platlib") if k in paths}
    roots |= {
        os.path.realpath(p) + os.sep
        for p in sys.path
        if p.endswith(("site-packages", "dist-packages"))
    }
    for top in ALWAYS_LIBRARY:  # fastft itself in development: its checkout holds it
        file = getattr(sys.modules.get(top), "__file__", None)
        if file:
            roots.add(os.path.dirname(os.path.dirname(os.path.realpath(file))) + os.sep)
    return tuple(sorted(roots, key=len, reverse=True)) + _stdlib_roots()


# ---------------------------------------------------------------------------- what code reads
_GLOBAL_OPS = frozenset(
    {"LOAD_GLOBAL", "STORE_GLOBAL", "DELETE_GLOBAL", "LOAD_NAME", "STORE_NAME", "DELETE_NAME"}
)
_ATTR_OPS = frozenset({"LOAD_ATTR", "LOAD_METHOD"})
#: Where an attribute chain can start: a global, or a variable of an enclosing function (a
#: module imported there and used in a closure).
_CHAIN_HEADS = frozenset({"LOAD_GLOBAL", "LOAD_NAME", "LOAD_DEREF", "LOAD_CLASSDEREF"})


def _codes(code: types.CodeType):
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _codes(const)


@functools.lru_cache(maxsize=4096)
def global_names(code: types.CodeType) -> frozenset[str]:
    """Names the code (nested code objects too) loads or stores as globals."""
    return frozenset(
        ins.argval
        for c in _codes(code)
        for ins in dis.get_instructions(c)
        if ins.opname in _GLOBAL_OPS
    )


@functools.lru_cache(maxsize=4096)
def attribute_chains(code: types.CodeType) -> frozenset[tuple[str, ...]]:
    """``(name, attr, attr, ...)`` for every global or closure variable the code reads
    attributes of, e.g. ``("cfg", "sub", "MEAN")`` for ``cfg.sub.MEAN`` and ``("np", "load")``
    for ``np.load(...)``."""
    chains = set()
    for c in _codes(code):
        chain: list[str] = []
        for ins in dis.get_instructions(c):
            if ins.opname in _CHAIN_HEADS:
                if len(chain) > 1:
                    chains.add(tuple(chain))
                chain = [ins.argval]
            elif ins.opname in _ATTR_OPS and chain:
                chain.append(ins.argval)
            elif ins.opname in ("CACHE", "PRECALL", "EXTENDED_ARG", "NOP"):
                continue
            else:
                if len(chain) > 1:
                    chains.add(tuple(chain))
                chain = []
        if len(chain) > 1:
            chains.add(tuple(chain))
    return frozenset(chains)


@functools.lru_cache(maxsize=4096)
def escaping_globals(code: types.CodeType) -> frozenset[str]:
    """Globals the code uses other than by reading an attribute of them (passed to a call,
    given a local name, indexed): a module used so may be read anywhere, by any name."""
    escaped = set()
    for c in _codes(code):
        instructions = [
            i
            for i in dis.get_instructions(c)
            if i.opname not in ("CACHE", "PRECALL", "EXTENDED_ARG")
        ]
        for ins, nxt in zip(instructions, instructions[1:] + [None]):
            if ins.opname in ("LOAD_GLOBAL", "LOAD_NAME") and (
                nxt is None or nxt.opname not in _ATTR_OPS
            ):
                escaped.add(ins.argval)
    return frozenset(escaped)


@functools.lru_cache(maxsize=4096)
def imports(code: types.CodeType) -> frozenset[str]:
    """Modules imported by ``import`` statements inside the code."""
    return frozenset(
        ins.argval
        for c in _codes(code)
        for ins in dis.get_instructions(c)
        if ins.opname == "IMPORT_NAME"
    )


def qualified(obj: object) -> str:
    return (
        f"{getattr(obj, '__module__', None)}."
        f"{getattr(obj, '__qualname__', getattr(obj, '__name__', '?'))}"
    )


def outside_reads(code: types.CodeType, scope: dict, builtin_names: dict) -> list[str]:
    """How the code reads the outside world: impure builtins it calls, impure modules it uses
    or imports, library functions that read files (``np.load``), ``sys.modules``. ``scope``:
    the function's globals and closure variables."""
    found = []
    for module in sorted(imports(code)):
        if _top(module) in IMPURE_MODULES:
            found.append(f"imports the module {module} (files, sockets or processes)")
    for name in sorted(global_names(code)):
        if name in scope:
            value = scope[name]
            if isinstance(value, types.ModuleType) and _top(value.__name__) in IMPURE_MODULES:
                found.append(f"uses the module {value.__name__} (files, sockets or processes)")
            elif callable(value) and qualified(value) in IMPURE_FUNCTIONS:
                found.append(f"calls {qualified(value)} (reads a file)")
        elif name in builtin_names and name in IMPURE_BUILTINS:
            found.append(
                f"calls the builtin {name}() (reads outside state or a namespace by computed name)"
            )
    for chain in sorted(attribute_chains(code)):
        value = scope.get(chain[0])
        if not isinstance(value, types.ModuleType):
            continue
        for depth in range(1, len(chain)):
            dotted = ".".join([value.__name__, *chain[1 : depth + 1]])
            target = resolve(value, chain[1 : depth + 1])
            if dotted in IMPURE_FUNCTIONS or (
                target is not None and qualified(target) in IMPURE_FUNCTIONS
            ):
                found.append(f"calls {dotted} (reads a file)")
                break
    return found


def resolve(module: types.ModuleType, attrs: tuple[str, ...]) -> object | None:
    """``module.attr1.attr2...``, or None when it does not resolve."""
    value: object = module
    for attr in attrs:
        try:
            value = getattr(value, attr)
        except Exception:  # a lazy attribute that fails to import: nothing to resolve
            return None
    return value
