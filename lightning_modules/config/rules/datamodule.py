"""``datamodule.*`` (``conf/datamodule/``): batches, splits and label fractions, image size and augmentation,
text files and columns, streaming and shards. The held-out fractions' rule is stated once here and used by every
source that splits (and by ``scripts/prepare_data.py``, whose keys have no ``datamodule.`` prefix)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from lightning_modules.config.kinds import (
    FRACTION,
    OPEN_FRACTION,
    POSITIVE,
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
from lightning_modules.core.locations import CONFIG, find_backbone_dir

# Image augmentation, one recipe for every loading path (datamodules/transforms/recipe.py): datamodule.augment.* for
# training batches, objective.augment.* for an objective's views. null: the preset's value. Images are normalised to
# mean 0, std 1: brightness and noise are in standard deviations.
AUGMENT = {
    "preset": Choice("auto", "photo", "small", "none", nullable=True),  # what a key left null takes
    "scale": ListOf(Rule(float, low=0, high=1, low_open=True), 2, 2, ascending=True, nullable=True),  # crop area
    "ratio": ListOf(POSITIVE, 2, 2, ascending=True, nullable=True),  # crop aspect ratio (width / height)
    "flip": Flag(nullable=True),
    "rotate": Rule(float, low=0, high=180, nullable=True),  # degrees, either way
    "translate": Rule(float, low=0, high=1, nullable=True),  # fraction of the image
    "brightness": Rule(float, low=0, high=5, nullable=True),
    "contrast": Rule(float, low=0, high=1, nullable=True),  # 1 + U(-c, c): above 1 it would invert images
    "auto_augment": Choice("randaugment", "trivialaugment", "autoaugment", "none", nullable=True),
    "noise": Rule(float, low=0, high=5, nullable=True),
    "erase": Rule(float, low=0, high=1, nullable=True),
    # The photo ops of the BYOL/DINO recipes (datamodules/transforms/photo.py), on pixels in [0, 1]: probabilities
    # (0: off); jitter's strengths as torchvision's ColorJitter(brightness, contrast, saturation, hue); blur's sigma
    # range in pixels.
    "jitter": Rule(float, low=0, high=1, nullable=True),
    "jitter_strength": ListOf(Rule(float, low=0, high=1), 4, 4, nullable=True),
    "grayscale": Rule(float, low=0, high=1, nullable=True),
    "blur": Rule(float, low=0, high=1, nullable=True),
    "blur_sigma": ListOf(Rule(float, low=0, high=64, low_open=True), 2, 2, ascending=True, nullable=True),
    "solarize": Rule(float, low=0, high=1, nullable=True),
}
# An objective's views also take the crop's side (multi-crop's small local views; null: the input's); a
# datamodule serves its training images at image_size.
VIEW_AUGMENT = AUGMENT | {"size": Rule(int, low=1, high=4096, nullable=True)}


def _check_data_path(key: str, value):
    """datamodule.path: a file of texts or pairs, a directory of prepared shards, or their URL (s3://, gs://...)."""
    if value is None or isinstance(value, str) and re.match(r"[a-z][a-z0-9+]*://", value):
        return value
    return ExistingPath("any").check(key, value)


def longer_than_positions(max_length: int, positions: int, whose: str = "the backbone's") -> str:
    """The line for ``datamodule.max_length`` beyond a text backbone's position embeddings: said by the config
    check from ``model.max_positions``, and by the datamodule from the built backbone (an ``hf:`` model's)."""
    return (
        f"datamodule.max_length={max_length} is longer than {whose} {positions} positions; allowed is at most"
        f" {positions}"
    )


def _sizes_apply(init, tower: str | None = None) -> bool:
    """Whether a text model config's sizes (``model.max_positions``) are the backbone's, as ``model.init`` says:
    from scratch, or a pretune ``backbone/`` (whose sizes must be the config's); not for ``hf:`` (the Hugging Face
    config's), a ``backbone/`` pre-trained from one (its architecture travels with it: ``name: hf``, a ``tower``'s
    within a dual encoder's), nor what is known only once fetched (a W&B artifact): the run checks those."""
    init = str(init)
    if init == "none":
        return True
    if init.startswith(("hf:", "wandb:", "file:")) or init == "timm":
        return False
    try:
        saved = yaml.safe_load((find_backbone_dir(init) / CONFIG).read_text())
    except Exception:  # not there, not readable: model.init's own rule says so
        return False
    saved = (saved.get(tower) if tower else saved) if isinstance(saved, dict) else None
    return isinstance(saved, dict) and saved.get("name") != "hf"


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
    "datamodule.eval_crop_pct": Rule(float, low=0, high=1, low_open=True, nullable=True),  # null: by image size
    # text data (datamodule=text_corpus, text_classification)
    "datamodule.max_length": Rule(int, low=4),  # tokens per example: [CLS] + text + [SEP] needs room
    "datamodule.document": Choice("file", "line"),
    "datamodule.paths": ListOf(Text(r"\s*\S.*", "a .txt file or a glob"), min_len=1, nullable=True),
    # a file (text, pairs), prepared shards (a directory or URL), or null: the embedded data
    "datamodule.path": Custom(_check_data_path, "null, an existing file or directory, or a URL"),
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
}

TOGETHER = [
    split_fractions(),
    # a text model's position embeddings bound the tokens per example: said before the data is read and tokenised
    Together(
        ("datamodule.max_length", "model.max_positions", "model.init"),
        lambda length, positions, init: length <= positions or not _sizes_apply(init),
        lambda length, positions, _init: longer_than_positions(length, positions),
    ),
    Together(
        ("datamodule.max_length", "model.text.max_positions", "model.text.init", "model.init"),
        lambda length, positions, tower_init, init: (
            length <= positions or not (_sizes_apply(tower_init) and _sizes_apply(init, "text"))
        ),
        lambda length, positions, *_: longer_than_positions(length, positions, "the text tower's"),
    ),
    Together(
        ("datamodule._target_", "datamodule.path"),
        lambda target, path: (
            path is None or "://" in path or Path(path).is_dir() or not target.endswith(".ShardsDataModule")
        ),
        "datamodule=shards reads prepared shards: a directory or URL (scripts/prepare_data.py image_folder)",
    ),
]
