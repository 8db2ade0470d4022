"""``callbacks.*`` and ``logger.*`` (``conf/callbacks/``, ``conf/logger/``): Lightning's own components, checked
when built; pretune's ``last.ckpt`` cadence (``callbacks/checkpoint.py``) has rules of its own."""

from __future__ import annotations

from lightning_modules.config.kinds import Flag, Rule, Section

RULES: dict[str, object] = {
    "callbacks": Section(),
    "callbacks.*": Section(component=True),
    "logger": Section(),
    "logger.*": Section(component=True),
    # last.ckpt's cadence: each replaces every_n_epochs
    "callbacks.last_checkpoint.every_n_epochs": Rule(int, low=1, nullable=True),
    "callbacks.last_checkpoint.every_n_train_steps": Rule(int, low=1, nullable=True),
    "callbacks.last_checkpoint.every_minutes": Rule(float, low=0, low_open=True, nullable=True),
    # the k-NN and online linear probe of pre-training (callbacks/feature_monitor.py)
    "callbacks.feature_monitor.k": Rule(int, low=1, high=10_000),
    "callbacks.feature_monitor.temperature": Rule(float, low=0, low_open=True),
    "callbacks.feature_monitor.bank_size": Rule(int, low=1, nullable=True),  # null: every training image
    "callbacks.feature_monitor.probe": Flag(),
    "callbacks.feature_monitor.probe_epochs": Rule(int, low=1),
    "callbacks.feature_monitor.probe_batch_size": Rule(int, low=1),
    "callbacks.feature_monitor.probe_lr": Rule(float, low=0, low_open=True),
    "callbacks.feature_monitor.batch_size": Rule(int, low=1),
    # the EMA of weights (callbacks=ema: Lightning's EMAWeightAveraging)
    "callbacks.ema.decay": Rule(float, low=0, high=1, high_open=True),
    "callbacks.ema.update_every_n_steps": Rule(int, low=1),
    "callbacks.ema.update_starting_at_step": Rule(int, low=0, nullable=True),
}

PASSED_THROUGH = {
    "callbacks": "Lightning's callbacks (ModelCheckpoint, EarlyStopping, ...)",
    "logger": "Lightning's loggers (CSVLogger, TensorBoardLogger, WandbLogger)",
}
