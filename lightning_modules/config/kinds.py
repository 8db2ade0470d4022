"""The kinds of rule a config value obeys, written once; ``rules/`` states each key's rule with them, one module
per config group.

    Rule(int, low=0)                                   # numbers, with bounds
    Choice("skip", "fail")                             # words
    Flag()                                             # true / false
    Text(r"[\\w./-]+", "a tokenizer name or path")      # strings matching a pattern
    ExistingPath("file", nullable=True)                # paths that must exist
    ListOf(Rule(int, low=1), min_len=1)                # lists
    Section()                                          # a mapping (its keys have rules too)
    Custom(check_init, "none, timm, ...")              # anything else: a function
    Together((key, key), test, "what must hold")       # a rule over several keys

A bad value gives one line: the key, the value, what is allowed. No torch here.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from lightning_modules.core.errors import ConfigError, show


def invalid(key: str, value, allowed: str, why: str = "is invalid") -> ConfigError:
    return ConfigError(f"{key}={show(value)} {why}: allowed is {allowed}")


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class Rule:
    """A number: ``kind`` int or float (an int is a valid float; a bool is neither; nan and inf never are)."""

    kind: type
    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself excluded
    high_open: bool = False
    words: tuple = ()  # words allowed besides numbers, e.g. ("all",)
    nullable: bool = False  # null allowed (it means "off" or "no limit")

    def allowed(self) -> str:
        text = "an integer" if self.kind is int else "a number"
        if self.low is not None and self.high is not None:
            text += f" in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"
        elif self.low is not None:
            text += f" {'>' if self.low_open else '>='} {self.low}"
        elif self.high is not None:
            text += f" {'<' if self.high_open else '<='} {self.high}"
        extras = [repr(w) for w in self.words] + (["null"] if self.nullable else [])
        return text + "".join(f" or {e}" for e in extras)

    def check(self, key: str, value):
        if value is None and self.nullable or isinstance(value, str) and value in self.words:
            return value
        right_type = isinstance(value, int) if self.kind is int else is_number(value)
        if not is_number(value) or not right_type or not math.isfinite(value):
            raise invalid(key, value, self.allowed())
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if too_low or too_high:
            raise invalid(key, value, self.allowed(), "is out of range")
        return value


@dataclass(frozen=True, init=False)
class Choice:
    """One of a few words (or numbers): compared by type and value, so ``true`` is not ``1``."""

    words: tuple
    nullable: bool = False

    def __init__(self, *words, nullable: bool = False):
        object.__setattr__(self, "words", words)
        object.__setattr__(self, "nullable", nullable)

    def allowed(self) -> str:
        return "one of " + ", ".join(show(w) for w in self.words) + (" or null" if self.nullable else "")

    def check(self, key: str, value):
        if value is None and self.nullable or any(type(value) is type(w) and value == w for w in self.words):
            return value
        words = ", ".join(show(w) for w in self.words) + (", null" if self.nullable else "")
        raise ConfigError(f"{key}={show(value)} is invalid: allowed are {words}")


@dataclass(frozen=True)
class Flag:
    """true or false."""

    nullable: bool = False

    def allowed(self) -> str:
        return "true, false" + (", null" if self.nullable else "")

    def check(self, key: str, value):
        if isinstance(value, bool) or value is None and self.nullable:
            return value
        raise ConfigError(f"{key}={show(value)} is invalid: allowed are {self.allowed()}")


@dataclass(frozen=True)
class Text:
    """A string matching ``pattern`` (whole string); ``what`` says it in words."""

    pattern: str = r".+"
    what: str = "a non-empty string"
    nullable: bool = False

    def allowed(self) -> str:
        return self.what + (" or null" if self.nullable else "")

    def check(self, key: str, value):
        if value is None and self.nullable:
            return value
        if not isinstance(value, str) or not re.fullmatch(self.pattern, value):
            raise invalid(key, value, self.allowed())
        return value


@dataclass(frozen=True)
class ExistingPath:
    """A path that must exist: ``kind`` "file", "dir" or "any"; ``words`` allowed besides (e.g. "last")."""

    kind: str = "any"
    nullable: bool = False
    words: tuple = ()

    def allowed(self) -> str:
        what = {"file": "an existing file", "dir": "an existing directory"}.get(self.kind, "an existing path")
        return what + "".join(f" or {w!r}" for w in self.words) + (" or null" if self.nullable else "")

    def check(self, key: str, value):
        if value is None and self.nullable or isinstance(value, str) and value in self.words:
            return value
        if not isinstance(value, str) or not value.strip():
            raise invalid(key, value, self.allowed())
        path = Path(value).expanduser()
        try:
            found = path.is_file() if self.kind == "file" else path.is_dir() if self.kind == "dir" else path.exists()
        except OSError as err:  # e.g. a name too long for the file system
            raise ConfigError(f"{key}={value}: {err.strerror or err}") from None
        if not found:
            raise ConfigError(f"{key}={value}: no such {'path' if self.kind == 'any' else self.kind}")
        return value


@dataclass(frozen=True)
class ListOf:
    """A list whose items each obey ``item``; an item's mistake names it as ``key[i]``."""

    item: object
    min_len: int = 0
    max_len: int | None = None
    ascending: bool = False
    nullable: bool = False

    def allowed(self) -> str:
        if self.min_len == self.max_len:
            size = f"{self.min_len}"
        elif self.max_len is None:
            size = f"at least {self.min_len}" if self.min_len else "any number of"
        else:
            size = f"{self.min_len} to {self.max_len}"
        order = ", in ascending order" if self.ascending else ""
        return f"a list of {size} items, each {self.item.allowed()}{order}" + (" or null" if self.nullable else "")

    def check(self, key: str, value):
        if value is None and self.nullable:
            return value
        if not isinstance(value, Sequence) or isinstance(value, str):  # a list, a tuple, Hydra's ListConfig
            raise invalid(key, value, self.allowed())
        items = list(value)
        if len(items) < self.min_len or self.max_len is not None and len(items) > self.max_len:
            raise invalid(key, items, self.allowed())
        for i, item in enumerate(items):
            self.item.check(f"{key}[{i}]", item)
        if self.ascending and items != sorted(items):
            raise invalid(key, items, self.allowed())
        return value


@dataclass(frozen=True)
class Custom:
    """Whatever the other kinds cannot say: ``test(key, value)`` returns the value or raises a ConfigError."""

    test: Callable
    what: str

    def allowed(self) -> str:
        return self.what

    def check(self, key: str, value):
        return self.test(key, value)


@dataclass(frozen=True)
class Section:
    """A group of keys (a mapping; null: none), each with rules of its own; ``component``: it is built from
    its ``_target_``. Its keys are checked too (a section's rule does not cover them, unlike other kinds')."""

    nullable: bool = True
    component: bool = False

    def allowed(self) -> str:
        return "a mapping" + (" with a _target_" if self.component else "") + (" or null" if self.nullable else "")

    def check(self, key: str, value):
        if value is None and self.nullable:
            return value
        if not isinstance(value, Mapping) or self.component and "_target_" not in value:
            raise invalid(key, value, self.allowed())
        return value


@dataclass(frozen=True)
class Together:
    """A rule over several keys, applied where all of them are set and each obeys its own rule."""

    keys: tuple
    test: Callable  # called with the values of ``keys``, in order; True when they fit together
    # what must hold, e.g. "val_fraction + test_fraction must be below 1" (the line names every key and value);
    # or a function of the values giving the whole line, where a check made at run time already words it
    says: str | Callable

    def check(self, values: dict) -> None:
        found = [values[k] for k in self.keys]
        if self.test(*found):
            return
        if callable(self.says):
            raise ConfigError(self.says(*found))
        raise ConfigError(", ".join(f"{k}={show(v)}" for k, v in zip(self.keys, found, strict=True)) + f": {self.says}")


# Rules many groups share.
POSITIVE = Rule(float, low=0, low_open=True)
FRACTION = Rule(float, low=0, high=1, low_open=True)  # (0, 1]
OPEN_FRACTION = Rule(float, low=0, high=1, low_open=True, high_open=True)  # (0, 1)
PROBABILITY = Rule(float, low=0, high=1)
SEED = Rule(int, low=0, high=2**32 - 1)  # numpy's and scikit-learn's seeds (Lightning's seed_everything)
WIDTH = Rule(int, low=1, high=65536)  # a layer's width: the bound only catches a typo's 1e9
DEPTH = Rule(int, low=0, high=1024)
TARGET = Text(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+", "a dotted path to a class, e.g. mypkg.data.MyDataModule")
METRIC = Text(r"(train|val|test|zero_shot|retrieval)/[\w./@-]+", "a logged metric, e.g. val/acc or val/loss")
PATH = Text(r"\s*\S.*", "a path")
