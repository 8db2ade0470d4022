"""Image shards prepared by ``scripts/prepare_data.py``, streamed with litdata from a local directory or an
object-store URL (``s3://``, ``gs://``, ``azure://``, ``hf://``; chunks are cached under ``cache_dir``).

- **Training** is litdata's ``StreamingDataset``/``StreamingDataLoader``: chunks shuffled, then items within
  them, seeded by ``seed`` and the epoch, so every run with the same seed (and the same number of processes
  and workers) reads the same batches. Under DDP and multi-node litdata gives each rank its own chunks of every
  epoch (its own distributed logic, not pretune's global-batch slices: the global batches differ from one
  process's, the data seen per epoch is the same). Each image's transform is seeded by (seed, epoch, index).
- **Mid-epoch resume**: a resumed epoch starts litdata where the uninterrupted run's loader stood after the
  batches already trained (the datamodule's ``batches_trained()``, Lightning's restored progress), so it reads
  exactly the batches the uninterrupted run reads; the epoch follows the trainer's, not litdata's counter.
- **Evaluation** reads val/test by index, in order, each rank its slice of every global batch
  (``streaming.IndexedLoader``): every item is evaluated once, as in memory, whatever the number of ranks.
- Decoding, transforms, normalisation on the device and the bad-sample policy are the image folder's.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path

import torch
from litdata import StreamingDataLoader, StreamingDataset

from datamodules.base import PretuneDataModule
from datamodules.loading.decision import Loading, default_workers
from datamodules.loading.prepare import FORMAT, META, VERSION
from datamodules.loading.streaming import BadSamples, IndexedLoader, ItemsDataset, OpenLoaders, stop_workers
from datamodules.spec import ImageSpec
from datamodules.transforms.images import (
    Normalize,
    check_transforms,
    eval_transform,
    fit_channels,
    image_preprocessing,
    load_sample,
    sample_key,
    train_transform,
)
from lightning_modules.config.rules import check
from lightning_modules.core.errors import ConfigError

# litdata splits the items among workers itself, so Lightning's guess that __len__ may be off does not apply.
warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")


def is_url(path: str) -> bool:
    return "://" in path or path.startswith("local:")


def read_meta(path: str, cache_dir: str | None = None) -> dict:
    """``pretune.json`` of a prepared directory (downloaded first from a URL), checked: a directory that was
    not prepared (or whose preparation was cut short), or was prepared in another format version, is refused
    with one line."""
    where = f"datamodule.path={path}"
    how = "prepare it with: python scripts/prepare_data.py image_folder root=<images> out=<dir>"
    if is_url(path):
        from litdata.streaming.downloader import get_downloader

        if cache_dir:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
        local = Path(tempfile.mkdtemp(prefix="pretune-meta-", dir=cache_dir)) / META
        try:
            get_downloader(path, str(local.parent), []).download_file(f"{path.rstrip('/')}/{META}", str(local))
            text = local.read_text()
        except Exception as err:
            raise ConfigError(f"{where}: no {META} could be read there ({type(err).__name__}); {how}") from err
    else:
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"{where}: no such directory; {how}")
        if not (folder / META).is_file():
            partial = sorted(p.name for p in folder.parent.glob(f".{folder.name}.partial-*"))
            cut = f" (an interrupted preparation left {partial[0]}: run it again)" if partial else ""
            raise ConfigError(f"{where}: not a prepared shard directory, it has no {META}{cut}; {how}")
        text = (folder / META).read_text()
    meta = json.loads(text)
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ConfigError(
            f"{where}: prepared as {meta.get('format')} version {meta.get('version')}, this pretune reads"
            f" {FORMAT} version {VERSION}; prepare it again with scripts/prepare_data.py"
        )
    return meta


class TrainShards(StreamingDataset):
    """litdata's dataset, decoding and transforming each item as it is read (in the loader's workers)."""

    def __init__(self, path, cache_dir, seed, channels, size, transform, labeled):
        super().__init__(path, cache_dir=cache_dir, shuffle=True, seed=seed, drop_last=True)
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
    """litdata's loader with the epoch the trainer's, and a resumed epoch started where the uninterrupted run's
    loader stood after the batches already trained (``skip_fn``), as the in-memory loader does."""

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

    def __iter__(self):
        skip, epoch = self.skip_fn(), self.epoch_fn()
        if 0 < skip < len(self):
            # litdata's position after ``skip`` batches of this epoch, exactly what its own state said then (its
            # workers take turns, a batch each): litdata resumes from it, skipping the items in its workers.
            self.current_epoch = self.dataset.current_epoch = epoch + 1
            self._num_samples_yielded_streaming = skip * self.batch_size
            self._latest_worker_idx = (skip - 1) % max(1, self.num_workers)
            super().load_state_dict(super().state_dict())
        else:  # a new epoch (litdata counts from 1, adding one as it starts); nothing half-done carries over
            self.restore, self.current_epoch = False, epoch
        try:
            for batch in super().__iter__():
                batch = self.bad.screen(batch)
                if batch is not None:
                    yield batch
        except GeneratorExit:
            raise
        except BaseException:
            stop_workers(self._iterator, self)
            raise

    def close(self) -> None:
        if self._iterator is not None:
            stop_workers(self._iterator, self)

    # As BatchLoader: Lightning saves and restores these with its loop; the position is its restored progress.
    # (litdata's own state is a batch ahead of training when a checkpoint is taken: Lightning prefetches.)
    def state_dict(self) -> dict:
        return {"epoch": self.epoch_fn()}

    def load_state_dict(self, state_dict: dict) -> None:
        pass


class _ShardItems:
    """``raw(index)`` for prepared shards read by index; the litdata dataset opens lazily in each worker."""

    def __init__(self, path: str, cache_dir: str | None, labeled: bool):
        self.path, self.cache_dir, self.labeled, self._dataset = path, cache_dir, labeled, None

    def __getstate__(self):
        return dict(self.__dict__, _dataset=None)

    def __call__(self, index: int):
        if self._dataset is None:
            self._dataset = StreamingDataset(self.path, cache_dir=self.cache_dir)
        item = self._dataset[index]
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
        transforms: dict | None = None,
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
        self.transforms = check_transforms(transforms)
        self.loading: Loading | None = None
        self.meta: dict | None = None
        self.norm_mean: list[float] | None = None  # the backbone's weights' statistics (use_backbone), if any
        self.norm_std: list[float] | None = None
        self.open_loaders = OpenLoaders()

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
        meta = read_meta(self.path, self.cache_dir)
        if meta["kind"] != "image_folder":
            raise ConfigError(
                f"datamodule.path={self.path} holds {meta['kind']} shards; datamodule=shards streams images"
                " prepared from an image folder"
            )
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
        total = sum(meta["splits"].values())
        self.loading = Loading(
            "stream",
            f"datamodule=shards path={self.path}: streamed from prepared shards"
            f" by DataLoader workers ({total:,} images: {meta['splits']})",
        )
        classes = tuple(meta["classes"])
        self.spec = ImageSpec(self.channels, self.image_size, len(classes) if self.labeled else 0, classes)

    def eval_preprocessing(self) -> dict:
        """The evaluation transform (``transforms.eval_crop_pct``, bicubic) and this run's mean and std."""
        mean, std = self.normalization
        crop = self.transforms["eval_crop_pct"]
        return image_preprocessing(self.channels, self.image_size, mean, std, "bicubic", crop)

    def _options(self) -> dict:
        trainer = getattr(self, "trainer", None)
        on_node = trainer.num_devices if trainer is not None else 1
        workers = self.num_workers if self.num_workers is not None else default_workers(on_node)
        cuda = trainer is not None and trainer.strategy.root_device.type == "cuda"
        return {"num_workers": workers, "pin_memory": cuda}

    def train_dataloader(self):
        # Built here, not in setup: litdata reads the process group (rank, world size) when the dataset is
        # made, and the trainer has started it by now.
        t = self.transforms
        transform = train_transform(self.image_size, t["scale"], t["ratio"], t["flip"], t["auto_augment"])
        dataset = TrainShards(
            f"{self.path}/train", self.cache_dir, self.seed, self.channels, self.image_size, transform, self.labeled
        )
        workers, pin = self._options().values()
        loader = ShardLoader(dataset, self.batch_size, workers, pin, self.bad, self.epoch, self.batches_trained)
        return self.open_loaders.add(loader)

    def eval_loader(self, split: str, batch_size: int | None = None, sharded: bool = True):
        raw = _ShardItems(f"{self.path}/{split}", self.cache_dir, labeled=True)
        transform = eval_transform(self.image_size, self.transforms["eval_crop_pct"])
        items = ItemsDataset(raw, self.meta["splits"][split], self.channels, self.image_size, transform)
        shard = self.shard() if sharded else {}
        batch_size = batch_size or self.eval_batch_size
        loader = IndexedLoader(items, batch_size, False, False, self.bad, **shard, **self._options())
        return self.open_loaders.add(loader)

    def teardown(self, stage: str) -> None:
        self.open_loaders.close()

    def val_dataloader(self):
        return self.eval_loader("val")

    def test_dataloader(self):
        return self.eval_loader("test")

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        return dict(batch, image=self.normalize(batch["image"]))

    def run_metrics(self) -> dict:
        return {"data/skipped_samples": self.bad.total()} if self.bad.policy == "skip" else {}
