"""The import direction that shows the architecture (ARCHITECTURE.md), read from the source with
``ast`` so that imports inside functions and ``TYPE_CHECKING`` blocks count too:

* ``common/`` is the framework-free core: no flwr and no other project package;
* ``client/`` and ``server/`` never import each other (what both need lives in ``launch/``);
* ``launch/`` may use flwr and ``common/`` only;
* the module graph of the project has no import cycle.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "client", "server", "sim", "launch")
#: package -> top-level names it must not import
FORBIDDEN: dict[str, frozenset[str]] = {
    "common": frozenset({"flwr", "client", "server", "sim", "launch"}),
    "client": frozenset({"server", "sim"}),
    "server": frozenset({"client", "sim"}),
    "launch": frozenset({"client", "server", "sim"}),
}


def module_name(path: Path, root: Path) -> str:
    """``root/client/cli.py`` -> ``client.cli``; ``root/common/nets/__init__.py`` -> ``common.nets``."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_names(tree: ast.AST, module: str, is_package: bool) -> list[tuple[str, int, bool]]:
    """Every module named by an import statement anywhere in ``tree`` (function bodies and
    ``if TYPE_CHECKING:`` blocks included) as (name, line, named in the statement); relative
    imports made absolute. ``from a import b`` yields ``a`` and, not named, ``a.b`` (b may be
    a submodule)."""
    out: list[tuple[str, int, bool]] = []
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno, True) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.append((target, node.lineno, True))
            out += [(f"{target}.{alias.name}", node.lineno, False)
                    for alias in node.names if alias.name != "*"]
    return out


def project_imports(root: Path = REPO, packages: tuple[str, ...] = PACKAGES
                    ) -> tuple[dict[str, list[tuple[str, int, bool]]], dict[str, Path]]:
    """module -> [(imported module name, line)] for every .py file under ``packages``."""
    imports: dict[str, list[tuple[str, int, bool]]] = {}
    files: dict[str, Path] = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            name = module_name(path, root)
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            imports[name] = imported_names(tree, name, path.name == "__init__.py")
            files[name] = path
    return imports, files


def violations(imports: dict[str, list[tuple[str, int, bool]]], files: dict[str, Path]) -> list[str]:
    """Imports that break FORBIDDEN, as 'file:line: module imports name'."""
    found = []
    for module, names in imports.items():
        banned = FORBIDDEN.get(module.split(".")[0], frozenset())
        for name, line, named in names:
            if named and name.split(".")[0] in banned:
                found.append(f"{files[module]}:{line}: {module} imports {name}")
    return sorted(set(found))


def module_graph(imports: dict[str, list[tuple[str, int, bool]]]) -> dict[str, set[str]]:
    """Edges between project modules: an imported name resolves to the longest project module
    that is a prefix of it (``from a import b`` names ``a.b`` when it is a module, else ``a``).
    Importing a submodule also runs its parent packages, but our ``__init__`` files are empty
    or import only their own submodules, so those edges are left out."""
    graph: dict[str, set[str]] = {m: set() for m in imports}
    for module, names in imports.items():
        for name, _, _ in names:
            parts = name.split(".")
            for k in range(len(parts), 0, -1):
                target = ".".join(parts[:k])
                if target in imports:
                    if target != module:
                        graph[module].add(target)
                    break
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    for start in sorted(graph):
        if state.get(start):
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def test_every_package_is_scanned() -> None:
    imports, _ = project_imports()
    assert {m.split(".")[0] for m in imports} == set(PACKAGES)


def test_layers_import_only_downwards() -> None:
    imports, files = project_imports()
    bad = violations(imports, files)
    assert not bad, "forbidden imports:\n" + "\n".join(bad)


def test_no_import_cycle() -> None:
    imports, _ = project_imports()
    cycle = find_cycle(module_graph(imports))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


# -- the checker itself, on a tiny made-up tree -----------------------------------------------
def _tree(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def test_checker_sees_function_level_and_type_checking_imports(tmp_path: Path) -> None:
    _tree(tmp_path, {
        "common/__init__.py": "",
        "common/a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import flwr\n",
        "client/__init__.py": "",
        "client/b.py": "def f():\n    from server.c import x\n",
        "server/__init__.py": "",
        "server/c.py": "from . import d\nx = 1\n",
        "server/d.py": "",
    })
    imports, files = project_imports(tmp_path, ("common", "client", "server"))
    bad = violations(imports, files)
    assert [b.split(": ", 1)[1] for b in bad] == ["client.b imports server.c", "common.a imports flwr"]
    assert module_graph(imports)["server.c"] == {"server", "server.d"}  # relative import resolved


def test_checker_reports_a_cycle(tmp_path: Path) -> None:
    _tree(tmp_path, {
        "sim/__init__.py": "",
        "sim/a.py": "import sim.b\n",
        "sim/b.py": "def f():\n    from sim.c import g\n",
        "sim/c.py": "from sim import a\n",
    })
    imports, _ = project_imports(tmp_path, ("sim",))
    assert find_cycle(module_graph(imports)) == ["sim.a", "sim.b", "sim.c", "sim.a"]
    (tmp_path / "sim/c.py").write_text("import sim\n", encoding="utf-8")
    imports, _ = project_imports(tmp_path, ("sim",))
    assert find_cycle(module_graph(imports)) is None


@pytest.mark.parametrize("name", ["flwr", "client.app"])
def test_checker_flags_what_common_must_not_import(tmp_path: Path, name: str) -> None:
    _tree(tmp_path, {"common/__init__.py": "", "common/x.py": f"import {name}\n"})
    imports, files = project_imports(tmp_path, ("common",))
    assert violations(imports, files) == [f"{tmp_path / 'common/x.py'}:1: common.x imports {name}"]
