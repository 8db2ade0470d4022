"""``freeze.*`` (``conf/freeze/``): the freezing strategy and its counts of layer groups."""

from __future__ import annotations

from lightning_modules.config.kinds import TARGET, Flag, Rule

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
}
