"""``datamodule.*`` (``conf/datamodule/``): batches, splits and label fractions, image size and augmentation,
text files and columns, streaming and shards. The held-out fractions' rule is stated once here and used by every
source that splits (and by ``scripts/prepare_data.py``, whose keys have no ``datamodule.`` prefix)."""

from __future__ import annotations

import re
from pathlib import Path

from lightning_modules.config.kinds import (
    FRACTION,
    OPEN_FRACTION,
    POSITIVE,
    PROBABILITY,
    SEED,
    TARGET,
    Choice,
    Custom,
    ExistingPath,
    Flag,
    ListOf,
    Rule,
    Section,
    Text,
    Together,
)

# Image augmentation (datamodule.augment.* for labeled batches, objective.augment.* for SimCLR's views).
# Images are normalised to mean 0, std 1: brightness and noise are in standard deviations.
AUGMENT = {
    "scale": ListOf(Rule(float, low=0, high=1, low_open=True), 2, 2, ascending=True),  # crop area fraction
    "rotate": Rule(float, low=0, high=180),  # degrees, either way
    "translate": Rule(float, low=0, high=1),  # fraction of the image
    "flip": Flag(),
    "brightness": Rule(float, low=0, high=5),
    "contrast": Rule(float, low=0, high=1),  # 1 + U(-c, c): above 1 it would invert images
    "noise": Rule(float, low=0, high=5),
    "erase": PROBABILITY,
}
# The photo ops (datamodules/transforms/photo.py), for the self-supervised objectives' views (objective.augment*):
# probabilities, 0 = off; jitter's strengths as torchvision's ColorJitter(brightness, contrast, saturation, hue);
# blur's sigma range in pixels; size: the crop's side (multi-crop's local views). Not datamodule.augment's yet: the
# one recipe of the in-memory and streaming paths takes them there.
PHOTO_AUGMENT = {
    "size": Rule(int, low=1, high=4096, nullable=True),
    "jitter": PROBABILITY,
    "jitter_strength": ListOf(Rule(float, low=0, high=1), 4, 4),
    "grayscale": PROBABILITY,
    "blur": PROBABILITY,
    "blur_sigma": ListOf(Rule(float, low=0, high=64, low_open=True), 2, 2, ascending=True),
    "solarize": PROBABILITY,
}


def _check_data_path(key: str, value):
    """datamodule.path: a file of texts or pairs, a directory of prepared shards, or their URL (s3://, gs://...)."""
    if value is None or isinstance(value, str) and re.match(r"[a-z][a-z0-9+]*://", value):
        return value
    return ExistingPath("any").check(key, value)


def split_fractions(prefix: str = "datamodule.") -> Together:
    """The held-out fractions fit together: what is left is the training split."""
    return Together(
        (f"{prefix}val_fraction", f"{prefix}test_fraction"),
        lambda val, test: val + test < 1,
        "val_fraction + test_fraction must be below 1 (the rest is the training split)",
    )


def check_split_fractions(val, test, prefix: str = "datamodule.") -> tuple[float, float]:
    """Each held-out fraction in (0, 1), together below 1; one line naming the keys otherwise."""
    OPEN_FRACTION.check(f"{prefix}val_fraction", val)
    OPEN_FRACTION.check(f"{prefix}test_fraction", test)
    split_fractions(prefix).check({f"{prefix}val_fraction": val, f"{prefix}test_fraction": test})
    return float(val), float(test)


RULES: dict[str, object] = {
    "datamodule._target_": TARGET,
    "datamodule.root": ExistingPath("dir"),
    "datamodule.batch_size": Rule(int, low=1),
    "datamodule.eval_batch_size": Rule(int, low=1),
    "datamodule.image_size": Rule(int, low=4, high=1024),  # held in memory: 1024 is already 1 MB an image
    "datamodule.channels": Choice(1, 3),  # grey or RGB
    "datamodule.label_fraction": FRACTION,
    "datamodule.label_seed": SEED,
    "datamodule.split_seed": SEED,
    "datamodule.val_fraction": OPEN_FRACTION,
    "datamodule.test_fraction": OPEN_FRACTION,
    "datamodule.train_batches_per_epoch": Rule(int, low=1, nullable=True),
    "datamodule.device_budget": Rule(float, low=0, high=1),  # fraction of the GPU's memory for the splits
    "datamodule.augment": Section(),
    **{f"datamodule.augment.{k}": rule for k, rule in AUGMENT.items()},
    # text data (datamodule=text_corpus, text_classification)
    "datamodule.max_length": Rule(int, low=4),  # tokens per example: [CLS] + text + [SEP] needs room
    "datamodule.document": Choice("file", "line"),
    "datamodule.paths": ListOf(Text(r"\s*\S.*", "a .txt file or a glob"), min_len=1, nullable=True),
    "datamodule.path": Custom(_check_data_path, "null, an existing file or directory, or a URL"),  # null: embedded
    "datamodule.val_path": ExistingPath("file", nullable=True),
    "datamodule.test_path": ExistingPath("file", nullable=True),
    "datamodule.text_column": Text(),
    "datamodule.label_column": Text(),
    "datamodule.families": Rule(int, low=2),
    "datamodule.shuffle_seed": SEED,
    "datamodule.cache_dir": Text(r"\s*\S.*", "a directory", nullable=True),  # null: parse every time
    # image–caption pairs (datamodule=image_text)
    "datamodule.image_column": Text(),
    "datamodule.caption_column": Text(),
    "datamodule.captions": ListOf(Text(), min_len=1),  # the embedded pairs' templates ({word}, {digit})
    # streaming (datamodule=image_folder, shards)
    "datamodule.loading": Choice("auto", "memory", "stream"),
    "datamodule.memory_budget_gb": Rule(float, low=0),
    "datamodule.num_workers": Rule(int, low=0, nullable=True),  # null: this node's cores / its processes
    "datamodule.on_bad_sample": Choice("error", "skip"),
    "datamodule.seed": SEED,  # shards: litdata's shuffle and every image's transform
    "datamodule.transforms": Section(),
    "datamodule.transforms.scale": ListOf(Rule(float, low=0, high=1, low_open=True), 2, 2, ascending=True),
    "datamodule.transforms.ratio": ListOf(POSITIVE, 2, 2, ascending=True),
    "datamodule.transforms.flip": Flag(),
    "datamodule.transforms.auto_augment": Choice("randaugment", "trivialaugment", "autoaugment", nullable=True),
    "datamodule.transforms.eval_crop_pct": FRACTION,
}

TOGETHER = [
    split_fractions(),
    Together(
        ("datamodule._target_", "datamodule.path"),
        lambda target, path: (
            path is None or "://" in path or Path(path).is_dir() == target.endswith(".ShardsDataModule")
        ),
        "prepared shards (datamodule=shards) are a directory or URL; the other datamodules read a file",
    ),
]
