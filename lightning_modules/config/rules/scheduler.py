"""``scheduler.*`` (``conf/scheduler/``)."""

from __future__ import annotations

from lightning_modules.config.kinds import FRACTION, METRIC, POSITIVE, PROBABILITY, Choice, Rule

RULES: dict[str, object] = {
    "scheduler.name": Choice("cosine", "step", "plateau", "none"),
    "scheduler.warmup_fraction": Rule(float, low=0, high=1, high_open=True),
    "scheduler.min_lr_ratio": PROBABILITY,
    "scheduler.step_epochs": POSITIVE,
    "scheduler.gamma": FRACTION,
    "scheduler.patience": Rule(int, low=0),
    "scheduler.monitor": METRIC,
    "scheduler.mode": Choice("min", "max"),
}
