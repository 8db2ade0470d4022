"""The rules for the config's values, in one table.

Every key a user can set is either in ``RULES`` (checked by ``config/check.py`` on the composed config
before anything heavy is imported, and by the component itself through ``check(key, value)`` when built
from Python) or in ``PASSED_THROUGH``, which names the library that validates it when the component is
built (its error then becomes the same one line: ``config/library.py``). ``tests/test_config_coverage.py``
walks every composed config and fails on a key that is in neither, naming the line to add.

Adding a rule is one line; a key may be a pattern (``*`` is one segment, ``**`` one or more):

    "datamodule.num_workers": Rule(int, low=0),                          # numbers, with bounds
    "datamodule.on_bad_sample": Choice("skip", "fail"),                  # words
    "freeze.image": Flag(),                                              # true / false
    "objective.tokenizer": Text(r"[\\w./-]+", "a tokenizer name or path"), # strings matching a pattern
    "model.init_map": ExistingPath("file", nullable=True),               # paths that must exist
    "datamodule.sizes": ListOf(Rule(int, low=1), min_len=1),             # lists
    "datamodule.tokenizer": Section(),                                   # a mapping (its keys have rules too)
    "model.init": Custom(check_init, "none, timm, ..."),                 # anything else: a function

and a rule over several keys is one entry of ``TOGETHER``:

    Together(("datamodule.val_fraction", "datamodule.test_fraction"), lambda v, t: v + t < 1, "sum below 1"),

A bad value gives one line: the key, the value, what is allowed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from lightning_modules.config.errors import ConfigError
from lightning_modules.config.modalities import BACKBONE_TYPES


def show(value) -> str:
    """A value as it would be typed on the command line: strings quoted, null, true/false, nan."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {show(v)}" for k, v in value.items()) + "}"
    return repr(value) if isinstance(value, str) else str(value)


def _invalid(key: str, value, allowed: str, why: str = "is invalid") -> ConfigError:
    return ConfigError(f"{key}={show(value)} {why}: allowed is {allowed}")


def _is_number(value) -> bool:
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
        right_type = isinstance(value, int) if self.kind is int else _is_number(value)
        if not _is_number(value) or not right_type or not math.isfinite(value):
            raise _invalid(key, value, self.allowed())
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if too_low or too_high:
            raise _invalid(key, value, self.allowed(), "is out of range")
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
            raise _invalid(key, value, self.allowed())
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
            raise _invalid(key, value, self.allowed())
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
            raise _invalid(key, value, self.allowed())
        items = list(value)
        if len(items) < self.min_len or self.max_len is not None and len(items) > self.max_len:
            raise _invalid(key, items, self.allowed())
        for i, item in enumerate(items):
            self.item.check(f"{key}[{i}]", item)
        if self.ascending and items != sorted(items):
            raise _invalid(key, items, self.allowed())
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
            raise _invalid(key, value, self.allowed())
        return value


@dataclass(frozen=True)
class Together:
    """A rule over several keys, applied where all of them are set and each obeys its own rule."""

    keys: tuple
    test: Callable  # called with the values of ``keys``, in order; True when they fit together
    says: str  # what must hold, e.g. "val_fraction + test_fraction must be below 1"

    def check(self, values: dict) -> None:
        if not self.test(*(values[k] for k in self.keys)):
            raise ConfigError(", ".join(f"{k}={show(values[k])}" for k in self.keys) + f": {self.says}")


def _check_preprocessing(key: str, value):
    """model.mean / model.std: null, or a list of numbers (std > 0), one per input channel or RGB."""
    if value is None:
        return value
    numbers = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else None
    positive = key.endswith("std")
    if not numbers or not all(_is_number(v) and math.isfinite(v) and (v > 0 or not positive) for v in numbers):
        allowed = "a list of numbers > 0" if positive else "a list of numbers"
        raise ConfigError(f"{key}={show(value)} is invalid: allowed is null or {allowed}, one per channel")
    return value


def _check_init_map(key: str, value):
    from lightning_modules.backbones.weight_files import check_init_map  # light: no torch

    with _as_key(key):
        check_init_map(value)
    return value


def _as_key(key: str):
    """Checks that name the model's own keys (``model.init_map=...``) run for ``key``: for a tower's key
    (``model.text.init_map``) their lines name the tower's (modalities.tower_errors); else nothing changes."""
    from lightning_modules.config.modalities import tower_errors

    parts = key.split(".")
    return tower_errors(parts[1], {parts[2]: None}) if len(parts) == 3 else nullcontext()


def _check_type(key: str, value):
    if not isinstance(value, str) or value not in BACKBONE_TYPES:
        raise ConfigError(f"{key}={value} is unknown: allowed are {sorted(BACKBONE_TYPES)}")
    return value


def _check_init(key: str, value):
    """model.init (and a tower's, model.<tower>.init): none, timm, a W&B artifact (fetched when the run starts:
    only its form is checked here), or a directory holding a backbone/ (found here, so a typo fails at once)."""
    if not isinstance(value, str) or not value:
        raise _invalid(key, value, INIT)
    with _as_key(key):
        _check_init_source("model.init", value)
    return value


def _check_init_source(key: str, value: str) -> None:
    """What model.init names is there (its form, for a W&B artifact fetched when the run starts)."""
    if value.startswith("wandb:"):
        if value.count("/") != 2 or ":" not in value.removeprefix("wandb:"):
            raise ConfigError(f"{key}={value} is invalid: allowed is wandb:<entity>/<project>/<name>:<alias>")
    elif value.startswith("file:"):  # a weight file (safetensors, .pth ...): the form, and that it is there
        from lightning_modules.backbones.weight_files import weight_file_path

        weight_file_path(value)
    elif value.startswith("hf:"):  # a local model dir, or a hub name (not when offline, unless cached)
        from lightning_modules.config.modalities import hf_local_dir

        hf_local_dir(value.removeprefix("hf:"))
    elif value not in ("none", "timm"):
        from lightning_modules.backbones.handoff import find_backbone_dir  # light: no torch

        try:
            find_backbone_dir(value)  # raises a ConfigError naming model.init when there is nothing there
        except OSError as err:  # e.g. a name too long for the file system
            raise ConfigError(f"{key}={value}: {err.strerror or err}") from None


def _check_data_path(key: str, value):
    """datamodule.path: a file of texts or pairs, a directory of prepared shards, or their URL (s3://, gs://...)."""
    if value is None or isinstance(value, str) and re.match(r"[a-z][a-z0-9+]*://", value):
        return value
    return ExistingPath("any").check(key, value)


def _check_tokenizer(key: str, value):
    """model.tokenizer: null (trained on the data), or the backbone whose tokenizer a scratch run takes."""
    if value is None:
        return value
    if not isinstance(value, str) or not value.strip():
        raise _invalid(key, value, "null, a pre-training run dir, a backbone/ dir or hf:<model>")
    from lightning_modules.backbones.tokenizer import tokenizer_dir  # light: no torch

    with _as_key(key):
        tokenizer_dir(value)  # raises a ConfigError naming model.tokenizer when there is nothing there
    return value


INIT = (
    "none, timm, file:<weights>, hf:<model dir or hub name>, wandb:<entity>/<project>/<name>:<alias>,"
    " a run dir or a backbone/ dir"
)
POSITIVE = Rule(float, low=0, low_open=True)
FRACTION = Rule(float, low=0, high=1, low_open=True)  # (0, 1]
PROBABILITY = Rule(float, low=0, high=1)
SEED = Rule(int, low=0, high=2**32 - 1)  # numpy's and scikit-learn's seeds (Lightning's seed_everything)
WIDTH = Rule(int, low=1, high=65536)  # a layer's width: the bound only catches a typo's 1e9
DEPTH = Rule(int, low=0, high=1024)
TARGET = Text(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+", "a dotted path to a class, e.g. mypkg.data.MyDataModule")
METRIC = Text(r"(train|val|test|zero_shot|retrieval)/[\w./@-]+", "a logged metric, e.g. val/acc or val/loss")
PATH = Text(r"\s*\S.*", "a path")
# Image augmentation (datamodule.augment.* for labeled batches, objective.augment.* for SimCLR's views).
# Images are normalised to mean 0, std 1: brightness and noise are in standard deviations.
AUGMENT = {
    "scale": ListOf(Rule(float, low=0, high=1, low_open=True), 2, 2, ascending=True),  # crop area fraction
    "rotate": Rule(float, low=0, high=180),  # degrees, either way
    "translate": Rule(float, low=0, high=1),  # fraction of the image
    "flip": Flag(),
    "brightness": Rule(float, low=0, high=5),
    "contrast": Rule(float, low=0, high=1),  # 1 + U(-c, c): above 1 it would invert images
    "noise": Rule(float, low=0, high=5),
    "erase": PROBABILITY,
}

RULES: dict[str, object] = {
    # the run
    "stage": Choice("pretrain", "finetune", "evaluate"),
    "seed": SEED,
    "optimized_metric": METRIC,  # that the objective logs it is checked once the objective is built
    "optimized_mode": Choice("min", "max"),
    "ckpt_path": ExistingPath("any", nullable=True, words=("last",)),  # a file, a run dir, or last
    "paths.root_dir": PATH,
    "paths.log_dir": PATH,
    "paths.output_dir": PATH,  # made when the run starts; a failure there is one line too
    "finetune": Section(),
    "callbacks": Section(),
    "callbacks.*": Section(component=True),
    "logger": Section(),
    "logger.*": Section(component=True),
    # model
    "model.type": Custom(_check_type, "a model.type listed in config/modalities.py"),
    "model.name": Text(r"[\w.\-/]+", "a model name, e.g. resnet18 or vit_tiny_patch16_224"),
    "model.init": Custom(_check_init, INIT),
    "model.compile": Flag(),
    "model.channels_last": Choice("auto", True, False),
    "model.kwargs": Section(),
    # weights trained elsewhere (model.init=timm, file:): which tensor goes where, and their preprocessing
    "model.init_map": Custom(_check_init_map, "null, positional or a list of rules (see weight_files.py)"),
    "model.input_size": Rule(int, low=4, nullable=True),  # null: the weights' pretrained input size, or the data's
    "model.mean": Custom(_check_preprocessing, "null or a list of numbers, one per channel"),  # null: the weights'
    "model.std": Custom(_check_preprocessing, "null or a list of numbers > 0, one per channel"),
    # text backbones built from scratch (model=bert_micro, gpt_micro)
    "model.layers": Rule(int, low=1, high=1024),
    "model.hidden": WIDTH,
    "model.heads": Rule(int, low=1, high=1024),
    "model.intermediate": WIDTH,
    "model.max_positions": Rule(int, low=4, high=1 << 20),
    "model.vocab_size": Rule(int, low=300, high=1 << 22),  # byte-level BPE alone starts from 256 byte tokens
    "model.dropout": Rule(float, low=0, high=1, high_open=True),
    "model.pooling": Choice("cls", "mean", "last"),
    "model.tokenizer": Custom(_check_tokenizer, "null, a pre-training run dir, a backbone/ dir or hf:<model>"),
    # data
    "datamodule._target_": TARGET,
    "datamodule.root": ExistingPath("dir"),
    "datamodule.batch_size": Rule(int, low=1),
    "datamodule.eval_batch_size": Rule(int, low=1),
    "datamodule.image_size": Rule(int, low=4, high=1024),  # held in memory: 1024 is already 1 MB an image
    "datamodule.channels": Choice(1, 3),  # grey or RGB
    "datamodule.label_fraction": FRACTION,
    "datamodule.label_seed": SEED,
    "datamodule.split_seed": SEED,
    "datamodule.val_fraction": Rule(float, low=0, high=1, low_open=True, high_open=True),
    "datamodule.test_fraction": Rule(float, low=0, high=1, low_open=True, high_open=True),
    "datamodule.train_batches_per_epoch": Rule(int, low=1, nullable=True),
    "datamodule.device_budget": Rule(float, low=0, high=1),  # fraction of the GPU's memory for the splits
    "datamodule.augment": Section(),
    **{f"datamodule.augment.{k}": rule for k, rule in AUGMENT.items()},
    # text data (datamodule=text_corpus, text_classification)
    "datamodule.max_length": Rule(int, low=4),  # tokens per example: [CLS] + text + [SEP] needs room
    "datamodule.document": Choice("file", "line"),
    "datamodule.paths": ListOf(Text(r"\s*\S.*", "a .txt file or a glob"), min_len=1, nullable=True),
    "datamodule.path": Custom(_check_data_path, "null, an existing file or directory, or a URL"),  # null: embedded
    "datamodule.val_path": ExistingPath("file", nullable=True),
    "datamodule.test_path": ExistingPath("file", nullable=True),
    "datamodule.text_column": Text(),
    "datamodule.label_column": Text(),
    "datamodule.families": Rule(int, low=2),
    "datamodule.shuffle_seed": SEED,
    "datamodule.cache_dir": Text(r"\s*\S.*", "a directory", nullable=True),  # null: parse every time
    # objectives
    "objective._target_": TARGET,
    # image–caption pairs (datamodule=image_text)
    "datamodule.image_column": Text(),
    "datamodule.caption_column": Text(),
    "datamodule.captions": ListOf(Text(), min_len=1),  # the embedded pairs' templates ({word}, {digit})
    # streaming (datamodule=image_folder, shards)
    "datamodule.loading": Choice("auto", "memory", "stream"),
    "datamodule.memory_budget_gb": Rule(float, low=0),
    "datamodule.num_workers": Rule(int, low=0, nullable=True),  # null: this node's cores / its processes
    "datamodule.on_bad_sample": Choice("error", "skip"),
    "datamodule.seed": SEED,  # shards: litdata's shuffle and every image's transform
    "datamodule.transforms": Section(),
    "datamodule.transforms.scale": ListOf(Rule(float, low=0, high=1, low_open=True), 2, 2, ascending=True),
    "datamodule.transforms.ratio": ListOf(POSITIVE, 2, 2, ascending=True),
    "datamodule.transforms.flip": Flag(),
    "datamodule.transforms.auto_augment": Choice("randaugment", "trivialaugment", "autoaugment", nullable=True),
    "datamodule.transforms.eval_crop_pct": FRACTION,
    "objective.mask_ratio": Rule(float, low=0, high=1, low_open=True, high_open=True),
    "objective.decoder_dim": WIDTH,
    "objective.decoder_depth": DEPTH,
    "objective.decoder_heads": Rule(int, low=1, high=1024),
    "objective.norm_pix_loss": Flag(),
    "objective.temperature": POSITIVE,
    "objective.proj_hidden": WIDTH,
    "objective.proj_dim": WIDTH,
    "objective.proj_bn": Flag(),
    "objective.augment": Section(),
    **{f"objective.augment.{k}": rule for k, rule in AUGMENT.items()},
    "objective.label_smoothing": Rule(float, low=0, high=1, high_open=True),
    "objective.head_dropout": Rule(float, low=0, high=1, high_open=True),
    "objective.mixup": Rule(float, low=0),  # the Beta alpha; 0 = off
    "objective.cutmix": Rule(float, low=0),
    "objective.mix_prob": PROBABILITY,
    "objective.embed_dim": WIDTH,  # CLIP's shared embedding space
    "objective.learn_temperature": Flag(),
    "objective.max_logit_scale": Rule(float, low=1),
    "objective.mlm_probability": Rule(float, low=0, high=1, low_open=True, high_open=True),
    "objective.mask_replace_prob": PROBABILITY,
    "objective.random_replace_prob": PROBABILITY,
    # fine-tuning
    "freeze._target_": TARGET,
    "freeze.layers": Rule(int, low=0, words=("all",)),  # its upper bound is the backbone's, checked on it
    "freeze.image": Rule(int, low=0, words=("all",), nullable=True),  # a dual encoder's tower; null: the strategy's
    "freeze.text": Rule(int, low=0, words=("all",), nullable=True),
    "freeze.start": Rule(int, low=0),
    "freeze.every": Rule(int, low=1),
    "freeze.probe_epochs": Rule(int, low=0),
    "freeze.ft_lr_scale": Rule(float, low=0, high=1, low_open=True),
    "freeze.train_bn": Flag(),
    "finetune.l2_sp": Rule(float, low=0),
    "finetune.measure_forgetting": Flag(),
    "finetune.cache_features": Flag(),  # a backbone frozen throughout: its features computed once
    # optimizer and schedule
    "optimizer.name": Choice("adamw", "adam", "sgd"),
    "optimizer.lr": POSITIVE,
    "optimizer.weight_decay": Rule(float, low=0),
    "optimizer.betas": ListOf(Rule(float, low=0, high=1, high_open=True), 2, 2),
    "optimizer.momentum": Rule(float, low=0, high=1, high_open=True),
    "optimizer.nesterov": Flag(),
    "optimizer.backbone_lr_scale": Rule(float, low=0),
    "optimizer.layer_decay": Rule(float, low=0, high=1, low_open=True, nullable=True),
    "optimizer.implementation": Choice("auto", "fused", "foreach", "loop"),  # auto: the fastest on the device
    "float32_matmul_precision": Choice("auto", "highest", "high", "medium"),
    "scheduler.name": Choice("cosine", "step", "plateau", "none"),
    "scheduler.warmup_fraction": Rule(float, low=0, high=1, high_open=True),
    "scheduler.min_lr_ratio": PROBABILITY,
    "scheduler.step_epochs": POSITIVE,
    "scheduler.gamma": FRACTION,
    "scheduler.patience": Rule(int, low=0),
    "scheduler.monitor": METRIC,
    "scheduler.mode": Choice("min", "max"),
    # the trainer: Lightning checks the rest (PASSED_THROUGH); these it accepts when built, then fails on
    "trainer._target_": TARGET,
    "trainer.max_epochs": Rule(int, low=-1, nullable=True),  # -1: no limit (Lightning's meaning)
    "trainer.check_val_every_n_epoch": Rule(int, low=1, nullable=True),  # null: by val_check_interval only
    "trainer.accumulate_grad_batches": Rule(int, low=1),
    "**._target_": TARGET,  # callbacks, loggers, strategies: Hydra reports one it cannot import
    # last.ckpt's cadence (callbacks/checkpoint.py): each replaces every_n_epochs
    "callbacks.last_checkpoint.every_n_epochs": Rule(int, low=1, nullable=True),
    "callbacks.last_checkpoint.every_n_train_steps": Rule(int, low=1, nullable=True),
    "callbacks.last_checkpoint.every_minutes": Rule(float, low=0, low_open=True, nullable=True),
    # scripts/evaluate.py
    "task": Choice("zero_shot", "retrieval"),
    "device": Text(r"auto|cpu|cuda(:\d+)?", "auto, cpu, cuda or cuda:<index>"),
    "zero_shot": Section(),
    "zero_shot.split": Choice("train", "val", "test"),
    "zero_shot.class_names": ListOf(Text(), min_len=1, nullable=True),
    "zero_shot.templates": ListOf(Text(r".*\{\}.*", "a template with {} for the class name"), min_len=1),
    "zero_shot.batch_size": Rule(int, low=1),
    "retrieval": Section(),
    "retrieval.split": Choice("train", "val"),
    "retrieval.batch_size": Rule(int, low=1),
}
# A dual encoder's towers are model configs of their own: model.image.* any timm preset's keys, model.text.* any
# text preset's (model@model.image=resnet_micro puts resnet_micro's keys there).
TOWER_KEYS = {
    "image": ("type", "name", "init", "compile", "channels_last", "init_map", "input_size", "mean", "std"),
    "text": ("type", "name", "init", "compile", "layers", "hidden", "heads", "intermediate", "max_positions")
    + ("vocab_size", "dropout", "pooling", "tokenizer"),
}
RULES |= {f"model.{tower}.{key}": RULES[f"model.{key}"] for tower, names in TOWER_KEYS.items() for key in names}

# Keys checked by the library that receives them, when it is built (its message, one line, names the key).
PASSED_THROUGH: dict[str, str] = {
    "trainer": "Lightning's Trainer (pytorch_lightning.Trainer arguments, type-checked against its signature)",
    "callbacks": "Lightning's callbacks (ModelCheckpoint, EarlyStopping, ...)",
    "logger": "Lightning's loggers (CSVLogger, TensorBoardLogger, WandbLogger)",
    "model.kwargs": "timm.create_model's keyword arguments",
    "model.image.kwargs": "timm.create_model's keyword arguments (a dual encoder's image tower)",
    "hydra": "Hydra",
}

# The config groups a run cannot do without (``~trainer`` on the command line removes one).
REQUIRED_GROUPS = {
    "pretrain": ("datamodule", "model", "objective", "optimizer", "scheduler", "trainer"),
    "finetune": ("datamodule", "model", "objective", "optimizer", "scheduler", "trainer", "freeze"),
    "evaluate": ("datamodule", "model"),
}

# Rules over several keys; a key here may be one passed through (the model's kwargs must fit the data).
TOGETHER: list[Together] = [
    Together(
        ("datamodule.val_fraction", "datamodule.test_fraction"),
        lambda val, test: val + test < 1,
        "val_fraction + test_fraction must be below 1 (the rest is the training split)",
    ),
    Together(
        ("datamodule._target_", "datamodule.path"),
        lambda target, path: (
            path is None or "://" in path or Path(path).is_dir() == target.endswith(".ShardsDataModule")
        ),
        "prepared shards (datamodule=shards) are a directory or URL; the other datamodules read a file",
    ),
    Together(
        ("model.tokenizer", "model.init"),
        lambda tokenizer, init: tokenizer is None or init == "none",
        "model.tokenizer is for a backbone built from scratch (model.init=none); a pre-trained one brings its own",
    ),
    Together(
        ("optimizer.nesterov", "optimizer.momentum"),
        lambda nesterov, momentum: not nesterov or momentum > 0,
        "nesterov=true needs a momentum > 0",
    ),
    Together(
        ("trainer.max_epochs", "trainer.max_steps"),
        lambda epochs, steps: epochs != -1 or isinstance(steps, int) and steps > 0,
        "no limit on epochs needs a limit on steps: the learning-rate schedule spans the whole run",
    ),
    Together(
        ("model.kwargs.in_chans", "datamodule.channels"),
        lambda model, data: model == data,
        "the model's input channels must be the data's (leave model.kwargs.in_chans at ${datamodule.channels})",
    ),
    Together(
        ("model.kwargs.img_size", "datamodule.image_size"),
        lambda model, data: model == data,
        "the model's image size must be the data's (leave model.kwargs.img_size at ${datamodule.image_size})",
    ),
    Together(
        ("finetune.measure_forgetting", "model.init"),
        lambda measure, init: not measure or init not in ("none", "timm"),
        "measuring forgetting needs model.init to be a pretune pre-training run (its objective's heads)",
    ),
    Together(
        ("objective.decoder_dim", "objective.decoder_heads"),
        lambda dim, heads: dim % heads == 0,
        "decoder_dim must be a multiple of decoder_heads",
    ),
]

# The transfer study's own config (conf/transfer_study.yaml); its list entries are overrides of the stage
# configs, checked by composing those.
OVERRIDE = Text(r"[~+]{0,2}[\w./@-]+(=.*)?", "a Hydra override, e.g. optimizer.lr=1e-3")
STUDY_RULES: dict[str, object] = {
    **{key: rule for key, rule in RULES.items() if key.startswith("paths.")},
    "seeds": ListOf(SEED, min_len=1),
    "label_fractions": ListOf(FRACTION, min_len=1),
    "common": ListOf(OVERRIDE),
    "pretrain": ListOf(OVERRIDE),
    "finetune": ListOf(OVERRIDE),
    "strategies.*.pretrained": Flag(),
    "strategies.*.overrides": ListOf(OVERRIDE),
    "strategies.*.lrs": ListOf(POSITIVE, min_len=1),
    "strategies.*.label_fractions": ListOf(FRACTION, min_len=1),
    "strategies.*.frozen_groups": Rule(int, low=0, words=("all",)),
    "strategies.*.init": Choice("model"),  # keep the model config's own model.init (weights from elsewhere)
    "strategies.*.start": Text(),  # what the report calls the starting point
    "strategies.*.tokenizer": Choice("pretrained"),  # random weights on the study's pre-trained vocabulary
}


def _match(pattern: list[str], key: list[str]) -> bool:
    if not pattern:
        return not key
    if not key:
        return False
    head = pattern[0]
    if head == "**":
        return any(_match(pattern[1:], key[i:]) for i in range(1, len(key) + 1))
    return (head == "*" or head == key[0]) and _match(pattern[1:], key[1:])


def rule_for(key: str, rules: dict | None = None):
    """The rule for ``key``: its own entry, else the most specific pattern that matches; None if none."""
    rules = RULES if rules is None else rules
    if key in rules:
        return rules[key]
    parts = key.split(".")
    matches = [p for p in rules if "*" in p and _match(p.split("."), parts)]
    if not matches:
        return None
    return rules[max(matches, key=lambda p: sum(s not in ("*", "**") for s in p.split(".")))]


def passed_through(key: str) -> str | None:
    """Which library validates ``key`` (it or a parent is in PASSED_THROUGH); None if none."""
    parts = key.split(".")
    for prefix, library in PASSED_THROUGH.items():
        n = len(prefix.split("."))
        if _match(prefix.split("."), parts[:n]):
            return library
    return None


def check(key: str, value):
    """``value`` if it obeys ``key``'s rule, else a ConfigError naming both."""
    rule = rule_for(key)
    if rule is None:
        raise KeyError(f"no rule for {key} in lightning_modules/config/schema.py")
    return rule.check(key, value)


def check_together(values: dict) -> None:
    """Apply every TOGETHER rule whose keys are all in ``values`` (key -> value)."""
    for rule in TOGETHER:
        if all(k in values for k in rule.keys):
            rule.check(values)
