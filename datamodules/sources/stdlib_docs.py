"""The embedded text data: the documentation that ships with every Python, read from its standard library.

What it is, honestly: the docstrings of the standard library's modules, classes and functions (parsed from the
``.py`` sources with ``ast``, never imported; test packages and ``site-packages`` left out) and the
``pydoc_data`` topics (the language reference sections ``help()`` shows). About 2 M characters of technical
English written by many people over decades: prose, but about code, full of identifiers and examples. It
needs nothing but the Python that runs pretune, and it depends on that Python's version (3.11 here:
``distutils`` and ``lib2to3`` exist; on 3.12+ they do not, and the numbers change).

- The labeled task (``labeled_task``): each docstring labeled by its package *family* (the top-level package:
  ``email``, ``asyncio``, ``tkinter`` ...), the ``families`` largest by docstrings. Split by module, so no module
  has docstrings in two splits (its docstrings share names and phrasing): within each family, modules largest
  first go to whichever split is furthest below its share (70/15/15 of the family's docstrings). Texts that
  occur more than once (generated codecs, ``Return self==value.``) and texts under 3 words are left out.
- The corpus (``corpus_documents``): the topics and every docstring except those of the modules held out by
  the labeled task (its val and test modules, for every family that could be a class) and any copy of their
  texts elsewhere, so pre-training on the corpus never reads a text a fine-tune is validated or tested on.

Parsing 12 MB of sources takes 4-9 s on a 2-core machine, so the docstrings are cached as JSON under
``cache_dir`` (``outputs/cache/`` from the configs), keyed by the Python version and the stdlib's path, and
kept in memory for the process.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
import sys
import sysconfig
from pathlib import Path

from lightning_modules.core.results import write_atomic

SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "pydoc_data"}
EXTRACTION = 1  # part of the cache's key: bump it when what is extracted changes
HELD_OUT = {"val": 0.15, "test": 0.15}  # the labeled task's shares of each family's docstrings
MIN_WORDS = 3


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _definitions(body: list):
    """Classes and functions, at any depth (also inside ``if``/``try`` blocks and other definitions)."""
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            yield node
            yield from _definitions(node.body)
        else:
            for field in ("body", "orelse", "finalbody", "handlers"):
                inner = getattr(node, field, None)
                if isinstance(inner, list):
                    yield from _definitions(inner)


def _parse_stdlib() -> list[tuple[str, str]]:
    """(module, docstring) for every docstring of the stdlib's sources, in a fixed order."""
    root, docs = _stdlib(), []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        for filename in sorted(f for f in filenames if f.endswith(".py")):
            path = Path(dirpath) / filename
            parts = path.relative_to(root).with_suffix("").parts
            module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            try:
                tree = ast.parse(path.read_bytes())
            except (SyntaxError, ValueError):  # e.g. a template file that is not Python
                continue
            for node in [tree, *_definitions(tree.body)]:
                text = ast.get_docstring(node)
                if text and text.strip():
                    docs.append((module, text.strip()))
    return docs


@functools.lru_cache(maxsize=4)
def stdlib_docstrings(cache_dir: str | None = None) -> tuple[tuple[str, str], ...]:
    """Every (module, docstring) of this Python's standard library; cached in ``cache_dir`` when given."""
    key = hashlib.sha256(f"{EXTRACTION}|{sys.version}|{_stdlib()}".encode()).hexdigest()[:16]
    name = f"stdlib_docstrings-{sys.version_info.major}.{sys.version_info.minor}-{key}.json"
    cache = Path(cache_dir) / name if cache_dir else None  # null: parse every time
    if cache is not None and cache.is_file():
        try:
            return tuple(tuple(d) for d in json.loads(cache.read_text()))
        except (ValueError, OSError):
            pass  # unreadable: parse again and rewrite it
    docs = _parse_stdlib()
    if cache_dir:
        try:
            write_atomic(cache, json.dumps(docs))
        except OSError:  # a read-only place: the cache is only a shortcut
            pass
    return tuple(docs)


def topics() -> list[str]:
    """The ``pydoc_data`` topics (the language reference sections ``help('FOR')`` shows), in key order."""
    from pydoc_data.topics import topics as table

    return [table[k].strip() for k in sorted(table)]


@functools.lru_cache(maxsize=4)
def module_splits(cache_dir: str | None = None) -> dict[str, dict[str, str]]:
    """family -> {module: split} for every family (top-level package) with at least 3 modules that have
    docstrings: modules largest first, each to the split furthest below its share of the family's docstrings;
    a held-out split left empty takes the smallest training module."""
    by_family: dict[str, dict[str, int]] = {}
    for module, _ in stdlib_docstrings(cache_dir):
        sizes = by_family.setdefault(module.split(".", 1)[0], {})
        sizes[module] = sizes.get(module, 0) + 1
    shares = {"train": 1 - sum(HELD_OUT.values()), **HELD_OUT}
    splits = {}
    for family, sizes in sorted(by_family.items()):
        if len(sizes) < 3:
            continue
        total, filled, assignment = sum(sizes.values()), dict.fromkeys(shares, 0), {}
        for module in sorted(sizes, key=lambda m: (-sizes[m], m)):
            split = max(shares, key=lambda s: shares[s] * total - filled[s])  # ties: train, then val
            assignment[module] = split
            filled[split] += sizes[module]
        for split in HELD_OUT:
            if filled[split] == 0:
                module = min((m for m, s in assignment.items() if s == "train"), key=lambda m: (sizes[m], m))
                assignment[module] = split
                filled[split] = filled["train"] = -1  # marks only: the shares are not used again
        splits[family] = assignment
    return splits


def labeled_task(families: int = 15, cache_dir: str | None = None):
    """{"train"|"val"|"test": (texts, labels)} and the class names (families, largest first)."""
    splits = module_splits(cache_dir)
    docs = [(m, t) for m, t in stdlib_docstrings(cache_dir) if m.split(".", 1)[0] in splits]
    counts: dict[str, int] = {}
    for _, text in docs:
        counts[text] = counts.get(text, 0) + 1
    kept = [(m, t) for m, t in docs if counts[t] == 1 and len(t.split()) >= MIN_WORDS]
    sizes: dict[str, int] = {}
    for module, _ in kept:
        family = module.split(".", 1)[0]
        sizes[family] = sizes.get(family, 0) + 1
    classes = sorted(sizes, key=lambda f: (-sizes[f], f))[:families]
    out = {s: ([], []) for s in ("train", "val", "test")}
    for module, text in kept:
        family = module.split(".", 1)[0]
        if family in classes:
            texts, labels = out[splits[family][module]]
            texts.append(text)
            labels.append(classes.index(family))
    return out, tuple(classes)


def corpus_documents(cache_dir: str | None = None) -> list[str]:
    """The topics, then every docstring not held out by the labeled task (one document each): neither from a
    held-out module nor equal to a text of one (the same docstring recurs in other modules)."""
    splits = module_splits(cache_dir)
    held_out = {m for assignment in splits.values() for m, s in assignment.items() if s != "train"}
    held_texts = {t for m, t in stdlib_docstrings(cache_dir) if m in held_out}
    return topics() + [t for m, t in stdlib_docstrings(cache_dir) if m not in held_out and t not in held_texts]
