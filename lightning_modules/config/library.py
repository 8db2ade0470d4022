"""Keys passed through to a library (``schema.PASSED_THROUGH``) get the same one line as pretune's own rules.

Before a library component is built, its arguments are checked against the types its signature declares
(Lightning's ``Trainer(max_steps: int, precision: Literal[...], ...)``): Lightning checks few of them itself,
so ``trainer.max_steps=abc`` would otherwise fail mid-training. A value the library itself rejects when it
is built keeps the library's own message, on one line, with the key it is about in front:
``trainer.devices=0: `Trainer(devices=0)` value is not a valid input using cpu accelerator``.
"""

from __future__ import annotations

import inspect
import re
import traceback
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager

from lightning_modules.core.errors import ConfigError, message_of, show

OWN = ("datamodules.", "lightning_modules.")  # pretune's components: they check their arguments with RULES
OWN_MODULES = tuple(p.rstrip(".") for p in OWN)


def _leaves(values, prefix: str) -> dict:
    if isinstance(values, Mapping):
        out = {}
        for k, v in values.items():
            if not str(k).startswith("_"):
                out.update(_leaves(v, f"{prefix}.{k}"))
        return out
    return {prefix: values}


def _overridden() -> set[str]:
    """The keys the user set on the command line (Hydra's task overrides), when run as a Hydra app."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return set()
    return {o.split("=", 1)[0].lstrip("+~") for o in HydraConfig.get().overrides.task}


def culprit(prefix: str, values, message: str) -> str | None:
    """The key under ``prefix`` that ``message`` is about: the one it names (``devices=0``, ``Precision
    'fp8'``, ``plugin`` for ``plugins``), else whose word value it quotes (``gpu``); between equals, a key the
    user set, then the one named first. None when it names none."""
    overridden, ranked = _overridden(), []
    for key, value in _leaves(values, prefix).items():
        name = key.rsplit(".", 1)[-1]
        pattern = rf"\b{re.escape(name.removesuffix('s'))}s?\b"
        named = re.search(pattern, message, re.IGNORECASE)
        said = isinstance(value, str) and len(value) >= 3 and re.search(rf"\b{re.escape(value)}\b", message)
        score = 0
        if named:
            score = 3 if re.match(r"\s*=", message[named.end() :]) else 2
            score += isinstance(value, (str, int, float)) and not isinstance(value, bool) and str(value) in message
        elif said:
            score = 1
        if score:
            first = (named or said).start()
            ranked.append((score + (key in overridden), -first, key))
    return max(ranked)[2] if ranked else None


def library_error(prefix: str, values, err: BaseException, label: str | None = None) -> ConfigError:
    """A library's rejection of a value under ``prefix`` (``values``: the arguments it was given), as one line;
    ``label`` heads it when the message names no key (default: the prefix)."""
    message = message_of(err)
    key = culprit(prefix, values, message)
    if key is None:
        return ConfigError(f"{label or prefix}: {message}")
    value = _leaves(values, prefix)[key]
    return ConfigError(f"{key}={show(value)}: {message}")


def build(conf, key: str | None = None, **kwargs):
    """Hydra's ``instantiate`` of the config node at ``key``, where every refusal is one line naming the key:
    a component's own ConfigError as it is; a library's arguments checked against its signature first, and
    its own error, if it still refuses a value, unwrapped from Hydra's InstantiationException and traceback
    (config/library.py). Anything else (a bug in pretune's own code) is raised as it is."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    values = OmegaConf.to_container(conf, resolve=True) if OmegaConf.is_config(conf) else dict(conf)
    if key is None:  # the node's own place in the config (datamodule, callbacks.model_checkpoint, ...)
        key = (conf._get_full_key(None) if OmegaConf.is_config(conf) else "") or "component"
    target = str(values.get("_target_", ""))
    own = target.startswith(OWN)
    if importable(target) is not None:  # pretune's own classes: only what they pass on to a library they extend
        check_arguments(importable(target), {k: v for k, v in values.items() if k not in kwargs}, key, own)
    try:
        return instantiate(conf, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, ConfigError):
            raise cause from None
        if str(err).startswith("Error locating target"):
            raise ConfigError(f"{key}._target_={target}: cannot be imported ({message_of(cause or err)})") from err
        if cause is not None and (not own or bad_arguments(cause, "/hydra/") or raised_in_library(cause)):
            raise library_error(key, values, cause) from cause
        raise


def raised_in_library(err: BaseException) -> bool:
    """Whether ``err`` was raised inside an installed library (e.g. Lightning's ModelCheckpoint refusing a value
    that pretune's LastCheckpoint passed on), not in pretune's own code."""
    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and "site-packages" in frames[-1].filename


def bad_arguments(err: BaseException, caller: str) -> bool:
    """Whether ``err`` is a TypeError of the call itself (an unknown or missing argument), not one from inside
    the component: the innermost frame of its traceback is the caller's (a file whose path holds ``caller``)."""
    frames = traceback.extract_tb(err.__traceback__)
    return isinstance(err, TypeError) and bool(frames) and caller in frames[-1].filename


@contextmanager
def blamed_on(components: dict):
    """An error raised by one of ``components`` (key -> (the object, the config values it was built from))
    itself, such as a callback refusing the run it is in once training started, as one line naming its key.
    Only what the component's own method raised: an error from deeper (a file system, a bug elsewhere) is not
    the component's configuration, and goes on as it is."""
    try:
        yield
    except ConfigError:
        raise
    except Exception as err:
        frames = list(traceback.walk_tb(err.__traceback__))
        owner = frames[-1][0].f_locals.get("self") if frames else None
        key = next((k for k, (obj, _values) in components.items() if obj is owner), None)
        if key is None:
            raise
        raise library_error(key, components[key][1], err) from err


# --- the arguments against the signature ---------------------------------------------------------------


def _hints(target, library_only: bool = False) -> dict:
    """The annotations of ``target``'s parameters, each resolved if it can be. A class: its ``__init__``'s and
    those of the classes it extends (whose ``__init__`` takes what a subclass passes on through ``**kwargs``);
    ``library_only``: only those of classes outside pretune."""
    if not inspect.isclass(target):
        return _function_hints(target)
    hints = {}
    for klass in reversed(target.__mro__[:-1]):  # the base classes first, the class itself last (it wins)
        if "__init__" in vars(klass) and not (library_only and klass.__module__.startswith(OWN_MODULES)):
            hints.update(_function_hints(vars(klass)["__init__"]))
    return hints


def _function_hints(function) -> dict:
    try:
        return typing.get_type_hints(function)
    except Exception:  # an annotation naming what is only imported for type checkers: resolve one by one
        hints = {}
        for name, annotation in getattr(function, "__annotations__", {}).items():
            try:
                hints[name] = eval(annotation, function.__globals__) if isinstance(annotation, str) else annotation
            except Exception:
                continue
        return hints


def _fits(value, hint) -> bool | None:
    """Whether ``value`` (a plain config value) fits the annotation ``hint``; None when it cannot tell."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is typing.Any or hint is inspect.Parameter.empty or isinstance(hint, (str, typing.TypeVar)):
        return None
    if isinstance(value, Mapping) and "_target_" in value:
        return None  # Hydra builds it; its own arguments are checked on their own
    if origin in (typing.Union, types.UnionType):
        answers = [_fits(value, a) for a in args]
        return True if True in answers else None if None in answers else False
    if origin is typing.Literal:
        return any(type(value) is type(a) and value == a for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    container = origin or hint
    if container in (list, tuple, Sequence, Iterable) or container is typing.List:  # noqa: UP006
        if not isinstance(value, (list, tuple)):
            return False
        if len(args) == 1:
            answers = [_fits(v, args[0]) for v in value]
            return False if False in answers else None if None in answers else True
        return None
    if container in (dict, Mapping):
        return isinstance(value, Mapping) or False
    if inspect.isclass(hint):  # e.g. pathlib.Path, timedelta, Strategy: only a string might be converted
        return None if isinstance(value, str) else False if value is not None else None
    return None


def describe(hint) -> str:
    """An annotation in words: ``int, float or null``, ``one of 'warn'``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        words = [w for a in args if typing.get_origin(a) is typing.Literal for w in typing.get_args(a)]
        parts = [describe(a) for a in args if a is not type(None) and typing.get_origin(a) is not typing.Literal]
        if words:
            parts.append(describe(typing.Literal[tuple(words)]))
        text = ", ".join(parts)
        return text + " or null" if type(None) in args else text
    if origin is typing.Literal:
        return "one of " + ", ".join(show(a) for a in args)
    if hint is type(None):
        return "null"
    if origin is not None:
        return f"{getattr(origin, '__name__', origin)}[{', '.join(describe(a) for a in args)}]"
    return getattr(hint, "__name__", str(hint))


def check_arguments(target, values: Mapping, prefix: str, library_only: bool = False) -> None:
    """Refuse a value that cannot be what ``target``'s signature declares (nested ``_target_`` nodes too);
    ``library_only``: only what the library classes it extends declare (pretune's own are checked by RULES)."""
    hints = _hints(target, library_only)
    name = getattr(target, "__qualname__", str(target))
    for key, value in values.items():
        if str(key).startswith("_"):
            continue
        if key in hints and _fits(value, hints[key]) is False:
            raise ConfigError(f"{prefix}.{key}={show(value)} is invalid: {name} takes {describe(hints[key])}")
        if isinstance(value, Mapping) and isinstance(value.get("_target_"), str):
            nested = importable(value["_target_"])
            if nested is not None:
                check_arguments(nested, value, f"{prefix}.{key}", value["_target_"].startswith(OWN))


def importable(target: str):
    """The class or function a ``_target_`` names; None when it cannot be imported (Hydra will say why)."""
    from hydra.utils import get_object

    try:
        return get_object(target)
    except Exception:
        return None
