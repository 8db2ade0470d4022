"""Streaming loaders: images decoded in DataLoader worker processes, batches in a reproducible order, a
training loader that resumes in the middle of an epoch, and one policy for unreadable samples.

- ``IndexedLoader`` serves a map-style dataset (files of a folder, or items of prepared shards read by index)
  in ``BatchLoader``'s order: seeded by (seed, epoch), rank ``r`` of ``W`` decoding only its contiguous slice
  of every global batch. So a streamed folder sees, step by step, the images the in-memory path sees, and
  under DDP each rank reads its own part of every epoch, the same global batches as one process.
- **Mid-epoch resume.** As the in-memory loader (``BatchLoader``): a training loader skips, undecoded, the
  batches of the epoch that a resumed run had already trained (``skip_fn``: the datamodule's
  ``batches_trained()``, Lightning's restored progress); the order and every image's transform are functions
  of (seed, epoch), so the rest of the epoch is the uninterrupted run's.
- **Bad samples.** A worker never raises on a file it cannot decode (a traceback from a worker is twenty
  lines); it marks the sample, and the main process either stops with one line naming the file
  (``on_bad_sample=error``) or drops it from its batch and counts it (``skip``; ``data/skipped_samples`` in
  metrics.json).
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable

import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.loading.decision import default_workers
from datamodules.loading.in_memory import BatchLoader
from datamodules.transforms.images import load_sample, sample_key
from lightning_modules.core.errors import ConfigError

ON_BAD_SAMPLE = ("error", "skip")


class BadSamples:
    """What happens to a sample whose file cannot be decoded: one clear error, or dropped and counted."""

    def __init__(self, policy: str, where: str, key: str = "datamodule.on_bad_sample"):
        if policy not in ON_BAD_SAMPLE:
            raise ConfigError(f"{key}={policy!r} is invalid: allowed are 'error', 'skip'")
        self.policy, self.where, self.key = policy, where, key  # key: the option a user sets (predict.py's own)
        self.skipped, self._named = 0, set()

    def screen(self, batch: dict) -> dict | None:
        """The batch without the markers, without its bad samples under ``skip`` (None if none is left).
        A batch without markers (a source that cannot fail to decode, e.g. text) passes as it is."""
        if "_error" not in batch:
            return batch
        errors, names = batch.pop("_error"), batch.pop("_name")
        bad = [i for i, error in enumerate(errors) if error]
        if not bad:
            return batch
        if self.policy == "error":
            raise ConfigError(
                f"{self.where}: cannot read image {names[bad[0]]} ({errors[bad[0]]});"
                f" {self.key}=skip skips unreadable images and counts them"
            )
        self.skipped += len(bad)
        for i in bad:
            if names[i] not in self._named:  # one warning per file, not one per epoch
                self._named.add(names[i])
                print(f"warning: {self.where}: skipped unreadable image {names[i]} ({errors[i]})", file=sys.stderr)
        keep = torch.tensor([i for i in range(len(errors)) if not errors[i]], dtype=torch.long)
        if len(keep) == 0:
            return None
        return {k: v[keep] if isinstance(v, torch.Tensor) else [v[i] for i in keep.tolist()] for k, v in batch.items()}

    def total(self) -> int:
        """Skipped samples of all ranks (a collective under DDP: every rank must call it)."""
        import torch.distributed as dist

        count = torch.tensor(self.skipped, dtype=torch.long)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            if dist.get_backend() == "nccl":
                count = count.cuda()
            dist.all_reduce(count)
        return int(count)


def worker_options(datamodule, num_workers: int | None, sharded: bool = True) -> dict:
    """What every streaming loader takes from its datamodule and trainer: ``num_workers`` worker processes (null:
    this node's cores shared by its training processes), pinned memory for a CUDA device, this rank's place."""
    trainer = getattr(datamodule, "trainer", None)
    on_node = trainer.num_devices if trainer is not None else 1
    workers = num_workers if num_workers is not None else default_workers(on_node)
    cuda = trainer is not None and trainer.strategy.root_device.type == "cuda"
    return {"num_workers": workers, "pin_memory": cuda, **(datamodule.shard() if sharded else {})}


def training_options(datamodule, seed: int) -> dict:
    """What a training ``IndexedLoader`` takes from its datamodule: the order's seed, the epoch, the epoch's length,
    and the batches a resumed epoch had trained."""
    return {
        "seed": seed,
        "epoch_fn": datamodule.epoch,
        "num_batches": getattr(datamodule, "train_batches_per_epoch", None),
        "skip_fn": datamodule.batches_trained,
    }


class OpenLoaders:
    """The streaming loaders a datamodule handed out, to stop their workers at ``teardown``. Left to the garbage
    collector (a Trainer holds them in reference cycles), stopping them waits out torch's timeouts, 5 s a
    worker, whenever the collector gets to them: in the middle of the next run of a sweep."""

    def __init__(self):
        self.loaders = weakref.WeakSet()

    def add(self, loader):
        self.loaders.add(loader)
        return loader

    def close(self) -> None:
        for loader in list(self.loaders):
            loader.close()


def stop_workers(iterator, loader: DataLoader) -> None:
    """Stop a DataLoader's worker processes now (torch has no public call for it)."""
    if loader._iterator is iterator:
        loader._iterator = None
    if hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()


class ItemsDataset(Dataset):
    """Map-style dataset of (index, key) -> a decoded, transformed sample; ``raw(index)`` says where the
    image's bytes are and what its label and name are (a folder's file, or an item of prepared shards)."""

    def __init__(self, raw: Callable[[int], tuple], n: int, channels: int, size: int, transform):
        self.raw, self.n, self.channels, self.size, self.transform = raw, n, channels, size, transform

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, item):
        index, key = item
        source, label, name = self.raw(index)
        return load_sample(source, label, name, self.channels, self.size, self.transform, key)


class _OrderedBatches:
    """The batch sampler: BatchLoader's order of indices for the epoch, each index with its transform seed; the
    batches a resumed epoch had trained (``skip_fn``) are left out without being decoded."""

    def __init__(self, order: BatchLoader, seed: int, epoch_fn: Callable[[], int], skip_fn=None):
        self.order, self.seed, self.epoch_fn, self.skip_fn = order, seed, epoch_fn, skip_fn

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self):
        skip = self.skip_fn() if self.skip_fn is not None else 0
        first = skip if 0 < skip < len(self.order) else 0
        epoch = self.epoch_fn()
        for i, batch in enumerate(self.order):
            if i >= first:
                repeat = i // self.order.per_pass
                yield [(j, sample_key(self.seed, epoch, repeat, j)) for j in batch["index"].tolist()]


class IndexedLoader:
    """Batches of ``dataset`` decoded by ``num_workers`` worker processes, in BatchLoader's order; a training
    loader skips the batches a resumed epoch had trained (``skip_fn``). ``dataset[(index, key)]`` is one sample
    (``key``: the seed of its random transform); ``collate_fn`` makes a batch of them (text: cut to its longest)."""

    def __init__(
        self,
        dataset: ItemsDataset,
        batch_size: int,
        shuffle: bool,
        drop_last: bool,
        bad: BadSamples,
        seed: int = 0,
        epoch_fn: Callable[[], int] | None = None,
        num_batches: int | None = None,
        rank: int = 0,
        world: int = 1,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent: bool = True,
        skip_fn: Callable[[], int] | None = None,
        collate_fn: Callable | None = None,
    ):
        self.epoch_fn = epoch_fn or (lambda: 0)
        index = {"index": torch.arange(len(dataset))}
        order = BatchLoader(index, batch_size, shuffle, drop_last, seed, self.epoch_fn, num_batches, rank, world)
        self.batches = _OrderedBatches(order, seed, self.epoch_fn, skip_fn)
        self.bad = bad
        self.loader = DataLoader(
            dataset,
            batch_sampler=self.batches,
            num_workers=num_workers,
            persistent_workers=persistent and num_workers > 0,
            pin_memory=pin_memory,
            prefetch_factor=2 if num_workers > 0 else None,
            generator=torch.Generator().manual_seed(seed),  # not the global stream: the loader leaves it alone
            collate_fn=collate_fn,  # None: torch's (stacks each entry)
        )

    def __len__(self) -> int:
        return len(self.batches)

    def close(self) -> None:
        """Stop the worker processes (the datamodule's ``teardown`` does, at the end of fit and test)."""
        if self.loader._iterator is not None:
            stop_workers(self.loader._iterator, self.loader)

    def __iter__(self):
        iterator = iter(self.loader)
        try:
            for batch in iterator:
                batch = self.bad.screen(batch)
                if batch is not None:
                    yield batch
        except GeneratorExit:  # the consumer stopped early (a step limit): the workers serve the next epoch
            raise
        except BaseException:
            stop_workers(iterator, self.loader)
            raise

    # As BatchLoader: Lightning saves and restores these with its loop (a loader without them is "not
    # resumable" to it); the position itself is the loop's restored progress (skip_fn).
    def state_dict(self) -> dict:
        return {"epoch": self.epoch_fn()}

    def load_state_dict(self, state_dict: dict) -> None:
        pass
