"""Image shards prepared by ``scripts/prepare_data.py``, streamed with litdata from a local directory or an
object-store URL (``s3://``, ``gs://``, ``azure://``, ``hf://``; chunks are cached under ``cache_dir``).

- **Training** is litdata's ``StreamingDataset``/``StreamingDataLoader``: chunks shuffled and dealt to the
  workers, then items within each chunk, seeded by ``seed`` and the epoch, so every run with the same seed (and the
  same number of processes and workers) reads the same batches. Under DDP and multi-node litdata gives each rank
  its own chunks of every epoch (its own distributed logic, not pretune's global-batch slices: the global batches
  differ from one process's, the data seen per epoch is the same). Each image's transform is seeded by (seed,
  epoch, index).
- **Every batch a fair sample.** A worker reads its own chunks, and a batch is one worker's: preparation writes the
  training items in a random order (``prepare.py``), so every chunk, and every run of items in one, is a random
  sample of the split, whatever the folder's order; the reader permutes each chunk's items wholly every epoch
  (not in litdata's blocks of 256), and deals the items of each round of the workers' batches (one batch per
  worker, from as many chunks) anew among those batches (``ShardLoader``), so items of different chunks meet.
- **Mid-epoch resume**: a resumed epoch starts litdata where the uninterrupted run's loader stood after the
  batches already trained (the datamodule's ``batches_trained()``, Lightning's restored progress), so it reads
  exactly the batches the uninterrupted run reads; the epoch follows the trainer's, not litdata's counter.
- **Evaluation** reads val/test by index, in order, each rank its slice of every global batch
  (``streaming.IndexedLoader``): every item is evaluated once, as in memory, whatever the number of ranks.
- Decoding, transforms, normalisation on the device and the bad-sample policy are the image folder's.
"""

from __future__ import annotations

import hashlib
import warnings
from inspect import signature

import torch
from litdata import StreamingDataLoader, StreamingDataset

from datamodules.base import PretuneDataModule
from datamodules.loading.decision import Loading
from datamodules.loading.shard_reading import ShardItems, read_meta
from datamodules.loading.streaming import (
    BadSamples,
    IndexedLoader,
    ItemsDataset,
    OpenLoaders,
    stop_workers,
    worker_options,
)
from datamodules.spec import ImageSpec
from datamodules.transforms.augment import device_part
from datamodules.transforms.images import (
    Normalize,
    eval_transform,
    fit_channels,
    image_preprocessing,
    load_sample,
    sample_key,
    train_transform,
)
from datamodules.transforms.recipe import WORKER_OPS, eval_crop, resolve
from lightning_modules.config.rules import check
from lightning_modules.core.errors import ConfigError

# litdata splits the items among workers itself, so Lightning's guess that __len__ may be off does not apply.
warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")


# A whole permutation of each chunk's items every epoch (litdata >= 0.2.7x permutes blocks of 256 by default, which
# keeps the same items together epoch after epoch; earlier versions permute wholly and have no such argument).
WHOLE_CHUNK = {"item_shuffle_window": 0} if "item_shuffle_window" in signature(StreamingDataset).parameters else {}


class TrainShards(StreamingDataset):
    """litdata's dataset, decoding and transforming each item as it is read (in the loader's workers)."""

    def __init__(self, path, cache_dir, seed, channels, size, transform, labeled):
        super().__init__(path, cache_dir=cache_dir, shuffle=True, seed=seed, drop_last=True, **WHOLE_CHUNK)
        # Not ``self.transform``: litdata applies an attribute of that name to the raw item itself.
        self.channels, self.size, self.image_transform, self.labeled = channels, size, transform, labeled

    def __getitem__(self, index):
        item = super().__getitem__(index)
        i = index.index if hasattr(index, "index") else int(index)
        key = sample_key(self.seed, self.current_epoch, 0, i)
        label = item.get("label") if self.labeled else None
        image, name, transform = bytes(item["image"]), item["name"], self.image_transform
        return load_sample(image, label, name, self.channels, self.size, transform, key)


class ShardLoader(StreamingDataLoader):
    """litdata's loader with the epoch the trainer's, the items of each round of the workers' batches dealt anew
    among them (``_redealt``), and a resumed epoch started where the uninterrupted run's loader stood after the
    batches already trained (``skip_fn``), as the in-memory loader does."""

    def __init__(self, dataset, batch_size, num_workers, pin_memory, bad, epoch_fn, skip_fn):
        super().__init__(
            dataset,
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            drop_last=True,
            # torch draws each iterator's worker seed from this, not from the global stream: a run resumed
            # mid-epoch then draws its masks and dropout exactly as the uninterrupted run
            generator=torch.Generator().manual_seed(0),
        )
        self.bad, self.epoch_fn, self.skip_fn = bad, epoch_fn, skip_fn
        self.round = max(1, num_workers)  # the workers take turns, a batch each: a round is a batch of each

    def __iter__(self):
        skip, epoch = self.skip_fn(), self.epoch_fn()
        skip = skip if 0 < skip < len(self) else 0
        start = skip - skip % self.round  # where the round of the first batch to train begins
        if start:
            # litdata's position after ``start`` batches of this epoch, exactly what its own state said then (its
            # workers take turns, a batch each): litdata resumes from it, skipping the items in its workers.
            self.current_epoch = self.dataset.current_epoch = epoch + 1
            self._num_samples_yielded_streaming = start * self.batch_size
            self._latest_worker_idx = (start - 1) % self.round
            super().load_state_dict(super().state_dict())
        else:  # a new epoch (litdata counts from 1, adding one as it starts); nothing half-done carries over
            self.restore, self.current_epoch = False, epoch
        try:
            for i, batch in enumerate(self._redealt(super().__iter__(), epoch, start // self.round), start):
                if i >= skip:  # the batches of the round that a resumed run had trained are read again, not yielded
                    yield batch
        except GeneratorExit:
            raise
        except BaseException:
            stop_workers(self._iterator, self)
            raise

    def _redealt(self, batches, epoch: int, first_round: int):
        """Rounds of ``self.round`` batches (one per worker, from different chunks), their items dealt anew among
        them by a permutation seeded by (seed, epoch, round): each batch holds items of every chunk being read."""
        pending, number = [], first_round
        for batch in batches:
            batch = self.bad.screen(batch)
            if batch is not None:
                pending.append(batch)
            if len(pending) == self.round:
                yield from self._deal(pending, epoch, number)
                pending, number = [], number + 1
        yield from self._deal(pending, epoch, number)

    def _deal(self, batches: list[dict], epoch: int, number: int) -> list[dict]:
        if len(batches) < 2:
            return batches
        sizes = [len(b["image"]) for b in batches]
        key = hashlib.blake2b(f"{self.dataset.seed}:{epoch}:{number}".encode(), digest_size=8).digest()
        order = torch.randperm(sum(sizes), generator=torch.Generator().manual_seed(int.from_bytes(key, "little") >> 1))
        parts = {k: torch.cat([b[k] for b in batches])[order].split(sizes) for k in batches[0]}
        dealt = [{k: parts[k][i] for k in parts} for i in range(len(sizes))]
        return [{k: v.pin_memory() for k, v in b.items()} for b in dealt] if self.pin_memory else dealt

    def close(self) -> None:
        if self._iterator is not None:
            stop_workers(self._iterator, self)

    # As BatchLoader: Lightning saves and restores these with its loop; the position is its restored progress.
    # (litdata's own state is a batch ahead of training when a checkpoint is taken: Lightning prefetches.)
    def state_dict(self) -> dict:
        return {"epoch": self.epoch_fn()}

    def load_state_dict(self, state_dict: dict) -> None:
        pass


class _ImageItems:
    """``raw(index)`` for image shards read by index (evaluation): the file's bytes, its label, its name."""

    def __init__(self, items: ShardItems, labeled: bool):
        self.items, self.labeled = items, labeled

    def __call__(self, index: int):
        item = self.items[index]
        return bytes(item["image"]), item.get("label") if self.labeled else None, item["name"]


class ShardsDataModule(PretuneDataModule):
    """Prepared image shards: ``path`` (local or URL) holds ``pretune.json`` and ``train/``, ``val/``, ``test/``."""

    modality = "image"
    name = "shards"
    placement = "stream"  # metrics.json's data/placement (in-memory data: cpu, device or pinned)

    def __init__(
        self,
        path: str | None = None,
        batch_size: int = 64,
        eval_batch_size: int = 256,
        image_size: int = 224,
        channels: int = 3,
        seed: int = 0,
        labeled: bool = True,
        num_workers: int | None = None,
        on_bad_sample: str = "error",
        augment: dict | None = None,
        eval_crop_pct: float | None = None,
        cache_dir: str | None = None,
    ):
        super().__init__()
        if not path:
            raise ConfigError("datamodule.path is not set: allowed is a directory or URL of prepared shards")
        self.path, self.cache_dir = str(path).rstrip("/"), cache_dir
        self.batch_size = check("datamodule.batch_size", batch_size)
        self.eval_batch_size = check("datamodule.eval_batch_size", eval_batch_size)
        self.image_size, self.channels = check("datamodule.image_size", image_size), channels
        self.seed, self.labeled = seed, labeled
        self.num_workers = check("datamodule.num_workers", num_workers)
        self.bad = BadSamples(check("datamodule.on_bad_sample", on_bad_sample), f"datamodule.path={path}")
        self.augment_config, self.eval_crop_config = augment, eval_crop_pct
        self.resolve_recipe()  # its values checked now; resolved again in setup, at the final image size
        self.loading: Loading | None = None
        self.meta: dict | None = None
        self.norm_mean: list[float] | None = None  # the backbone's weights' statistics (use_backbone), if any
        self.norm_std: list[float] | None = None
        self.open_loaders = OpenLoaders()

    def resolve_recipe(self) -> None:
        """The training recipe and evaluation crop (``transforms/recipe.py``), as the image folder's: the workers
        take the crop, the flip and the policy per image, the device the rest per batch."""
        self.recipe = resolve("datamodule.augment", self.augment_config, self.image_size)
        self.eval_crop = eval_crop(self.eval_crop_config, self.augment_config, self.image_size)
        self.augment = device_part(self.recipe)

    def describe(self) -> dict:
        return {"loading": "stream", "augment": self.recipe.record(), "eval_crop_pct": self.eval_crop}

    def use_backbone(self, backbone) -> None:
        """As the in-memory datamodules: weights trained elsewhere bring the input size and the mean/std they
        were trained with (``backbone.preprocessing``); else the data's statistics, from ``pretune.json``."""
        pre = getattr(backbone, "preprocessing", None) or {}
        if pre.get("input_size"):
            self.image_size = check("datamodule.image_size", int(pre["input_size"]))
        self.norm_mean, self.norm_std = pre.get("mean"), pre.get("std")

    def setup(self, stage: str | None = None) -> None:
        if self.spec is not None:
            return
        self.resolve_recipe()
        meta = read_meta(self.path, self.cache_dir)
        self.meta = meta
        n_train = meta["splits"]["train"]
        if self.batch_size > n_train:
            raise ConfigError(
                f"datamodule.batch_size={self.batch_size} is larger than the {n_train} training images;"
                f" allowed is at most {n_train}"
            )
        mean = self.norm_mean if self.norm_mean is not None else fit_channels(meta["mean"], self.channels)
        std = self.norm_std if self.norm_std is not None else fit_channels(meta["std"], self.channels)
        self.normalize = Normalize(list(mean), list(std))
        self.normalization = (self.normalize.mean, self.normalize.std)
        self.augment.set_pixel_stats(*self.normalization)  # the device's photo ops act on pixels
        total = sum(meta["splits"].values())
        self.loading = Loading(
            "stream",
            f"datamodule=shards path={self.path}: streamed from prepared shards"
            f" by DataLoader workers ({total:,} images: {meta['splits']})",
        )
        classes = tuple(meta["classes"])
        stats = tuple(self.normalize.mean), tuple(self.normalize.std)
        self.spec = ImageSpec(self.channels, self.image_size, len(classes) if self.labeled else 0, classes, *stats)

    def eval_preprocessing(self) -> dict:
        """The evaluation transform (``eval_crop_pct``, bicubic) and this run's mean and std."""
        mean, std = self.normalization
        return image_preprocessing(self.channels, self.image_size, mean, std, "bicubic", self.eval_crop)

    def train_dataloader(self):
        # Built here, not in setup: litdata reads the process group (rank, world size) when the dataset is
        # made, and the trainer has started it by now.
        transform = train_transform(self.image_size, self.recipe.only(WORKER_OPS))
        dataset = TrainShards(
            f"{self.path}/train", self.cache_dir, self.seed, self.channels, self.image_size, transform, self.labeled
        )
        options = worker_options(self, self.num_workers, sharded=False)  # litdata shards across ranks itself
        workers, pin = options["num_workers"], options["pin_memory"]
        loader = ShardLoader(dataset, self.batch_size, workers, pin, self.bad, self.epoch, self.batches_trained)
        return self.open_loaders.add(loader)

    def eval_loader(self, split: str, batch_size: int | None = None, sharded: bool = True):
        raw = _ImageItems(ShardItems(f"{self.path}/{split}", self.meta["splits"][split], self.cache_dir), labeled=True)
        transform = eval_transform(self.image_size, self.eval_crop)
        items = ItemsDataset(raw, self.meta["splits"][split], self.channels, self.image_size, transform)
        batch_size = batch_size or self.eval_batch_size
        loader = IndexedLoader(
            items, batch_size, False, False, self.bad, **worker_options(self, self.num_workers, sharded)
        )
        return self.open_loaders.add(loader)

    def teardown(self, stage: str) -> None:
        self.open_loaders.close()

    def val_dataloader(self):
        return self.eval_loader("val")

    def test_dataloader(self):
        return self.eval_loader("test")

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        batch = dict(batch, image=self.normalize(batch["image"]))  # uint8 -> normalised float, on the device
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.training and not self.augment.is_identity:  # the device's part of the recipe
            batch = dict(batch, image=self.augment(batch["image"]))
        return batch

    def run_metrics(self) -> dict:
        return {"data/skipped_samples": self.bad.total()} if self.bad.policy == "skip" else {}
