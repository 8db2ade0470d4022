"""``callbacks.*`` and ``logger.*`` (``conf/callbacks/``, ``conf/logger/``): Lightning's own components, checked
when built; pretune's ``last.ckpt`` cadence (``callbacks/checkpoint.py``) has rules of its own."""

from __future__ import annotations

from lightning_modules.config.kinds import Rule, Section

RULES: dict[str, object] = {
    "callbacks": Section(),
    "callbacks.*": Section(component=True),
    "logger": Section(),
    "logger.*": Section(component=True),
    # last.ckpt's cadence: each replaces every_n_epochs
    "callbacks.last_checkpoint.every_n_epochs": Rule(int, low=1, nullable=True),
    "callbacks.last_checkpoint.every_n_train_steps": Rule(int, low=1, nullable=True),
    "callbacks.last_checkpoint.every_minutes": Rule(float, low=0, low_open=True, nullable=True),
}

PASSED_THROUGH = {
    "callbacks": "Lightning's callbacks (ModelCheckpoint, EarlyStopping, ...)",
    "logger": "Lightning's loggers (CSVLogger, TensorBoardLogger, WandbLogger)",
}
