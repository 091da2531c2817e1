"""The floor plan holds: every import inside the package (function-level ones included) points down the layers
that minilm_sts/__init__.py names, and the package-level imports form no cycle."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "minilm_sts"
# Lowest first; a module may import its own layer and the layers below it. `base` is what every layer may use.
LAYERS = ("base", "model", "evaluation", "data", "training", "serving", "cli")
BASE = {"errors", "hardware", "atomic", "version", "_compat", "_deprecated"}
TOP = {"minilm_sts", "minilm_sts.__main__"}  # the package's door and entry point import from every layer


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    first = module.split(".")[1]
    return "base" if first in BASE else first


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported minilm_sts module, line, whether at module level) for every import in the file."""
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("minilm_sts"):
            names = [node.module] if node.module != "minilm_sts" else [f"minilm_sts.{a.name}" for a in node.names]
            found += [(name, node.lineno, id(node) in top_level) for name in names]
        elif isinstance(node, ast.Import):
            found += [(a.name, node.lineno, id(node) in top_level) for a in node.names
                      if a.name.startswith("minilm_sts.")]
    return found


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def test_every_module_sits_in_a_layer():
    unknown = {name for name in MODULES if name not in TOP and layer(name) not in LAYERS}
    assert not unknown, f"modules outside every layer: {sorted(unknown)}"


@pytest.mark.parametrize("name", sorted(set(MODULES) - TOP))
def test_imports_point_down_the_layers(name):
    own = LAYERS.index(layer(name))
    wrong = [f"line {line}: {target}" for target, line, _ in imports(MODULES[name])
             if target not in TOP and LAYERS.index(layer(target)) > own]
    assert not wrong, f"{name} ({layer(name)}) imports from a higher layer: {wrong}"


def test_the_base_modules_import_only_each_other():
    wrong = [(name, target) for name in MODULES if name not in TOP and layer(name) == "base"
             for target, _, _ in imports(MODULES[name]) if layer(target) != "base"]
    assert not wrong


def test_module_level_imports_form_no_cycle():
    graph = {name: {target for target, _, top in imports(path) if top and target in MODULES}
             for name, path in MODULES.items()}
    visiting, done = set(), set()

    def visit(node, trail):
        if node in visiting:
            raise AssertionError(f"import cycle: {' -> '.join(trail[trail.index(node):] + [node])}")
        if node in done:
            return
        visiting.add(node)
        for target in graph.get(node, ()):
            visit(target, trail + [node])
        visiting.discard(node)
        done.add(node)

    for name in graph:
        visit(name, [])


def test_the_check_catches_a_wrong_way_import(tmp_path):
    """The checker itself: a function-level import of the command line from the model layer is found."""
    module = tmp_path / "probe.py"
    module.write_text("def f():\n    from minilm_sts.cli.commands import main\n")
    assert imports(module) == [("minilm_sts.cli.commands", 2, False)]
    assert LAYERS.index(layer("minilm_sts.cli.commands")) > LAYERS.index(layer("minilm_sts.model.bert"))
