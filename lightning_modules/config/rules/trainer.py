"""``trainer.*`` (``conf/trainer/``): Lightning checks most of it when the Trainer is built (its arguments are
type-checked against its signature first, ``config/library.py``); these it accepts when built, then fails on."""

from __future__ import annotations

from lightning_modules.config.kinds import TARGET, Rule, Together

RULES: dict[str, object] = {
    "trainer._target_": TARGET,
    "trainer.max_epochs": Rule(int, low=-1, nullable=True),  # -1: no limit (Lightning's meaning)
    "trainer.check_val_every_n_epoch": Rule(int, low=1, nullable=True),  # null: by val_check_interval only
    "trainer.accumulate_grad_batches": Rule(int, low=1),
    # trainer=ddp/fsdp: how long the process group's start waits for every rank (every node) to arrive
    "trainer.strategy.start_timeout_s": Rule(float, low=0, low_open=True),
}

PASSED_THROUGH = {
    "trainer": "Lightning's Trainer (pytorch_lightning.Trainer arguments, type-checked against its signature)",
}

TOGETHER = [
    Together(
        ("trainer.max_epochs", "trainer.max_steps"),
        lambda epochs, steps: epochs != -1 or isinstance(steps, int) and steps > 0,
        "no limit on epochs needs a limit on steps: the learning-rate schedule spans the whole run",
    ),
]
