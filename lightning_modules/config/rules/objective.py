"""``objective.*`` (``conf/objective/``): each objective's heads, loss and its own augmentation."""

from __future__ import annotations

from lightning_modules.config.kinds import (
    DEPTH,
    OPEN_FRACTION,
    POSITIVE,
    PROBABILITY,
    TARGET,
    WIDTH,
    Choice,
    Flag,
    Rule,
    Section,
    Together,
)
from lightning_modules.config.rules.datamodule import VIEW_AUGMENT

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
    **{f"objective.augment.{k}": rule for k, rule in VIEW_AUGMENT.items()},
    "objective.label_smoothing": Rule(float, low=0, high=1, high_open=True),
    "objective.head_dropout": Rule(float, low=0, high=1, high_open=True),
    "objective.mixup": Rule(float, low=0),  # the Beta alpha; 0 = off
    "objective.cutmix": Rule(float, low=0),
    "objective.mix_prob": PROBABILITY,
    "objective.embed_dim": WIDTH,  # CLIP's shared embedding space
    "objective.learn_temperature": Flag(),
    "objective.max_logit_scale": Rule(float, low=1),
    # teacher–student (BYOL, DINO) and VICReg
    "objective.pred_hidden": WIDTH,
    "objective.proj_layers": Rule(int, low=2, high=16),
    "objective.momentum": Rule(float, low=0, high=1),  # the EMA teacher's, rising on a cosine to momentum_end
    "objective.momentum_end": Rule(float, low=0, high=1),
    "objective.export": Choice("student", "teacher"),  # which backbone backbone/ holds
    "objective.augment_2": Section(),  # the second view's recipe (BYOL, DINO's second global crop)
    **{f"objective.augment_2.{k}": rule for k, rule in VIEW_AUGMENT.items()},
    "objective.local_augment": Section(),  # DINO's local crops
    **{f"objective.local_augment.{k}": rule for k, rule in VIEW_AUGMENT.items()},
    "objective.local_views": Rule(int, low=0, high=64),
    "objective.local_size": Rule(int, low=1, high=4096, nullable=True),  # null: the input's size
    "objective.out_dim": WIDTH,
    "objective.head_hidden": WIDTH,
    "objective.bottleneck_dim": WIDTH,
    "objective.head_bn": Flag(),
    "objective.norm_last_layer": Flag(),
    "objective.teacher_temp": POSITIVE,
    "objective.warmup_teacher_temp": POSITIVE,
    "objective.teacher_temp_warmup": PROBABILITY,  # the fraction of the run's steps it warms up over
    "objective.student_temp": POSITIVE,
    "objective.center_momentum": PROBABILITY,
    "objective.invariance": Rule(float, low=0),
    "objective.variance": Rule(float, low=0),
    "objective.covariance": Rule(float, low=0),
    "objective.mlm_probability": OPEN_FRACTION,
    "objective.mask_replace_prob": PROBABILITY,
    "objective.random_replace_prob": PROBABILITY,
}

TOGETHER = [
    Together(
        ("objective.momentum", "objective.momentum_end"),
        lambda start, end: end >= start,
        "the teacher's momentum rises over the run: momentum_end must be at least momentum",
    ),
    Together(
        ("objective.decoder_dim", "objective.decoder_heads"),
        lambda dim, heads: dim % heads == 0,
        "decoder_dim must be a multiple of decoder_heads",
    ),
]
