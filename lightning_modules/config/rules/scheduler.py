"""``scheduler.*`` (``conf/scheduler/``).

Chosen by ``name:``, not built from a ``_target_``: every schedule is a shape of pretune's own ``GroupScaledLR``
(``training/optim.py``), which scales each layer group's rate by its own factor (layer-wise decay, the head's
rate, LP-FT's ``ft_lr_scale``). A scheduler class named by ``_target_`` would be a second mechanism beside it, one
that knows nothing of the groups' factors (see ``rules/optimizer.py``)."""

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
