"""``optimizer.*`` (``conf/optimizer/``)."""

from __future__ import annotations

from lightning_modules.config.kinds import POSITIVE, Choice, Flag, ListOf, Rule, Together

RULES: dict[str, object] = {
    "optimizer.name": Choice("adamw", "adam", "sgd"),
    "optimizer.lr": POSITIVE,
    "optimizer.weight_decay": Rule(float, low=0),
    "optimizer.betas": ListOf(Rule(float, low=0, high=1, high_open=True), 2, 2),
    "optimizer.momentum": Rule(float, low=0, high=1, high_open=True),
    "optimizer.nesterov": Flag(),
    "optimizer.backbone_lr_scale": Rule(float, low=0),
    "optimizer.layer_decay": Rule(float, low=0, high=1, low_open=True, nullable=True),
    "optimizer.implementation": Choice("auto", "fused", "foreach", "loop"),  # auto: the fastest on the device
}

TOGETHER = [
    Together(
        ("optimizer.nesterov", "optimizer.momentum"),
        lambda nesterov, momentum: not nesterov or momentum > 0,
        "nesterov=true needs a momentum > 0",
    ),
]
