"""The package's shape: imports point one way, private names stay home, files stay small.

Read from the source with ``ast`` (nothing is imported): every ``import`` counts, also those
inside functions (an import on first use is still a dependency); only imports under
``if TYPE_CHECKING:`` (annotations, never run) do not.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fastft"
TESTS = ROOT / "tests"

MAX_LINES = 500
FACADE = ("fastft/train/finetuner.py", "FineTuner", 350)
#: Files allowed past MAX_LINES, with the reason. Empty today; a new entry needs a reason.
LONG_FILES: dict[str, str] = {}


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_of(path: Path, root: Path = ROOT) -> str:
    name = module_name(path, root)
    return name if path.name == "__init__.py" else name.rsplit(".", 1)[0]


def all_modules(folder: Path, root: Path = ROOT) -> dict[str, Path]:
    return {
        module_name(p, root): p
        for p in sorted(folder.rglob("*.py"))
        if "__pycache__" not in p.parts
    }


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports_of(path: Path, root: Path = ROOT) -> list[tuple[str, list[str], int]]:
    """``(module, names imported from it, line)`` for every import that runs."""
    tree = ast.parse(path.read_text(), filename=str(path))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = []
    for node in ast.walk(tree):
        if _type_checking_only(node, parents):
            continue
        if isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this file's package
                pkg = package_of(path, root).split(".")
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join(pkg + ([base] if base else []))
            found.append((base, [a.name for a in node.names], node.lineno))
    return found


def import_graph(modules: dict[str, Path], root: Path = ROOT) -> dict[str, dict[str, int]]:
    """module -> {fastft module it imports: line}; ``from pkg import sub`` counts as sub."""
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        edges = graph.setdefault(name, {})
        for target, names, line in imports_of(path, root):
            if target not in modules:
                continue
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
            for t in subs or [target]:
                if t != name:
                    edges.setdefault(t, line)
    return graph


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def private_imports(modules: dict[str, Path], root: Path = ROOT) -> list[str]:
    """Imports of another module's ``_private`` name, or of a private module from outside
    the package that holds it; and ``alias._private`` reads of an imported fastft module."""
    bad = []
    for _name, path in modules.items():
        rel = path.relative_to(root)
        pkg = package_of(path, root)
        aliases: dict[str, str] = {}  # local name -> fastft module
        for target, names, line in imports_of(path, root):
            if not target.startswith("fastft"):
                continue
            parts = target.split(".")
            for i, part in enumerate(parts):
                if part.startswith("_") and not part.startswith("__"):
                    home = ".".join(parts[:i])  # the package the private module belongs to
                    if not (pkg == home or pkg.startswith(home + ".")):
                        bad.append(f"{rel}:{line} imports {target}, private to {home}")
            for n in names:
                if n.startswith("_") and not n.startswith("__") and f"{target}.{n}" not in modules:
                    bad.append(f"{rel}:{line} imports {n} from {target}")
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):  # names bound to fastft modules
            if isinstance(node, ast.Import):
                aliases.update(
                    {
                        a.asname: a.name
                        for a in node.names
                        if a.name.startswith("fastft") and a.asname
                    }
                )
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fastft"):
                aliases.update(
                    {
                        a.asname or a.name: f"{node.module}.{a.name}"
                        for a in node.names
                        if f"{node.module}.{a.name}" in modules
                    }
                )
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            ):
                bad.append(f"{rel}:{node.lineno} reads {node.value.id}.{node.attr}")
    return bad


def test_the_package_has_no_import_cycle():
    graph = import_graph(all_modules(PACKAGE))
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_module_imports_another_modules_private_names():
    assert private_imports(all_modules(PACKAGE)) == []


def test_the_trainer_reaches_kernels_only_through_the_cache():
    modules = all_modules(PACKAGE)
    graph = import_graph(modules)
    trainer = [m for m in modules if m.startswith("fastft.train")]
    direct = {
        m: sorted(t for t in graph[m] if t.startswith("fastft.ops") or t == "fastft._native")
        for m in trainer
    }
    assert {m: t for m, t in direct.items() if t} == {}


def test_files_and_the_facade_stay_small():
    long = {
        str(p.relative_to(ROOT)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert {f: n for f, n in long.items() if f not in LONG_FILES} == {}
    path, cls, limit = FACADE
    tree = ast.parse((ROOT / path).read_text())
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
    assert node.end_lineno - node.lineno + 1 <= limit


def test_tests_share_helpers_not_each_others_privates():
    modules = {k: v for k, v in all_modules(TESTS).items()}
    bad = []
    for _name, path in modules.items():
        for target, _names, line in imports_of(path):
            if (
                target.startswith("tests.")
                and target not in ("tests.helpers",)
                and not target.startswith("tests.helpers.")
            ):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target} (use tests/helpers)")
            if target.startswith("test_") or target in ("models", "conftest"):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target} (use tests/helpers)")
    assert bad == []


# ---------------------------------------------------------------- the checks catch what they should
def _write(root: Path, files: dict[str, str]) -> dict[str, Path]:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return {module_name(root / rel, root): root / rel for rel in files}


def test_a_lazy_import_cycle_is_found(tmp_path):
    modules = _write(
        tmp_path,
        {
            "fastft/__init__.py": "",
            "fastft/a.py": "from fastft.b import g\n",
            "fastft/b.py": "def g():\n    from fastft.a import f\n",
        },
    )
    assert find_cycle(import_graph(modules, tmp_path)) == ["fastft.a", "fastft.b", "fastft.a"]


def test_a_type_checking_import_is_no_cycle(tmp_path):
    modules = _write(
        tmp_path,
        {
            "fastft/__init__.py": "",
            "fastft/a.py": "from fastft.b import g\n",
            "fastft/b.py": (
                "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from fastft.a import f\n"
            ),
        },
    )
    assert find_cycle(import_graph(modules, tmp_path)) is None


def test_private_imports_are_found(tmp_path):
    modules = _write(
        tmp_path,
        {
            "fastft/__init__.py": "",
            "fastft/p/__init__.py": "",
            "fastft/p/_common.py": "X = 1\n",
            "fastft/p/a.py": "from fastft.p._common import X\n_hidden = 2\n",
            "fastft/q.py": (
                "from fastft.p.a import _hidden\nfrom fastft.p._common import X\n"
                "from fastft.p import a as pa\ny = pa._hidden\n"
            ),
        },
    )
    assert private_imports(modules, tmp_path) == [
        "fastft/q.py:1 imports _hidden from fastft.p.a",
        "fastft/q.py:2 imports fastft.p._common, private to fastft.p",
        "fastft/q.py:4 reads pa._hidden",
    ]
