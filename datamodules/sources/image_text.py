"""Image–caption pairs for contrastive pre-training (``objective=clip``): a CSV or JSONL file of pairs, or the
embedded digits with captions made from their labels.

- **A file** (``datamodule.path``: ``.csv`` or ``.jsonl``): each row an image path (``image_column``, relative to
  the file) and a caption (``caption_column``). Rows naming the same image are its several captions (in JSONL a
  caption may also be a list of strings). ``val_path`` is the validation file, else ``val_fraction`` of the
  *images* is held out (seeded by ``split_seed``: no image on both sides). Images are read once with PIL,
  converted to ``channels`` (1: grayscale, 3: RGB), resized to ``image_size`` and kept in memory.
  A missing image file, an unreadable image or an empty caption is one line naming the file and its line.
- **Embedded** (``path: null``): scikit-learn's digits, each image with a caption per template in ``captions``
  (``{word}``: "seven", ``{digit}``: "7"). It checks the machinery (two towers, the loss, retrieval, zero-shot,
  the hand-off); it is not a caption corpus: every image of a class has the same captions. The images are split
  as ``datamodule=digits`` splits them (its train and val images; its test images are never seen here, so
  zero-shot classification on ``datamodule=digits`` is on unseen images).

Training serves every image once per pass with one of its captions, drawn for all images at once from a
generator seeded by (``shuffle_seed``, epoch, pass): every DDP rank and a resumed run draw the same caption for an
image. Images are normalised with the training images' statistics and augmented a whole batch at a time as in the
vision path (``augment``); captions are tokenized once by the text tower's tokenizer (``use_backbone``), as in the
text path, and cut per global batch to its longest caption. Validation serves every (image, caption) pair, with
``image_id`` and ``caption_id`` (which image, which distinct caption) for retrieval recall.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import torch

from datamodules.base import PretuneDataModule
from datamodules.loading.in_memory import BatchLoader, as_stored, at_most
from datamodules.loading.text import read_text
from datamodules.sources.digits import DigitsDataModule
from datamodules.spec import ImageTextSpec
from datamodules.transforms.augment import BatchAugment
from datamodules.transforms.text import tokenize
from lightning_modules.config.rules import check
from lightning_modules.core.errors import ConfigError

FORMATS = (".csv", ".jsonl")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CAPTIONS = (
    "a handwritten {word}",
    "the digit {digit}",
    "a picture of the number {word}",
    "the number {digit}, written by hand",
    "a small scanned image of a {word}",
    "{digit}",
)


class PairLoader(BatchLoader):
    """Batches of image–caption pairs from one split (``Pairs.tensors``), seeded and rank-sliced as ``BatchLoader``.

    ``sample=True`` (training): an item is an image, with one of its captions drawn per pass over the data (the
    draw for all images at once, so it does not depend on the batch or the rank). ``sample=False`` (evaluation):
    an item is a caption, with its image, plus ``image_id``/``caption_id``. Token tensors are cut to the longest
    caption of the global batch (as ``PaddedBatchLoader``)."""

    def __init__(self, pairs: dict, batch_size: int, shuffle: bool, drop_last: bool, sample: bool, **kwargs):
        items = torch.arange(len(pairs["first"]) if sample else len(pairs["owner"]))
        super().__init__({"item": items}, batch_size, shuffle, drop_last, **kwargs)
        self.pairs, self.sample = pairs, sample
        self.rows: torch.Tensor | None = None

    def _order(self, repeat: int) -> torch.Tensor:
        if self.sample:  # this pass's caption of every image
            p = self.pairs
            seed = (self.seed * 100_003 + self.epoch_fn()) * 1_009 + repeat  # as the order's, on another stream
            gen = torch.Generator().manual_seed(seed + (1 << 40))
            u = torch.rand(len(p["first"]), generator=gen, dtype=torch.float64)
            self.rows = p["first"] + torch.minimum((u * p["count"]).long(), p["count"] - 1)
        return super()._order(repeat)

    def take(self, idx: torch.Tensor, global_idx: torch.Tensor) -> dict:
        p = self.pairs
        if self.sample:
            images, rows, global_rows = idx, self.rows[idx], self.rows[global_idx]
        else:
            images, rows, global_rows = p["owner"][idx], idx, global_idx
        width = int(p["lengths"][global_rows].max())
        batch = {
            "image": p["image"][images],
            "input_ids": p["input_ids"][rows, :width],
            "attention_mask": p["attention_mask"][rows, :width],
        }
        if not self.sample:
            batch |= {"image_id": images, "caption_id": p["caption_id"][rows]}
        return batch


class ImageTextDataModule(PretuneDataModule):
    modality = "image_text"
    name = "image_text"

    def __init__(
        self,
        path: str | None = None,
        val_path: str | None = None,
        image_column: str = "image",
        caption_column: str = "caption",
        image_size: int = 32,
        channels: int = 1,
        batch_size: int = 64,
        eval_batch_size: int = 256,
        max_length: int = 32,
        val_fraction: float = 0.15,
        split_seed: int = 0,
        shuffle_seed: int = 0,
        train_batches_per_epoch: int | None = None,
        captions: list[str] | tuple[str, ...] = CAPTIONS,
        augment: dict | None = None,
        labeled: bool = False,  # what the run passes every datamodule; pairs carry no labels
    ):
        super().__init__()
        self.path, self.val_path = check("datamodule.path", path), check("datamodule.val_path", val_path)
        self.image_column = check("datamodule.image_column", image_column)
        self.caption_column = check("datamodule.caption_column", caption_column)
        self.image_size = check("datamodule.image_size", image_size)
        self.channels = check("datamodule.channels", channels)
        self.batch_size = check("datamodule.batch_size", batch_size)
        self.eval_batch_size = check("datamodule.eval_batch_size", eval_batch_size)
        self.max_length = check("datamodule.max_length", max_length)
        self.val_fraction = float(check("datamodule.val_fraction", val_fraction))
        self.train_batches_per_epoch = check("datamodule.train_batches_per_epoch", train_batches_per_epoch)
        self.split_seed, self.shuffle_seed = split_seed, shuffle_seed
        self.templates = tuple(captions)
        if path is None:
            for template in self.templates:
                try:
                    template.format(word="seven", digit=7)
                except (KeyError, IndexError, ValueError) as err:
                    raise ConfigError(
                        f"datamodule.captions: {template!r} is not a caption template (allowed placeholders:"
                        f" {{word}}, {{digit}})"
                    ) from err
            if not self.templates:
                raise ConfigError("datamodule.captions=[] is invalid: allowed is a list of caption templates")
        self.augment = BatchAugment(**(augment or {}))
        self.tokenizer = None
        self._raw: dict[str, tuple[list, list[list[str]], list]] | None = None
        self.labels: dict[str, torch.Tensor] = {}  # the embedded pairs' digit classes (labeled_examples)
        self.splits: dict[str, dict[str, torch.Tensor]] = {}
        self.truncated = 0
        self.spec: ImageTextSpec | None = None

    # --- reading -------------------------------------------------------------------------------------------
    def raw(self) -> dict[str, tuple[list, list[list[str]], list]]:
        """{"train"|"val": (images: paths or tensors, captions per image, where each image was named)}, read once
        (the images of a file are loaded in ``setup``: a tokenizer trained from scratch needs the captions first)."""
        if self._raw is None:
            self._raw = self._embedded() if self.path is None else self._from_files()
        return self._raw

    def _embedded(self):
        digits = DigitsDataModule(image_size=self.image_size, channels=1)
        splits, _ = digits.load_splits()  # digits' own split, stored as 8-bit 8x8 images
        if self.channels != 1:
            raise ConfigError(f"datamodule.channels={self.channels}: the embedded digits are grayscale; allowed is 1")
        out = {}
        for split in ("train", "val"):
            images, labels = splits[split]
            captions = [[t.format(word=DIGIT_WORDS[y], digit=y) for t in self.templates] for y in labels.tolist()]
            out[split] = (list(digits.to_unit(images)), captions, [None] * len(captions))  # in [0, 1], resized
            self.labels[split] = torch.as_tensor(labels, dtype=torch.long)
        return out

    def _from_files(self):
        train = self._read("path", self.path)
        if self.val_path is not None:
            return {"train": train, "val": self._read("val_path", self.val_path)}
        n = len(train[0])
        n_val = max(1, round(self.val_fraction * n))
        if n - n_val < 1:
            raise ConfigError(f"datamodule.path={self.path}: {n} images are too few to hold {n_val} out for validation")
        order = np.random.default_rng(self.split_seed).permutation(n)
        pick = lambda idx: tuple([part[i] for i in sorted(idx)] for part in train)  # noqa: E731
        return {"train": pick(order[n_val:]), "val": pick(order[:n_val])}

    def _read(self, key: str, value: str):
        """(image paths, captions per image, the line that first named each image) of one file."""
        path = Path(value).expanduser()
        what = f"datamodule.{key}={value}"
        if path.suffix.lower() not in FORMATS:
            raise ConfigError(f"{what}: unknown format {path.suffix or '(none)'}; allowed are {', '.join(FORMATS)}")
        if not path.is_file():
            raise ConfigError(f"{what}: no such file")
        text = read_text(path, what)
        rows = []  # (line, image, caption or captions)
        if path.suffix.lower() == ".jsonl":
            for number, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ConfigError(f"{what}: line {number} is not JSON ({err.msg})") from err
                if not isinstance(record, dict):
                    raise ConfigError(f"{what}: line {number} is not a JSON object")
                for k, column in (("image_column", self.image_column), ("caption_column", self.caption_column)):
                    if column not in record:
                        raise ConfigError(f"datamodule.{k}={column}: line {number} of {path} has no such key")
                rows.append((number, record[self.image_column], record[self.caption_column]))
        else:
            reader = csv.DictReader(io.StringIO(text))
            header = reader.fieldnames or []
            for k, column in (("image_column", self.image_column), ("caption_column", self.caption_column)):
                if column not in header:
                    raise ConfigError(
                        f"datamodule.{k}={column}: no such column in {path} (columns: {', '.join(header)})"
                    )
            for record in reader:
                rows.append((reader.line_num, record[self.image_column], record[self.caption_column]))
        if not rows:
            raise ConfigError(f"{what}: no rows")
        order, captions, lines = [], {}, {}
        for number, image, caption in rows:
            if not isinstance(image, str) or not image.strip():
                raise ConfigError(f"{what}: line {number}: no image path in {self.image_column}")
            file = (path.parent / image).resolve()
            if not file.is_file():
                raise ConfigError(f"{what}: line {number}: image {image}: no such file")
            texts = caption if isinstance(caption, list) else [caption]
            for one in texts:
                if not isinstance(one, str) or not one.strip():
                    raise ConfigError(f"{what}: line {number}: empty caption for image {image}")
            if file not in captions:
                order.append(file)
                captions[file], lines[file] = [], (number, image)
            captions[file] += [one.strip() for one in texts]
        return order, [captions[f] for f in order], [f"{what}: line {lines[f][0]}: image {lines[f][1]}" for f in order]

    def _load_images(self, images: list, where: list) -> torch.Tensor:
        """The images as one (N, C, H, W) float tensor in [0, 1] (the embedded ones already are)."""
        if all(isinstance(x, torch.Tensor) for x in images):
            return torch.stack(images)
        from PIL import Image, UnidentifiedImageError

        mode, size = ("L" if self.channels == 1 else "RGB"), self.image_size
        arrays = []
        for file, named in zip(images, where, strict=True):
            try:
                with Image.open(file) as im:
                    arrays.append(np.asarray(im.convert(mode).resize((size, size), Image.BILINEAR), dtype=np.float32))
            except (UnidentifiedImageError, OSError) as err:
                raise ConfigError(f"{named}: cannot read the image ({err})") from err
        x = torch.from_numpy(np.stack(arrays) / 255.0).float()
        return x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2).contiguous()

    def texts(self) -> list[str]:
        """Every training caption: what a text tower built from scratch trains its tokenizer on."""
        return [c for captions in self.raw()["train"][1] for c in captions]

    # --- the backbone's tokenizer, then tensors -------------------------------------------------------------
    def use_backbone(self, backbone) -> None:
        """Take the text tower's tokenizer; its position embeddings bound ``max_length``."""
        text = backbone.towers().get("text")
        if text is None or text.processor is None:
            raise ConfigError(
                "datamodule=image_text needs an image–text backbone (a dual encoder with a text tower, e.g."
                " model=clip_micro)"
            )
        limit = getattr(text, "max_positions", None)
        if limit is not None and self.max_length > limit:
            raise ConfigError(
                f"datamodule.max_length={self.max_length} is longer than the text tower's {limit} positions;"
                f" allowed is at most {limit}"
            )
        self.tokenizer = text.processor

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        if self.tokenizer is None:
            raise RuntimeError("use_backbone(backbone) must come before setup(): the tokenizer is the text tower's")
        raw = self.raw()
        images = {split: self._load_images(raw[split][0], raw[split][2]) for split in raw}
        # Normalised with all training images' statistics, as the in-memory image sources do.
        mean, std = images["train"].mean(), images["train"].std().clamp_min(1e-6)
        total = truncated = 0
        for split, (_, captions, _) in raw.items():
            flat = [c for per_image in captions for c in per_image]
            tensors, lengths, too_long = tokenize(self.tokenizer, flat, self.max_length)
            count = torch.tensor([len(c) for c in captions])
            distinct = {c: i for i, c in enumerate(dict.fromkeys(flat))}  # identical captions are one caption
            self.splits[split] = {
                "image": ((images[split] - mean) / std).float().contiguous(),
                **tensors,
                "lengths": lengths,
                "count": count,
                "first": torch.cumsum(count, 0) - count,
                "owner": torch.repeat_interleave(torch.arange(len(captions)), count),
                "caption_id": torch.tensor([distinct[c] for c in flat]),
            }
            total, truncated = total + len(flat), truncated + too_long
        self.truncated = truncated
        if truncated:
            from pytorch_lightning.utilities import rank_zero_info

            rank_zero_info(
                f"datamodule: {truncated} of {total} captions are longer than datamodule.max_length={self.max_length}"
                " tokens and were truncated"
            )
        n_train = len(self.splits["train"]["first"])
        if self.batch_size > n_train:
            raise ConfigError(
                f"datamodule.batch_size={self.batch_size} is larger than the {n_train} training images; allowed is at"
                f" most {n_train}"
            )
        tok = self.tokenizer
        self.spec = ImageTextSpec(self.channels, self.image_size, len(tok), self.max_length, int(tok.pad_token_id), tok)

    def labeled_examples(self, split: str, limit: int | None = None) -> tuple[dict, object] | None:
        """The embedded pairs' images with their digits' classes (at most ``limit``: a stratified subset, seeded by
        ``split_seed``), for the feature monitor's k-NN and probe on the image tower; None for pairs from files,
        which carry no labels."""
        if split not in self.labels or split not in self.splits:
            return None
        tensors = {"image": self.splits[split]["image"], "label": self.labels[split]}
        return at_most(tensors, limit, self.split_seed), as_stored

    # --- loaders -------------------------------------------------------------------------------------------
    def train_dataloader(self):
        return PairLoader(
            self.splits["train"],
            self.batch_size,
            shuffle=True,
            drop_last=True,
            sample=True,
            seed=self.shuffle_seed,
            epoch_fn=self.epoch,
            num_batches=self.train_batches_per_epoch,
            **self.shard(),
        )

    def eval_loader(self, split: str, batch_size: int | None = None, sharded: bool = True):
        """Every (image, caption) pair of a split, in order; ``sharded=False``: all of it on this process."""
        shard = self.shard() if sharded else {}
        return PairLoader(self.splits[split], batch_size or self.eval_batch_size, False, False, sample=False, **shard)

    def val_dataloader(self):
        return self.eval_loader("val")

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        # Augment training images only, a whole batch at a time, on whatever device they landed on.
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.training and not self.augment.is_identity:
            batch = dict(batch, image=self.augment(batch["image"]))
        return batch
