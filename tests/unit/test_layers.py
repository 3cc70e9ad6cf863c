"""The package's layers, as drawn from its own imports: every import goes down, none goes round in a circle.

README "Code map" describes the same layers; this test keeps it true.
"""

import ast
from pathlib import Path
from typing import Dict, List, Set

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "ds_fastckpt"

# Bottom to top. A module may import from its own layer and the layers listed before it.
LAYERS = [
    {"_version", "compat", "storage"},
    {"native"},
    {"faults"},
    {"format"},
    {"decisions"},
    {"remote"},
    {"engine"},
    {"cli"},
    {"integrations"},
    {"__init__", "__main__"},
]
MAX_MODULE_LINES = 400


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


MODULES: Dict[str, Path] = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    for index, names in enumerate(LAYERS):
        if top in names:
            return index
    raise AssertionError(f"{module} is in no layer: add its folder to LAYERS and to README 'Code map'")


def imported_modules(module: str) -> Set[str]:
    """The ds_fastckpt modules ``module`` imports, at the top or inside functions."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {name for name in found if name in MODULES}


GRAPH = {module: imported_modules(module) for module in MODULES}


def test_every_folder_of_the_package_is_a_layer():
    for module in MODULES:
        layer_of(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_only(module):
    upward = sorted(target for target in GRAPH[module] if layer_of(target) > layer_of(module))
    assert upward == [], f"{module} imports from a layer above it: {upward}"


def test_no_import_circle():
    circles: List[List[str]] = []
    state: Dict[str, str] = {}

    def visit(module: str, trail: List[str]) -> None:
        state[module] = "open"
        for target in sorted(GRAPH[module]):
            if state.get(target) == "open":
                circles.append(trail[trail.index(target):] + [target])
            elif target not in state:
                visit(target, trail + [target])
        state[module] = "done"

    for module in sorted(MODULES):
        if module not in state:
            visit(module, [module])
    assert circles == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_is_small_enough_to_read_in_one_sitting(module):
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{MODULES[module]} has {lines} lines"


def test_the_checks_see_an_upward_import_and_a_circle(monkeypatch):
    monkeypatch.setitem(GRAPH, "ds_fastckpt.native.op", {"ds_fastckpt.engine.config"})
    with pytest.raises(AssertionError, match="imports from a layer above it"):
        test_imports_go_down_only("ds_fastckpt.native.op")
    monkeypatch.setitem(GRAPH, "ds_fastckpt.native.staging", {"ds_fastckpt.native.writer"})
    with pytest.raises(AssertionError):
        test_no_import_circle()
