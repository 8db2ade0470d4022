"""The transfer study's own config (``conf/transfer_study.yaml``); its list entries are overrides of the stage
configs, checked by composing those."""

from __future__ import annotations

from lightning_modules.config.kinds import FRACTION, POSITIVE, SEED, Choice, Flag, ListOf, Rule, Text
from lightning_modules.config.rules import run

OVERRIDE = Text(r"[~+]{0,2}[\w./@-]+(=.*)?", "a Hydra override, e.g. optimizer.lr=1e-3")
RULES: dict[str, object] = {
    **{key: rule for key, rule in run.RULES.items() if key.startswith("paths.")},
    "seeds": ListOf(SEED, min_len=1),
    "workers": Rule(int, low=1, high=256),  # fine-tuning jobs run side by side, each on its share of the cores
    "label_fractions": ListOf(FRACTION, min_len=1),
    "pretrain_epochs": Rule(int, low=1),  # read by the study configs' pretrain lists (trainer.max_epochs=${...})
    "common": ListOf(OVERRIDE),
    "pretrain": ListOf(OVERRIDE),
    "finetune": ListOf(OVERRIDE),
    "strategies.*.pretrained": Flag(),
    "strategies.*.overrides": ListOf(OVERRIDE),
    "strategies.*.lrs": ListOf(POSITIVE, min_len=1),
    "strategies.*.label_fractions": ListOf(FRACTION, min_len=1),
    "strategies.*.frozen_groups": Rule(int, low=0, words=("all",)),
    "strategies.*.init": Choice("model"),  # keep the model config's own model.init (weights from elsewhere)
    "strategies.*.start": Text(),  # what the report calls the starting point
    "strategies.*.tokenizer": Choice("pretrained"),  # random weights on the study's pre-trained vocabulary
}
