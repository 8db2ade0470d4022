"""The rules for the config's values, in one table.

``config_check`` applies them to the composed config before anything heavy is imported; the
components apply the same rule to their own arguments when built from Python. Either way a bad
value gives the same one line: the key, the value, what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass

from lightning_modules.config.errors import ConfigError


@dataclass(frozen=True)
class Rule:
    kind: type  # int or float (an int is a valid float; a bool is neither)
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
        if value is None and self.nullable or value in self.words:
            return value
        right_type = isinstance(value, int) if self.kind is int else isinstance(value, (int, float))
        if isinstance(value, bool) or not right_type:
            raise ConfigError(f"{key}={value!r} is invalid: allowed is {self.allowed()}")
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        if too_low or too_high:
            raise ConfigError(f"{key}={value!r} is out of range: allowed is {self.allowed()}")
        return value


@dataclass(frozen=True)
class Choice:
    """One of a few words (``words``), or any non-empty string when ``words`` is empty."""

    words: tuple = ()
    nullable: bool = False

    def allowed(self) -> str:
        text = ", ".join(repr(w) for w in self.words) if self.words else "a non-empty string"
        return text + (" or null" if self.nullable else "")

    def check(self, key: str, value):
        if value is None and self.nullable:
            return value
        ok = value in self.words if self.words else isinstance(value, str) and value.strip() != ""
        if not ok:
            raise ConfigError(f"{key}={value!r} is invalid: allowed {'are' if self.words else 'is'} {self.allowed()}")
        return value


POSITIVE = Rule(float, low=0, low_open=True)
FRACTION = Rule(float, low=0, high=1, low_open=True)  # (0, 1]

RULES: dict[str, Rule | Choice] = {
    "seed": Rule(int),
    "optimizer.lr": POSITIVE,
    "optimizer.weight_decay": Rule(float, low=0),
    "optimizer.backbone_lr_scale": Rule(float, low=0),
    "optimizer.layer_decay": Rule(float, low=0, high=1, low_open=True, nullable=True),
    "scheduler.warmup_fraction": Rule(float, low=0, high=1, high_open=True),
    "datamodule.batch_size": Rule(int, low=1),
    "datamodule.eval_batch_size": Rule(int, low=1),
    "datamodule.image_size": Rule(int, low=4),
    "datamodule.label_fraction": FRACTION,
    "datamodule.train_batches_per_epoch": Rule(int, low=1, nullable=True),
    "datamodule.val_fraction": Rule(float, low=0, high=1, low_open=True, high_open=True),
    "datamodule.test_fraction": Rule(float, low=0, high=1, low_open=True, high_open=True),
    # text data
    "datamodule.max_length": Rule(int, low=4),  # tokens per example: [CLS] + text + [SEP] needs room
    "datamodule.document": Choice(("file", "line")),
    "datamodule.path": Choice(nullable=True),
    "datamodule.val_path": Choice(nullable=True),
    "datamodule.test_path": Choice(nullable=True),
    "datamodule.text_column": Choice(),
    "datamodule.label_column": Choice(),
    "datamodule.families": Rule(int, low=2),
    # text backbones built from scratch
    "model.layers": Rule(int, low=1),
    "model.hidden": Rule(int, low=1),
    "model.heads": Rule(int, low=1),
    "model.intermediate": Rule(int, low=1),
    "model.max_positions": Rule(int, low=4),
    "model.vocab_size": Rule(int, low=300),  # byte-level BPE alone starts from 256 byte tokens
    "model.dropout": Rule(float, low=0, high=1, high_open=True),
    "model.pooling": Choice(("cls", "mean", "last")),
    "model.tokenizer": Choice(nullable=True),  # a pre-training run, backbone/ dir or hf:<model> (checked in check.py)
    "trainer.max_epochs": Rule(int, low=-1, nullable=True),  # -1: no limit (Lightning's meaning)
    "objective.mask_ratio": Rule(float, low=0, high=1, low_open=True, high_open=True),
    "objective.temperature": POSITIVE,
    "objective.mixup": Rule(float, low=0),  # the Beta alpha; 0 = off
    "objective.cutmix": Rule(float, low=0),
    "objective.mix_prob": Rule(float, low=0, high=1),
    "objective.label_smoothing": Rule(float, low=0, high=1, high_open=True),
    "objective.mlm_probability": Rule(float, low=0, high=1, low_open=True, high_open=True),
    "objective.mask_replace_prob": Rule(float, low=0, high=1),
    "objective.random_replace_prob": Rule(float, low=0, high=1),
    "freeze.layers": Rule(int, low=0, words=("all",)),  # its upper bound is the backbone's, checked on it
    "freeze.start": Rule(int, low=0),
    "freeze.every": Rule(int, low=1),
    "freeze.probe_epochs": Rule(int, low=0),
    "freeze.ft_lr_scale": Rule(float, low=0, high=1, low_open=True),
    "finetune.l2_sp": Rule(float, low=0),
}
# Keys that only some configs have (objective.mask_ratio with MAE, freeze.* when fine-tuning) are
# checked where they exist.


def check(key: str, value):
    """``value`` if it obeys ``key``'s rule, else a ConfigError naming both."""
    return RULES[key].check(key, value)
