"""The layout shows the architecture: imports point down the layers and nothing imports itself in a circle.

Every ``import`` in mmwb's source counts, also those inside functions (an import deferred into a function still
ties the two modules together; it only hides the circle from Python).
"""

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mmwb"
# Lower numbers are lower layers; a module may import its own layer or any lower one. train evaluates with the
# inference pipelines, so it sits above them; bench and testing build on everything but the CLI.
LAYERS = {
    "mmwb.errors": 0,
    "mmwb.runtime": 1,
    "mmwb.data": 2,
    "mmwb.models": 3,
    "mmwb.pipelines": 4,
    "mmwb.train": 5,
    "mmwb.testing": 6,
    "mmwb.bench": 6,
    "mmwb.cli": 7,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """The mmwb modules ``path`` imports: ``from pkg import name`` counts as ``pkg.name`` when that is a module."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}".rstrip(".")
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names
            ]
        else:
            continue
        for target in targets:
            while target not in modules and "." in target:
                target = target.rpartition(".")[0]
            if target in modules and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(f) for f in files}
    return {module_name(f): imports(f, modules) for f in files}


def layer(module: str) -> int | None:
    for prefix, rank in LAYERS.items():
        if module == prefix or module.startswith(prefix + "."):
            return rank
    return None  # the package root (mmwb.from_pretrained) and mmwb.sde, the public entry points


def test_imports_point_down_the_layers():
    upward = [
        f"{source} -> {target}"
        for source, targets in graph().items()
        for target in targets
        if layer(source) is not None and layer(target) is not None and layer(target) > layer(source)
    ]
    assert upward == []


def find_circles(edges: dict[str, set[str]]) -> list[str]:
    circles, state = [], {}  # state: 1 on the current path, 2 done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges.get(module, ())):
            if state.get(target) == 1:
                circles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    return circles


def test_no_import_circles():
    assert find_circles(graph()) == []


def test_the_checker_sees_circles_and_deferred_imports(tmp_path, monkeypatch):
    """A guard for the two tests above: a circle hidden in a function and an upward import are both found."""
    package = tmp_path / "mmwb"
    (package / "models").mkdir(parents=True)
    (package / "cli").mkdir()
    for folder in (package, package / "models", package / "cli"):
        (folder / "__init__.py").write_text("")
    (package / "models" / "a.py").write_text("def f():\n    from mmwb.models import b\n")
    (package / "models" / "b.py").write_text("from mmwb.models.a import f\nfrom mmwb.cli import main\n")
    (package / "cli" / "main.py").write_text("")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", package)
    edges = graph()
    assert edges["mmwb.models.a"] == {"mmwb.models.b"}
    assert edges["mmwb.models.b"] == {"mmwb.models.a", "mmwb.cli.main"}
    assert find_circles(edges) == ["mmwb.models.a -> mmwb.models.b -> mmwb.models.a"]
    assert layer("mmwb.cli.main") > layer("mmwb.models.b")
