"""The package layers, checked by walking every import of the project's own modules.

Layer order (docs/architecture.md): `store` and `training` at the bottom (`training` is a leaf
that imports no other prefloop package, `store` imports none either); `feedback` (the judges)
and `app` (the web service) above `store` (both may use `training`); `labeling` (the UI
injected into the app) above `app`; `loop` (rounds, scheduler, demo, `prefloop up`) above all of
those; `cli.py` on top. An import may only point to a lower layer or inside its own package,
and no two modules may import each other, directly or through others.

    python -m pytest tests/test_architecture.py -q
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYER = {"store": 0, "training": 0, "feedback": 1, "app": 1, "labeling": 2, "loop": 3, "cli": 4}
SKIP_PARTS = {"versions", "__pycache__"}
MAX_LINES = 600


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    files = [ROOT / "cli.py"]
    for package in LAYER:
        if package != "cli" and (ROOT / package).is_dir():
            files += [p for p in (ROOT / package).rglob("*.py")
                      if not SKIP_PARTS & set(p.relative_to(ROOT).parts)]
    return {_module_name(p): p for p in files}


def _type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def imports_of(path: Path, module: str, known: set[str]) -> set[str]:
    """Project modules that `module` imports anywhere (functions too; not TYPE_CHECKING)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def resolve(name: str) -> str | None:
        # The longest project module that `name` names (a.b.c may be a function of a.b).
        parts = name.split(".")
        while parts:
            candidate = ".".join(parts)
            if candidate in known:
                return candidate
            parts.pop()
        return None

    def visit(node: ast.AST) -> None:
        if _type_checking_block(node):
            for child in getattr(node, "orelse", []):
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                if (target := resolve(alias.name)) is not None:
                    found.add(target)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            for alias in node.names:
                target = resolve(f"{name}.{alias.name}") or resolve(name)
                if target is not None:
                    found.add(target)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    found.discard(module)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = project_modules()
    known = set(modules)
    return {name: imports_of(path, name, known) for name, path in modules.items()}


def test_every_import_points_down_the_layers(graph: dict[str, set[str]]) -> None:
    wrong = []
    for module, targets in sorted(graph.items()):
        own = module.split(".")[0]
        for target in sorted(targets):
            other = target.split(".")[0]
            if other != own and LAYER[other] >= LAYER[own]:
                wrong.append(f"{module} -> {target}")
    assert wrong == []


def test_no_import_cycles(graph: dict[str, set[str]]) -> None:
    # Tarjan's strongly connected components: any component of 2+ modules is a circle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def strongconnect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                strongconnect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            strongconnect(node)
    assert circles == []


def test_no_package_imports_cli(graph: dict[str, set[str]]) -> None:
    assert sorted(m for m, targets in graph.items() if "cli" in targets) == []


def test_training_imports_no_other_package(graph: dict[str, set[str]]) -> None:
    outside = sorted(f"{m} -> {t}" for m, targets in graph.items() if m.startswith("training")
                     for t in targets if not t.startswith("training"))
    assert outside == []


def test_no_project_file_is_over_the_line_limit() -> None:
    paths = list(project_modules().values())
    paths += [p for p in (ROOT / "benchmarks").glob("*.py")]
    paths += [p for p in (ROOT / "scripts").glob("*.py")]
    long = sorted(f"{p.relative_to(ROOT)}: {n}" for p in paths
                  if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES)
    assert long == []


def test_the_walker_sees_a_wrong_arrow(tmp_path: Path) -> None:
    # The checks above can fail: a store module that imports the app is an arrow up.
    fake = tmp_path / "store" / "bad.py"
    fake.parent.mkdir()
    fake.write_text("def f():\n    from app.main import create_app\n    return create_app\n")
    found = imports_of(fake, "store.bad", {"store.bad", "app.main", "app"})
    assert found == {"app.main"}
    assert LAYER["app"] >= LAYER["store"]
