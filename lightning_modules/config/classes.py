"""What a class declares, read from its source without importing it: the config check asks the classes a config
names (``model._target_``, ``datamodule._target_``, ``objective._target_``) which inputs they take before torch is
imported, since importing them would import it.

``class_attribute("datamodules.sources.digits.DigitsDataModule", "modality")`` finds the module's file (the
top-level package through ``importlib.util.find_spec``, which imports nothing; its subpackages by their folders,
so no package ``__init__`` runs either), parses it with ``ast`` and returns the literal value assigned to the
attribute in the class body; an attribute the class inherits is looked up in its base classes, found through the
module's own imports (``from datamodules.loading.in_memory import InMemoryImageDataModule``). Cached.

None where the source cannot tell: a class defined at run time, a C extension, a value that is not a literal
(a property, a name, a call), a base class behind a star import. The class itself then checks what it is given
when it is built, as for any component of a user's own.
"""

from __future__ import annotations

import ast
import copy
import functools
import importlib.util
import sys
from pathlib import Path

MAX_DEPTH = 16  # base classes and re-exports followed, at most (a cycle of imports ends here)


class _Unreadable(Exception):
    """The source cannot tell (the attribute's value is not a literal, a base class cannot be found)."""


_NOTHING = type("NotDeclared", (), {"__repr__": lambda self: "<not declared>"})()


def class_attribute(target, name: str):
    """The literal value of attribute ``name`` of the class ``target`` (a dotted path) names, from its own body or
    its base classes'; None when the class or the value cannot be read from the source, or nothing declares it."""
    if not isinstance(target, str) or "." not in target:
        return None
    value = _cached(target, name)
    return None if value is _NOTHING else copy.deepcopy(value)  # a copy: the cache keeps its own


@functools.lru_cache(maxsize=512)
def _cached(target: str, name: str):
    try:
        return _lookup(target, name, 0)
    except _Unreadable:
        return _NOTHING


def _lookup(target: str, name: str, depth: int):
    """``name``'s value in the class ``target`` or, if its body does not assign it, in its bases (in order, each
    with its own bases: the method resolution order of single inheritance); _NOTHING if none declares it."""
    found = _class(target, depth)
    if found is None:
        raise _Unreadable(target)
    module, node, tree = found
    value = _assigned(node, name)
    for base in node.bases if value is _NOTHING else ():
        dotted = _dotted(base)
        resolved = _resolve(module, tree, dotted) if dotted else None
        if resolved is None:
            raise _Unreadable(f"{target}: its base {ast.unparse(base)}")
        if resolved != "object":
            value = _lookup(resolved, name, depth + 1)
        if value is not _NOTHING:
            break
    return value


def _assigned(node: ast.ClassDef, name: str):
    """The literal ``name`` is given in the class body (the last assignment wins); _NOTHING if none."""
    value = _NOTHING
    for statement in node.body:
        if isinstance(statement, ast.Assign):
            for target in statement.targets:
                value = _from_target(target, statement.value, name, value)
        elif isinstance(statement, ast.AnnAssign) and statement.value is not None:
            value = _from_target(statement.target, statement.value, name, value)
        elif isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and statement.name == name:
            raise _Unreadable(f"{node.name}.{name} is a {type(statement).__name__}")  # a property, a method
    return value


def _from_target(target: ast.expr, value: ast.expr, name: str, current):
    if isinstance(target, ast.Name) and target.id == name:
        return _literal(value)
    if isinstance(target, ast.Tuple) and isinstance(value, ast.Tuple) and len(target.elts) == len(value.elts):
        for one, its in zip(target.elts, value.elts, strict=True):  # modality, type = "image", "timm"
            current = _from_target(one, its, name, current)
    return current


def _literal(value: ast.expr):
    try:
        return ast.literal_eval(value)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as err:
        raise _Unreadable(ast.unparse(value)) from err


def _dotted(node: ast.expr) -> str | None:
    """``Name`` or ``a.b.Name`` as a string; None for anything else (``Generic[T]``, a call)."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = _dotted(node.value)
        return f"{head}.{node.attr}" if head else None
    return None


def _class(target: str, depth: int):
    """(module, its ClassDef, the module's tree) for the class ``target`` names, following re-exports
    (``from .core import LightningDataModule`` in a package ``__init__``); None if not found."""
    if depth >= MAX_DEPTH:
        raise _Unreadable(f"{target}: more than {MAX_DEPTH} base classes and re-exports deep")
    parts = target.split(".")
    for cut in range(len(parts) - 1, 0, -1):  # the longest importable prefix is the module
        module, names = ".".join(parts[:cut]), parts[cut:]
        parsed = _parse(module)
        if parsed is None:
            continue
        tree, _ = parsed
        node = _class_def(tree.body, names)
        if node is not None:
            return module, node, tree
        resolved = _resolve(module, tree, ".".join(names))
        if resolved is not None and resolved != target:
            return _class(resolved, depth + 1)
        return None
    return None


def _class_def(body: list, names: list[str]):
    for statement in body:
        if isinstance(statement, ast.ClassDef) and statement.name == names[0]:
            return statement if len(names) == 1 else _class_def(statement.body, names[1:])
    return None


def _resolve(module: str, tree: ast.Module, dotted: str) -> str | None:
    """The dotted path that ``dotted`` (a name used in ``module``) means, from the module's own top-level classes
    and imports; None when it cannot tell (a star import, a name bound some other way)."""
    head, _, rest = dotted.partition(".")
    tail = f".{rest}" if rest else ""
    found = None
    for statement in tree.body:
        if isinstance(statement, ast.ClassDef) and statement.name == head:
            found = f"{module}.{head}{tail}"
        elif isinstance(statement, ast.ImportFrom):
            source = _absolute(module, statement)
            for alias in statement.names:
                if (alias.asname or alias.name) == head and source:
                    found = f"{source}.{alias.name}{tail}"
        elif isinstance(statement, ast.Import):
            for alias in statement.names:
                if alias.asname == head:
                    found = f"{alias.name}{tail}"
                elif alias.asname is None and alias.name.split(".")[0] == head:
                    found = dotted  # import a.b: the name a, used as a.b.Class
    return "object" if found is None and dotted == "object" else found


def _absolute(module: str, statement: ast.ImportFrom) -> str | None:
    """The module a ``from ... import`` names, relative ones made absolute."""
    if not statement.level:
        return statement.module
    parsed = _parse(module)
    package = module if parsed is not None and parsed[1] else module.rpartition(".")[0]
    for _ in range(statement.level - 1):
        package = package.rpartition(".")[0]
    if not package:
        return None
    return f"{package}.{statement.module}" if statement.module else package


@functools.lru_cache(maxsize=256)
def _parse(module: str):
    """(the module's syntax tree, whether it is a package) from its source file; None without one."""
    path = _source(module)
    if path is None:
        return None
    try:
        return ast.parse(path.read_text(encoding="utf-8")), path.name == "__init__.py"
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return None


def _source(module: str) -> Path | None:
    """The ``.py`` file of ``module``, found without importing it or any package above it."""
    loaded = sys.modules.get(module)
    if loaded is not None:
        file = getattr(loaded, "__file__", None)
        return Path(file) if file and file.endswith(".py") else None
    parts = module.split(".")
    if not all(part.isidentifier() for part in parts):
        return None
    try:
        spec = importlib.util.find_spec(parts[0])  # a top-level name: found on sys.path, not imported
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if len(parts) == 1:
        origin = spec.origin
        return Path(origin) if origin and origin.endswith(".py") else None
    folders = [Path(p) for p in (spec.submodule_search_locations or [])]
    for part in parts[1:-1]:
        folders = [folder / part for folder in folders if (folder / part).is_dir()]
    for folder in folders:
        for candidate in (folder / parts[-1] / "__init__.py", folder / f"{parts[-1]}.py"):
            if candidate.is_file():
                return candidate
    return None
