"""Streaming loaders: images decoded in DataLoader worker processes, batches in a reproducible order, a
training loader that resumes in the middle of an epoch, and one policy for unreadable samples.

- ``IndexedLoader`` serves a map-style dataset (files of a folder, or items of prepared shards read by index)
  in ``BatchLoader``'s order: seeded by (seed, epoch), rank ``r`` of ``W`` decoding only its contiguous slice
  of every global batch. So a streamed folder sees, step by step, the images the in-memory path sees, and
  under DDP each rank reads its own part of every epoch, the same global batches as one process.
- **Mid-epoch resume.** The training loader's position (``state_dict``) travels in every checkpoint, through
  the datamodule's state (``TrainLoaderState``), and is handed back (``load_state_dict``) when a run resumes.
  Lightning fetches one batch ahead of the step it trains, so what a loader has handed out is not what was
  trained on: the position saved is the one after the batches the trainer had finished (``consumed``),
  recorded per batch as they are handed out (``Snapshots``).
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

from datamodules.in_memory import BatchLoader
from datamodules.transforms import load_sample, sample_key
from lightning_modules.config.errors import ConfigError

ON_BAD_SAMPLE = ("error", "skip")


class BadSamples:
    """What happens to a sample whose file cannot be decoded: one clear error, or dropped and counted."""

    def __init__(self, policy: str, where: str):
        if policy not in ON_BAD_SAMPLE:
            raise ConfigError(f"datamodule.on_bad_sample={policy!r} is invalid: allowed are 'error', 'skip'")
        self.policy, self.where = policy, where
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
                " datamodule.on_bad_sample=skip skips unreadable images and counts them"
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


class TrainLoaderState:
    """The training loader's position, kept in the checkpoint through the datamodule's own state.

    Lightning also saves a stateful training loader with its fit loop, but hands the state back only if the
    loader is made after the checkpoint is restored; pretune's schedulers ask for the loader's length first
    (``estimated_stepping_batches``), so it exists by then and the state would never be applied (litData
    #775). The datamodule's state is restored before anything asks for a loader."""

    def __init__(self):
        self.loader = None
        self.pending: dict | None = None

    def track(self, loader):
        self.loader = weakref.ref(loader)
        if self.pending is not None:
            loader.load_state_dict(self.pending)
            self.pending = None
        return loader

    def state_dict(self) -> dict:
        loader = self.loader() if self.loader is not None else None
        return {"train_loader": loader.state_dict()} if loader is not None else {}

    def load_state_dict(self, state: dict) -> None:
        self.pending = state.get("train_loader")


def stop_workers(iterator, loader: DataLoader) -> None:
    """Stop a DataLoader's worker processes now (torch has no public call for it)."""
    if loader._iterator is iterator:
        loader._iterator = None
    if hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()


class Snapshots:
    """A training loader's state after each batch it handed out this epoch; ``at_consumed`` is the state a
    checkpoint must hold: the one after the batches the trainer finished, not after what it prefetched."""

    def __init__(self, consumed: Callable[[], int | None] | None):
        self.consumed = consumed or (lambda: None)
        self.states: dict[int, object] = {}

    def reset(self) -> None:
        self.states = {}

    def record(self, handed_out: int, state) -> None:
        self.states[handed_out] = state
        self.states.pop(handed_out - 16, None)  # the trainer is never more than a batch or two behind

    def at_consumed(self, default):
        return self.states.get(self.consumed(), default)


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
    """The batch sampler: BatchLoader's order of indices for the epoch, each index with its transform seed;
    the batches a resumed epoch had finished are left out without being decoded."""

    def __init__(self, order: BatchLoader, seed: int, epoch_fn: Callable[[], int]):
        self.order, self.seed, self.epoch_fn = order, seed, epoch_fn
        self.resume: dict | None = None  # {"epoch": e, "batches": k} from a checkpoint
        self.epoch, self.first = 0, 0

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self):
        # Not a generator itself: the epoch and the first batch are fixed when the DataLoader asks for the
        # iterator, before any batch is drawn (IndexedLoader reads them then). torch asks twice.
        self.epoch = self.epoch_fn()
        resume = self.resume
        self.first = resume["batches"] if resume and resume["epoch"] == self.epoch else 0
        return self._batches(self.epoch, self.first)

    def _batches(self, epoch: int, first: int):
        self.resume = None  # applied once: the next epoch is whole
        for i, batch in enumerate(self.order):
            if i >= first:
                repeat = i // self.order.per_pass
                yield [(j, sample_key(self.seed, epoch, repeat, j)) for j in batch["index"].tolist()]


class IndexedLoader:
    """Batches of ``dataset`` decoded by ``num_workers`` worker processes, in BatchLoader's order; with
    ``consumed`` (the trainer's finished batches this epoch) it is resumable mid-epoch."""

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
        consumed: Callable[[], int] | None = None,
    ):
        epoch_fn = epoch_fn or (lambda: 0)
        index = {"index": torch.arange(len(dataset))}
        order = BatchLoader(index, batch_size, shuffle, drop_last, seed, epoch_fn, num_batches, rank, world)
        self.batches = _OrderedBatches(order, seed, epoch_fn)
        self.bad, self.snapshots = bad, Snapshots(consumed)
        self.loader = DataLoader(
            dataset,
            batch_sampler=self.batches,
            num_workers=num_workers,
            persistent_workers=persistent and num_workers > 0,
            pin_memory=pin_memory,
            prefetch_factor=2 if num_workers > 0 else None,
            generator=torch.Generator().manual_seed(seed),  # not the global stream: the loader leaves it alone
        )

    def __len__(self) -> int:
        return len(self.batches)

    def close(self) -> None:
        """Stop the worker processes (the datamodule's ``teardown`` does, at the end of fit and test)."""
        if self.loader._iterator is not None:
            stop_workers(self.loader._iterator, self.loader)

    def __iter__(self):
        iterator = iter(self.loader)  # the sampler's __iter__ runs here: it fixes this epoch's order and start
        epoch, handed_out = self.batches.epoch, self.batches.first
        self.snapshots.reset()
        try:
            for batch in iterator:
                handed_out += 1
                self.snapshots.record(handed_out, {"epoch": epoch, "batches": handed_out})
                batch = self.bad.screen(batch)
                if batch is not None:
                    yield batch
        except GeneratorExit:  # the consumer stopped early (a step limit): the workers serve the next epoch
            raise
        except BaseException:
            stop_workers(iterator, self.loader)
            raise

    def state_dict(self) -> dict:
        """Where this epoch stands (Lightning saves it with a checkpoint of a training loader)."""
        done = self.snapshots.consumed() or 0
        return dict(self.snapshots.at_consumed({"epoch": self.batches.epoch, "batches": done}))

    def load_state_dict(self, state: dict) -> None:
        self.batches.resume = dict(state)
