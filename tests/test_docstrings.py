"""Every argument of the public API is documented where ``help()`` shows it.

For each public callable (what ``fastft`` exports, ``fastft.surgery``, ``fastft.cache``,
``fastft.probing`` when it is there, and the public methods of those classes and of their
fastft bases) the names in its docstring's Google-style ``Args:`` section (``name:``,
``name (type):``, ``a, b:``, ``*args:``, ``**kwargs:``) must be exactly its signature's
parameters. A class documents its constructor's arguments in the class docstring (or
``__init__``'s); a dataclass may call the section ``Attributes:``.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
from collections.abc import Callable, Iterator

import pytest

import fastft
import fastft.cache

#: Parameters no docstring needs to name, with the reason.
EXEMPT = {
    # ``FineTuner(model, *positional)`` and ``fit(train, val, *positional)`` exist only to
    # refuse the old positional order with a message that names the keywords to use.
    "positional",
}
#: Modules whose exports are documented elsewhere (kernels: docs/kernels; data helpers).
SKIPPED_MODULES = ("fastft.ops", "fastft.data")

SECTION = re.compile(r"^(\s*)(Args|Arguments|Parameters|Attributes|Keyword Args):\s*$")
ENTRY = re.compile(r"^(\*{0,2}\w+(?:\s*,\s*\*{0,2}\w+)*)\s*(?:\([^)]*\))?\s*:(?:\s|$)")


def documented(doc: str | None) -> set[str] | None:
    """The names in the docstring's argument sections (None when it has none)."""
    if not doc:
        return None
    names: set[str] = set()
    found = False
    indent: int | None = None  # of the entries of the current section
    base = -1  # of the section header
    for line in inspect.cleandoc(doc).splitlines():
        m = SECTION.match(line)
        if m:
            found, base, indent = True, len(m[1]), None
            continue
        if base < 0 or not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        if depth <= base:  # the section ended (Returns:, Raises:, prose)
            base = -1
            continue
        if indent is None:
            indent = depth
        if depth == indent:
            entry = ENTRY.match(line.strip())
            if entry:
                names |= {n.strip().lstrip("*") for n in entry[1].split(",")}
    return names if found else None


def parameters(fn: Callable, *, skip_first: bool) -> set[str]:
    params = list(inspect.signature(fn).parameters.values())
    if skip_first and params:
        params = params[1:]
    return {p.name for p in params} - EXEMPT


def public_methods(cls: type) -> Iterator[tuple[str, Callable, bool]]:
    """``(name, function, bound)`` for the public methods of ``cls`` and its fastft bases,
    but overrides of a torch method (``forward``, ``train``: torch documents them)."""
    seen: set[str] = set()
    for klass in cls.__mro__:
        if not klass.__module__.startswith("fastft"):
            continue
        for name, attr in vars(klass).items():
            if name.startswith("_") or name in seen:
                continue
            seen.add(name)
            torch_bases = [b for b in cls.__mro__ if b.__module__.startswith("torch")]
            if any(hasattr(base, name) for base in torch_bases):
                continue
            if isinstance(attr, (classmethod, staticmethod)):
                yield name, attr.__func__, isinstance(attr, classmethod)
            elif inspect.isfunction(attr):
                yield name, attr, True


def public_api() -> dict[str, tuple[Callable, str | None, bool]]:
    """``qualified name -> (signature's callable, docstring, skip its first parameter)``."""
    found: dict[str, tuple[Callable, str | None, bool]] = {}
    objects: dict[str, object] = {}
    sources = [fastft, fastft.surgery, fastft.cache]
    try:  # the layer-probing benchmark (``fastft.probe``), when the package has it
        sources.append(importlib.import_module("fastft.probing"))
    except ImportError:
        pass
    for module in sources:
        for name in getattr(module, "__all__", ()):
            obj = getattr(module, name)
            if inspect.ismodule(obj) or (isinstance(obj, type) and issubclass(obj, BaseException)):
                continue
            if getattr(obj, "__module__", "").startswith(SKIPPED_MODULES):
                continue
            if callable(obj):
                objects.setdefault(f"{getattr(obj, '__module__', module.__name__)}.{name}", obj)
    for qual, obj in objects.items():
        if isinstance(obj, type):
            init_doc = obj.__init__.__doc__ if "__init__" in vars(obj) else None
            doc = obj.__doc__ if documented(obj.__doc__) is not None else init_doc
            if "__init__" in vars(obj) or dataclasses.is_dataclass(obj):
                found[qual] = (obj, doc, False)
            for name, fn, bound in public_methods(obj):
                found[f"{qual}.{name}"] = (fn, fn.__doc__, bound)
        else:
            found[qual] = (obj, obj.__doc__, False)
    return found


API = public_api()


def test_the_public_api_is_found():
    names = set(API)
    for expected in (
        "fastft.train.finetuner.FineTuner",
        "fastft.train.finetuner.FineTuner.fit",
        "fastft.train.finetuner.FineTuner.fit_many",
        "fastft.train.finetuner.FineTuner.load",
        "fastft.train.config.EarlyStopping",
        "fastft.cache.feature_cache.FeatureCache.build",
    ):
        assert expected in names, sorted(names)


@pytest.mark.parametrize("name", sorted(API))
def test_every_argument_is_documented(name):
    fn, doc, skip_first = API[name]
    wanted = parameters(fn, skip_first=skip_first)
    names = documented(doc)
    if not wanted and not names:
        return
    assert names is not None, f"{name}: no Args: section for {sorted(wanted)}"
    missing, extra = sorted(wanted - names), sorted(names - wanted)
    assert not missing and not extra, f"{name}: undocumented {missing}; not arguments {extra}"


def test_the_parser_reads_google_style():
    doc = """Summary.

    Args:
        a: one.
            continued: not an entry.
        b (int): two.
        c, d: three and four.
        **kw: the rest.

    Returns:
        x: not an argument.
    """
    assert documented(doc) == {"a", "b", "c", "d", "kw"}
    assert documented("No sections.") is None


def test_a_missing_argument_is_found():
    def f(a, b):
        """Summary.

        Args:
            a: one.
            c: not an argument.
        """

    assert parameters(f, skip_first=False) - documented(f.__doc__) == {"b"}
    assert documented(f.__doc__) - parameters(f, skip_first=False) == {"c"}


def test_help_shows_what_issue_19_missed():
    assert "max_memory" in fastft.FineTuner.__doc__
    fit_doc = documented(fastft.FineTuner.fit.__doc__) or set()
    assert {"epochs", "batch_size", "lr", "dataset_id", "resume"} <= fit_doc
