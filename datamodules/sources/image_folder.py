"""A user's own images in the common ``root/train/<class>/*.png|jpg`` layout, of any size.

``val/`` and ``test/`` folders are used when present; otherwise they are split off the training images with
the configured fractions (seeded, stratified), as file lists, before anything is decoded. Then the run takes
one of two paths (``datamodules/loading/decision.py``): data within ``memory_budget_gb`` are decoded once, by a pool of
threads, into memory (``InMemoryImageDataModule``: the recipe as whole-batch tensor ops); larger data stream from
disk, decoded per batch by DataLoader workers that take the recipe's crop, flip and policy per image
(``datamodules/loading/streaming.py``, ``transforms/images.py``), the rest of the recipe following per batch on the
device. Both see the same split, the same recipe (``augment``, ``transforms/recipe.py``) and, batch by batch, the same
images in the same order; both evaluate on the same pixels (``eval_crop_pct``); neither squashes the aspect ratio.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from datamodules.loading.decision import Loading, choose, default_workers
from datamodules.loading.in_memory import InMemoryImageDataModule
from datamodules.loading.streaming import (
    BadSamples,
    IndexedLoader,
    ItemsDataset,
    OpenLoaders,
    training_options,
    worker_options,
)
from datamodules.sources.folders import folder_splits
from datamodules.spec import ImageSpec
from datamodules.transforms.augment import BatchAugment, device_part
from datamodules.transforms.decode import decode
from datamodules.transforms.images import (
    Normalize,
    channel_stats,
    eval_transform,
    image_preprocessing,
    train_transform,
)
from datamodules.transforms.recipe import WORKER_OPS
from lightning_modules.config.rules import check
from lightning_modules.core.errors import ConfigError

STATS_SAMPLE = 256  # training images that estimate the data's mean and std when streaming


class Files:
    """``raw(index)`` for a folder: the file's path, its label (None when unlabeled), its name.

    The paths are one fixed-width bytes array, not a list of Python strings: a forked worker reading a Python
    object writes its reference count, which copies the page, so each worker's memory would grow with every
    file it touched (pytorch#13246); a numpy buffer stays shared."""

    def __init__(self, paths: np.ndarray, labels: np.ndarray | None):
        self.paths = np.array([str(p).encode("utf-8", "surrogateescape") for p in paths], dtype=np.bytes_)
        self.labels = labels

    def __call__(self, index: int):
        path = self.paths[index].decode("utf-8", "surrogateescape")
        return path, None if self.labels is None else int(self.labels[index]), path


class ImageFolderDataModule(InMemoryImageDataModule):
    name = "image_folder"
    crops_eval_at_read = True  # val/test files are read with the evaluation crop, as the streaming workers read them
    held_in_memory = (
        "is applied per image by streaming workers, and these images are held in memory (datamodule.loading=stream"
        " streams them)"
    )
    eval_interpolation = "bicubic"  # held in memory: each file read as eval_transform(image_size, eval_crop_pct)

    def __init__(
        self,
        root: str | None = None,
        loading: str = "auto",
        memory_budget_gb: float = 4.0,
        num_workers: int | None = None,
        on_bad_sample: str = "error",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.root = root
        self.loading_mode = check("datamodule.loading", loading)
        self.memory_budget_gb = float(check("datamodule.memory_budget_gb", memory_budget_gb))
        self.num_workers = check("datamodule.num_workers", num_workers)
        self.bad = BadSamples(check("datamodule.on_bad_sample", on_bad_sample), f"datamodule.root={root}")
        self.loading: Loading | None = None  # the path this run took, once set up
        self.normalization: tuple[list[float], list[float]] | None = None
        self._files: dict | None = None
        self.open_loaders = OpenLoaders()

    def split_files(self) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], tuple[str, ...]]:
        """{"train"|"val"|"test": (paths, labels)} and the class names: the split both paths use."""
        return folder_splits(self.root, self.val_fraction, self.test_fraction, self.split_seed)

    # --- which path ------------------------------------------------------------------------------------
    @property
    def streams(self) -> bool:
        return self.loading is not None and self.loading.streams

    def can_cache_features(self) -> bool:
        """Streamed images are re-decoded and re-augmented per batch: nothing holds them to cache features of."""
        return not self.streams and super().can_cache_features()

    def batch_augment(self) -> BatchAugment:
        """Streamed, the workers take the crop, the flip and the policy; the device the rest. Before the path is
        known (at build), values are checked as for memory, but an op only streaming can do is not refused yet."""
        if getattr(self, "loading", None) is None or self.streams:
            return device_part(self.recipe)
        return super().batch_augment()

    def describe(self) -> dict:
        return {"loading": self.loading.path, **super().describe()} if self.loading else super().describe()

    def setup(self, stage: str | None = None) -> None:
        if self.spec is not None:
            return
        files, classes = self.split_files()
        n = sum(len(labels) for _, labels in files.values())
        what = f"datamodule=image_folder root={self.root}"
        self.loading = choose(what, n, self.channels, self.image_size, self.loading_mode, self.memory_budget_gb)
        if self.streams:
            self.resolve_recipe()
            self._setup_streaming(files, classes)
        else:
            self._files = (files, classes)
            super().setup(stage)  # load_splits() below reads the files

    def eval_preprocessing(self) -> dict:
        """Either path reads a file with the evaluation transform (``eval_crop_pct``, bicubic); held in memory it is
        normalised with the in-memory statistics, streamed with the streaming path's mean and std."""
        if not self.streams:
            return super().eval_preprocessing()
        mean, std = self.normalization
        return image_preprocessing(self.channels, self.image_size, mean, std, "bicubic", self.eval_crop)

    # --- in memory -------------------------------------------------------------------------------------
    def _read(self, paths: np.ndarray, labels: np.ndarray, crop_pct: float) -> tuple[torch.Tensor, np.ndarray]:
        """Decode ``paths`` with a pool of threads (PIL releases the GIL while decoding), keeping the aspect
        ratio: the shorter side resized to ``image_size / crop_pct``, the centre square kept (training images at
        ``crop_pct=1``: the whole square, for the random crop to take its part of)."""
        transform = eval_transform(self.image_size, crop_pct)

        def read(path):
            try:
                return transform(decode(path, self.channels)), ""
            except Exception as err:  # the file, not the code: anything PIL raises on a broken file
                return None, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"

        with ThreadPoolExecutor(max_workers=default_workers()) as pool:
            decoded = list(pool.map(read, paths))
        keep = [i for i, (image, _) in enumerate(decoded) if image is not None]
        if len(keep) < len(decoded):  # one line naming the first bad file, or (skip) a warning and a count
            self.bad.screen({"_error": [error for _, error in decoded], "_name": [str(p) for p in paths]})
        if not keep:
            raise ConfigError(f"datamodule.root={self.root}: no readable image among {len(paths)} files of a split")
        images = torch.stack([decoded[i][0] for i in keep])  # uint8: stored 8-bit, decoded per batch
        labels = labels[keep]
        return images, labels

    def load_splits(self):
        files, classes = self._files if self._files is not None else self.split_files()
        self._files = None  # the in-memory tensors are what is kept, not the file lists
        crops = {split: 1.0 if split == "train" else self.eval_crop for split in files}
        return {split: self._read(paths, labels, crops[split]) for split, (paths, labels) in files.items()}, classes

    # --- streamed --------------------------------------------------------------------------------------
    def _setup_streaming(self, files: dict, classes: tuple[str, ...]) -> None:
        train_paths, train_labels = files["train"]
        if self.labeled and self.label_fraction < 1:
            subset = self._label_subset(train_paths, train_labels)
            files = dict(files, train=subset)
        n_train = len(files["train"][1])
        if self.batch_size > n_train:
            what = "labeled training examples" if self.labeled else "training images"
            raise ConfigError(
                f"datamodule.batch_size={self.batch_size} is larger than the {n_train} {what}"
                f" (label_fraction={self.label_fraction}); allowed is at most {n_train}"
            )
        self.stream = files
        self.placement = "stream"  # metrics.json's data/placement: neither held on the device nor in memory
        # Normalisation: the statistics the backbone's weights were trained with (``use_backbone``: their
        # ``preprocessing``), else the data's, per channel, estimated on a seeded sample of all training images
        # (labeled or not), as the in-memory path uses all of them.
        mean, std = self._data_stats(train_paths) if self.norm_mean is None or self.norm_std is None else (None, None)
        mean = list(self.norm_mean) if self.norm_mean is not None else mean
        std = list(self.norm_std) if self.norm_std is not None else std
        self.normalization = (mean, std)
        self.normalize = Normalize(mean, std)
        self.augment.set_pixel_stats(mean, std)  # the device's photo ops act on pixels, after normalisation
        stats = tuple(self.normalize.mean), tuple(self.normalize.std)
        self.spec = ImageSpec(self.channels, self.image_size, len(classes), tuple(classes), *stats)

    def _data_stats(self, paths: np.ndarray) -> tuple[list[float], list[float]]:
        rng = np.random.default_rng(self.split_seed)
        sample = paths[np.sort(rng.permutation(len(paths))[:STATS_SAMPLE])]
        transform = eval_transform(self.image_size, self.eval_crop)
        images = []
        for path in sample:
            try:
                images.append(transform(decode(path, self.channels)))
            except Exception:  # a bad file is reported (or skipped) when a loader reaches it
                continue
        if not images:
            raise ConfigError(f"datamodule.root={self.root}: none of {len(sample)} sampled training images reads")
        return channel_stats(images)

    def _items(self, split: str, train: bool) -> ItemsDataset:
        paths, labels = self.stream[split]
        if train:
            transform = train_transform(self.image_size, self.recipe.only(WORKER_OPS))
        else:
            transform = eval_transform(self.image_size, self.eval_crop)
        keep_labels = self.labeled or split != "train"
        raw = Files(paths, labels if keep_labels else None)
        return ItemsDataset(raw, len(paths), self.channels, self.image_size, transform)

    def train_dataloader(self):
        if not self.streams:
            return super().train_dataloader()
        items, options = self._items("train", train=True), worker_options(self, self.num_workers)
        loader = IndexedLoader(
            items, self.batch_size, True, True, self.bad, **options, **training_options(self, self.label_seed)
        )
        return self.open_loaders.add(loader)

    def eval_loader(self, split: str, batch_size: int | None = None, sharded: bool = True):
        if not self.streams:
            return super().eval_loader(split, batch_size, sharded)
        options = worker_options(self, self.num_workers, sharded)
        items = self._items(split, train=False)
        loader = IndexedLoader(items, batch_size or self.eval_batch_size, False, False, self.bad, **options)
        return self.open_loaders.add(loader)

    def teardown(self, stage: str) -> None:
        self.open_loaders.close()  # the workers end with the fit (or test), not when the collector gets to them

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if self.streams:  # uint8 -> normalised float, on the device; then the device's part of the recipe
            batch = dict(batch, image=self.normalize(batch["image"]))
        return super().on_after_batch_transfer(batch, dataloader_idx)

    def run_metrics(self) -> dict:
        """For metrics.json: how many samples were skipped as unreadable (with on_bad_sample=skip)."""
        return {"data/skipped_samples": self.bad.total()} if self.bad.policy == "skip" else {}
