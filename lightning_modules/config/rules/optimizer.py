"""``optimizer.*`` (``conf/optimizer/``).

The optimizer is chosen by ``name:``, not built from a ``_target_`` as the other components are: its parameter
groups come from the backbone's layer groups (one per group, with ``layer_decay`` and ``backbone_lr_scale``
applied, ``training/optim.py``), and pretune's own ``GroupScaledLR`` schedules every group's rate. A ``_target_``
here would have to be a partial optimizer given those groups later, and the scheduler a second mechanism beside
the one that makes layer-wise decay hold under every schedule; three names cover what that would open."""

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
