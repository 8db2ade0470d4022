"""``freeze.*`` (``conf/freeze/``): the freezing strategy and its counts of layer groups."""

from __future__ import annotations

from lightning_modules.config.kinds import TARGET, Flag, Rule, Together

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

TOGETHER = [
    # LP-FT fine-tunes after its probe: a probe as long as the run would leave a linear probe that says it is LP-FT
    Together(
        ("freeze.probe_epochs", "trainer.max_epochs"),
        lambda probe, epochs: epochs in (None, -1) or probe < epochs,  # -1: no limit (Lightning's meaning)
        "the linear probe would take the whole run and nothing would be fine-tuned; allowed is"
        " freeze.probe_epochs below trainer.max_epochs",
    ),
]
