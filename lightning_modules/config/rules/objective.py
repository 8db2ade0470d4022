"""``objective.*`` (``conf/objective/``): each objective's heads, loss and its own augmentation."""

from __future__ import annotations

from lightning_modules.config.kinds import (
    DEPTH,
    OPEN_FRACTION,
    POSITIVE,
    PROBABILITY,
    TARGET,
    WIDTH,
    Flag,
    Rule,
    Section,
    Together,
)
from lightning_modules.config.rules.datamodule import AUGMENT

RULES: dict[str, object] = {
    "objective._target_": TARGET,
    "objective.mask_ratio": OPEN_FRACTION,
    "objective.decoder_dim": WIDTH,
    "objective.decoder_depth": DEPTH,
    "objective.decoder_heads": Rule(int, low=1, high=1024),
    "objective.norm_pix_loss": Flag(),
    "objective.temperature": POSITIVE,
    "objective.proj_hidden": WIDTH,
    "objective.proj_dim": WIDTH,
    "objective.proj_bn": Flag(),
    "objective.augment": Section(),
    **{f"objective.augment.{k}": rule for k, rule in AUGMENT.items()},
    "objective.label_smoothing": Rule(float, low=0, high=1, high_open=True),
    "objective.head_dropout": Rule(float, low=0, high=1, high_open=True),
    "objective.mixup": Rule(float, low=0),  # the Beta alpha; 0 = off
    "objective.cutmix": Rule(float, low=0),
    "objective.mix_prob": PROBABILITY,
    "objective.embed_dim": WIDTH,  # CLIP's shared embedding space
    "objective.learn_temperature": Flag(),
    "objective.max_logit_scale": Rule(float, low=1),
    "objective.mlm_probability": OPEN_FRACTION,
    "objective.mask_replace_prob": PROBABILITY,
    "objective.random_replace_prob": PROBABILITY,
}

TOGETHER = [
    Together(
        ("objective.decoder_dim", "objective.decoder_heads"),
        lambda dim, heads: dim % heads == 0,
        "decoder_dim must be a multiple of decoder_heads",
    ),
]
