"""Image–caption pairs for contrastive pre-training (``objective=clip``): a CSV or JSONL file of pairs, or the
embedded digits with captions made from their labels.

- **A file** (``datamodule.path``: ``.csv`` or ``.jsonl``): each row an image path (``image_column``, relative to
  the file) and a caption (``caption_column``). Rows naming the same image are its several captions (in JSONL a
  caption may also be a list of strings). ``val_path`` is the validation file, else ``val_fraction`` of the
  *images* is held out (seeded by ``split_seed``: no image on both sides). Images are read once with PIL,
  converted to ``channels`` (1: grayscale, 3: RGB), resized to ``image_size`` and kept in memory.
  A missing image file, an unreadable image or an empty caption is one line naming the file and its line.
- **Prepared shards** (``datamodule.path``: a directory or URL that ``prepare_data.py image_text`` wrote, one item
  per pair): streamed, their own splits (the val split is validation), each pair once per pass; DataLoader workers
  decode each image, take the recipe's crop, flip and policy per image and tokenize its caption, the device
  normalises (with the statistics ``pretune.json`` records) and applies the rest of the recipe, as for streamed
  image folders; batches in ``BatchLoader``'s seeded order, each rank its slice, a resumed epoch skipping what was
  trained (``loading/text_shards.py``). An image that no longer decodes follows ``on_bad_sample``.
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
from datamodules.loading.decision import Loading
from datamodules.loading.in_memory import BatchLoader, as_stored, at_most
from datamodules.loading.shard_reading import ShardItems, is_url, read_meta
from datamodules.loading.streaming import BadSamples, IndexedLoader, OpenLoaders, training_options, worker_options
from datamodules.loading.text import read_text
from datamodules.loading.text_shards import PairItems, cut_to_longest
from datamodules.sources.digits import DigitsDataModule
from datamodules.spec import ImageTextSpec
from datamodules.transforms.augment import BatchAugment, device_part
from datamodules.transforms.decode import decode
from datamodules.transforms.images import (
    Normalize,
    eval_transform,
    fit_channels,
    image_preprocessing,
    train_transform,
)
from datamodules.transforms.recipe import WORKER_OPS, resolve
from datamodules.transforms.text import tokenize
from lightning_modules.config.rules import check
from lightning_modules.config.rules.datamodule import longer_than_positions
from lightning_modules.core.errors import ConfigError

FORMATS = (".csv", ".jsonl")
CAPTIONS_FILE, CAPTION_SAMPLE = "captions.json", 1000  # kept next to a pre-trained backbone, for zero-shot prompts
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
        num_workers: int | None = None,
        on_bad_sample: str = "error",
        cache_dir: str | None = None,
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
        self.augment_config = augment
        self.num_workers = check("datamodule.num_workers", num_workers)
        self.bad = BadSamples(check("datamodule.on_bad_sample", on_bad_sample), f"datamodule.path={path}")
        self.cache_dir, self.loading, self.streamed, self.open_loaders = cache_dir, None, None, OpenLoaders()
        self.shard_meta = self._read_shards(path, val_path)
        self.augment = self.batch_augment()
        self.tokenizer = None
        self._raw: dict[str, tuple[list, list[list[str]], list]] | None = None
        self.labels: dict[str, torch.Tensor] = {}  # the embedded pairs' digit classes (labeled_examples)
        self.splits: dict[str, dict[str, torch.Tensor]] = {}
        self.truncated = 0
        self.mean = self.std = None  # of the training images, once set up
        self.spec: ImageTextSpec | None = None

    def batch_augment(self) -> BatchAugment:
        """The image sources' recipe (``transforms/recipe.py``): held in memory, every op is a whole-batch tensor op;
        streamed from shards, the device applies what the workers leave to it."""
        self.recipe = resolve("datamodule.augment", self.augment_config, self.image_size)
        if self.shard_meta is not None:
            return device_part(self.recipe)
        return BatchAugment.from_recipe(self.recipe, "datamodule.augment", "is applied per image by streaming workers")

    # --- prepared shards -----------------------------------------------------------------------------------
    def _read_shards(self, path, val_path) -> dict | None:
        if path is None or not (is_url(str(path)) or Path(str(path)).expanduser().is_dir()):
            return None
        if val_path is not None:
            raise ConfigError(
                f"datamodule.val_path={val_path}: prepared shards bring their own splits; allowed is"
                f" datamodule.val_path=null with datamodule.path={path}"
            )
        self.shard_path = str(path).rstrip("/")
        meta = read_meta(self.shard_path, self.cache_dir, "image_text", self.name)
        self.loading = Loading(
            "stream",
            f"datamodule=image_text path={path}: streamed from prepared image-text shards by DataLoader workers"
            f" ({sum(meta['splits'].values()):,} pairs: {meta['splits']})",
        )
        return meta

    def shard_items(self, split: str) -> ShardItems:
        return ShardItems(f"{self.shard_path}/{split}", self.shard_meta["splits"][split], self.cache_dir)

    def describe(self) -> dict:
        return {"loading": self.loading.path} if self.loading is not None else {}

    def _shard_captions(self):
        items = self.shard_items("train")
        return (items[i]["text"] for i in range(len(items)))

    def _setup_shards(self) -> None:
        """The statistics that normalise the images, the training pairs as the workers read them, the validation
        pairs with their ids."""
        mean, std = (fit_channels(self.shard_meta[k], self.channels) for k in ("mean", "std"))
        self.normalize = Normalize(mean, std)
        self.augment.set_pixel_stats(mean, std)  # the device's photo ops act on pixels, after normalisation
        worker = train_transform(self.image_size, self.recipe.only(WORKER_OPS))
        tok, length = self.tokenizer, self.max_length
        train = PairItems(self.shard_items("train"), tok, length, self.channels, self.image_size, worker)
        self.streamed = {"train": train, "val": self._eval_pairs("val")}  # other splits' eval pairs: on demand
        n_train = len(self.streamed["train"])
        if self.batch_size > n_train:
            raise ConfigError(
                f"datamodule.batch_size={self.batch_size} is larger than the {n_train} training pairs; allowed is at"
                f" most {n_train}"
            )
        self.spec = ImageTextSpec(self.channels, self.image_size, len(tok), length, int(tok.pad_token_id), tok)

    def _eval_pairs(self, split: str) -> PairItems:
        """A split's pairs for evaluation: in order, with which image and which distinct caption each is (one pass
        over their names and captions)."""
        items = self.shard_items(split)
        names, captions = items.column("name"), items.column("text")
        images = {n: i for i, n in enumerate(dict.fromkeys(names))}
        distinct = {c: i for i, c in enumerate(dict.fromkeys(captions))}  # identical captions are one caption
        ids = (np.array([images[n] for n in names]), np.array([distinct[c] for c in captions]))
        transform = eval_transform(self.image_size, 1.0)
        return PairItems(items, self.tokenizer, self.max_length, self.channels, self.image_size, transform, ids)

    def _shard_loader(self, split: str, batch_size: int, train: bool, sharded: bool = True) -> IndexedLoader:
        key = split if train or split != "train" else "train/eval"  # the training pairs, evaluated: in order, ids
        if key not in self.streamed:
            self.streamed[key] = self._eval_pairs(split)
        options = dict(worker_options(self, self.num_workers, sharded), collate_fn=cut_to_longest)
        options.update(training_options(self, self.shuffle_seed) if train else {})
        loader = IndexedLoader(self.streamed[key], batch_size, train, train, self.bad, **options)
        return self.open_loaders.add(loader)

    def teardown(self, stage: str) -> None:
        self.open_loaders.close()

    def run_metrics(self) -> dict:
        return {"data/skipped_samples": self.bad.total()} if self.streamed and self.bad.policy == "skip" else {}

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
        from PIL import UnidentifiedImageError

        # As every image source reads a file: the shorter side resized to image_size, the centre square kept.
        transform, arrays = eval_transform(self.image_size, 1.0), []
        for file, named in zip(images, where, strict=True):
            try:
                arrays.append(transform(decode(file, self.channels)))
            except (UnidentifiedImageError, OSError) as err:
                raise ConfigError(f"{named}: cannot read the image ({err})") from err
        return torch.stack(arrays).float() / 255.0

    def export_files(self) -> dict:
        """Next to the pre-trained backbone: a seeded sample of the distinct training captions, from which a zero-shot
        evaluation reads the templates they were written with (``objectives/clip.py: templates_from_captions``)."""
        if self.shard_meta is not None:
            captions = sorted(set(self._shard_captions()))
        else:
            captions = sorted({c for per_image in self.raw()["train"][1] for c in per_image})
        keep = np.sort(np.random.default_rng(0).permutation(len(captions))[:CAPTION_SAMPLE])
        return {CAPTIONS_FILE: {"captions": [captions[i] for i in keep], "distinct": len(captions)}}

    def eval_preprocessing(self) -> dict:
        """Image files read as every image source reads them (the shorter side resized to ``image_size``, bicubic,
        the centre square), normalised with the training images' mean and std (from shards: the preparation's);
        captions by the text tower's tokenizer, truncated at ``max_length`` tokens."""
        streamed = self.shard_meta is not None
        mean, std = (self.normalize.mean, self.normalize.std) if streamed else ([self.mean], [self.std])
        pre = image_preprocessing(self.channels, self.image_size, mean, std, "bicubic", 1.0)
        return {**pre, "modality": "image_text", "max_length": int(self.max_length)}

    def texts(self):
        """Every training caption: what a text tower built from scratch trains its tokenizer on (streamed from
        shards: read as the tokenizer trains)."""
        if self.shard_meta is not None:
            return self._shard_captions()
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
            raise ConfigError(longer_than_positions(self.max_length, limit, "the text tower's"))
        self.tokenizer = text.processor

    def setup(self, stage: str | None = None) -> None:
        if self.splits or self.streamed:
            return
        if self.tokenizer is None:
            raise RuntimeError("use_backbone(backbone) must come before setup(): the tokenizer is the text tower's")
        if self.shard_meta is not None:
            return self._setup_shards()
        raw = self.raw()
        images = {split: self._load_images(raw[split][0], raw[split][2]) for split in raw}
        # Normalised with all training images' statistics, as the in-memory image sources do.
        mean, std = images["train"].mean(), images["train"].std().clamp_min(1e-6)
        self.mean, self.std = float(mean), float(std)
        self.augment.set_pixel_stats(self.mean, self.std)  # the photo ops act on pixels
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
        if self.streamed is not None:
            return self._shard_loader("train", self.batch_size, train=True)
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
        if self.streamed is not None:
            return self._shard_loader(split, batch_size or self.eval_batch_size, train=False, sharded=sharded)
        shard = self.shard() if sharded else {}
        return PairLoader(self.splits[split], batch_size or self.eval_batch_size, False, False, sample=False, **shard)

    def val_dataloader(self):
        return self.eval_loader("val")

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if self.streamed is not None:  # uint8 -> normalised float, on the device
            batch = dict(batch, image=self.normalize(batch["image"]))
        # Augment training images only, a whole batch at a time, on whatever device they landed on.
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.training and not self.augment.is_identity:
            batch = dict(batch, image=self.augment(batch["image"]))
        return batch
