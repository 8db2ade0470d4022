"""``freeze.*`` (``conf/freeze/``): the freezing strategy and its counts of layer groups; ``freeze=lora``'s
adapters (``callbacks/freezing.py: Adapters``)."""

from __future__ import annotations

import re
from collections.abc import Sequence

from lightning_modules.config.kinds import TARGET, Choice, Custom, Flag, Rule, Together, invalid
from lightning_modules.core.errors import show

TARGET_WORDS = ("auto", "attention", "all")  # backbones/adapters.py gives them their meaning
TARGETS_ALLOWED = (
    "auto, attention, all, a list of module names (a module path or its ending, e.g. [qkv,proj]) or a regex"
    " matched against whole module paths"
)
LORA_ONLY = ("freeze.rank", "freeze.alpha", "freeze.dropout", "freeze.use_rslora")


def check_targets(key: str, value):
    """A word, a regex that compiles (any other string), or a non-empty list of non-empty module names."""
    if isinstance(value, str):
        if value.strip() and value not in TARGET_WORDS:
            try:
                re.compile(value)
            except re.error as err:
                raise invalid(key, value, TARGETS_ALLOWED, f"is not a regex ({err})") from None
        if value.strip():
            return value
    elif isinstance(value, Sequence) and value and all(isinstance(v, str) and v.strip() for v in value):
        return value
    raise invalid(key, value, TARGETS_ALLOWED)


RULES: dict[str, object] = {
    "freeze._target_": TARGET,
    "freeze.layers": Rule(int, low=0, words=("all",)),  # its upper bound is the backbone's, checked on it
    "freeze.image": Rule(int, low=0, words=("all",), nullable=True),  # a dual encoder's tower; null: the strategy's
    "freeze.text": Rule(int, low=0, words=("all",), nullable=True),
    "freeze.start": Rule(int, low=0),
    "freeze.every": Rule(int, low=1),
    "freeze.probe_epochs": Rule(int, low=0),
    "freeze.ft_lr_scale": Rule(float, low=0, high=1, low_open=True),
    "freeze.train_bn": Flag(),
    # freeze=lora
    "freeze.method": Choice("lora", "dora", "ia3"),
    "freeze.targets": Custom(check_targets, TARGETS_ALLOWED),
    "freeze.rank": Rule(int, low=1, high=65536, nullable=True),  # its upper bound is the layers', checked on them
    "freeze.alpha": Rule(float, low=0, high=1e6, low_open=True, nullable=True),
    "freeze.dropout": Rule(float, low=0, high=1, high_open=True, nullable=True),
    "freeze.use_rslora": Flag(nullable=True),
}


def _ia3_line(method, *values) -> str:
    key, value = next((k, v) for k, v in zip(LORA_ONLY, values, strict=True) if v is not None)
    return (
        f"{key}={show(value)} with freeze.method={method}: IA3 learns scales, it has no rank, alpha, dropout or"
        f" use_rslora (LoRA's and DoRA's); allowed is {key}=null"
    )


TOGETHER = [
    # LP-FT fine-tunes after its probe: a probe as long as the run would leave a linear probe that says it is LP-FT
    Together(
        ("freeze.probe_epochs", "trainer.max_epochs"),
        lambda probe, epochs: epochs in (None, -1) or probe < epochs,  # -1: no limit (Lightning's meaning)
        "the linear probe would take the whole run and nothing would be fine-tuned; allowed is"
        " freeze.probe_epochs below trainer.max_epochs",
    ),
    Together(
        ("freeze.method", *LORA_ONLY),
        lambda method, *values: method != "ia3" or all(v is None for v in values),
        _ia3_line,
    ),
    # Adapters train from the first step: another strategy given a method has nothing to do with it
    Together(
        ("freeze._target_", "freeze.method"),
        lambda target, method: str(target).endswith(".Adapters"),
        lambda target, method: (
            f"freeze.method={method} with freeze._target_={target}: adapters are trained from the first step, there"
            " is nothing to unfreeze gradually; allowed is freeze=lora (adapters above freeze.layers groups, and"
            " freeze.probe_epochs for LP-FT)"
        ),
    ),
]
