"""The floors stay: every module imports only from its own layer or the ones below, there is no import cycle
(imports inside functions count too), and an import inside a function says why it is there (to keep torch out of
the config check). Read from the sources with ``ast``, nothing imported."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lightning_modules", "datamodules", "pretune")
# Bottom to top: a module may import from its own layer and the layers before it.
LAYERS = (
    "lightning_modules.core",  # errors, result files, rank helpers, locations
    "lightning_modules.config",  # rule kinds, rules by group, the config check, building from _target_
    "lightning_modules.backbones",
    "datamodules",
    "lightning_modules.objectives",
    "lightning_modules.training",  # the LightningModule, optimizer groups, schedules
    "lightning_modules.callbacks",
    "lightning_modules.runtime",
    "lightning_modules.reports",
    "pretune",  # the `pretune` command and its subcommands (scripts/*.py are shims of them)
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int | None:
    matches = [i for i, prefix in enumerate(LAYERS) if module == prefix or module.startswith(prefix + ".")]
    return max(matches) if matches else None


def project_imports(path: Path) -> list[tuple[str, int, bool, str]]:
    """(imported module, line, inside a function, the source line) for every import of the project's packages."""
    source = path.read_text()
    lines = source.splitlines()
    known = {module_name(p) for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
    found = []

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            names = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                # ``from package import module`` imports that module
                names = [
                    f"{child.module}.{a.name}" if f"{child.module}.{a.name}" in known else child.module
                    for a in child.names
                ]
            for name in names:
                if name.split(".")[0] in PACKAGES:
                    found.append((name, child.lineno, inside, lines[child.lineno - 1]))
            visit(child, inside)

    visit(ast.parse(source), False)
    return found


def graph() -> dict[str, list[tuple[str, int, bool, str]]]:
    return {module_name(p): project_imports(p) for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def test_every_module_has_a_layer():
    assert not [m for m in graph() if layer_of(m) is None and m not in PACKAGES]


def test_no_import_points_up():
    upward = [
        f"{module}:{line} imports {target} ({LAYERS[layer_of(target)]} is above {LAYERS[layer_of(module)]})"
        for module, imports in graph().items()
        if layer_of(module) is not None
        for target, line, _, _ in imports
        if layer_of(target) is not None and layer_of(target) > layer_of(module)
    ]
    assert not upward, "\n".join(upward)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in list(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    edges = {m: {target for target, *_ in imports if target != m} for m, imports in graph().items()}
    cycles = _cycles(edges)
    assert not cycles, "import cycles (imports inside functions count):\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_cycles_are_found():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_imports_inside_functions_say_why():
    """A project import inside a function is there to keep torch (and what it brings) out of the config check,
    and its line says so; any other belongs at the top of the module."""
    unexplained = [
        f"{module}:{line}: {text.strip()}"
        for module, imports in graph().items()
        for _, line, inside, text in imports
        if inside and "torch" not in text.partition("#")[2]
    ]
    assert not unexplained, "\n".join(unexplained)


def test_the_config_check_imports_no_torch():
    code = "import sys, lightning_modules.config.check, lightning_modules.runtime.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "False"
