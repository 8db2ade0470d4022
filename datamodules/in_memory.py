"""In-memory image DataModule: the shared splitting, label-fraction and batching logic.

Small datasets live as one tensor; each batch is a single index into it, so loading costs
next to nothing. Subclasses only say how to read their images and labels (``load``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import train_test_split

from datamodules.augment import BatchAugment
from datamodules.base import PretuneDataModule
from datamodules.spec import ImageSpec
from lightning_modules.config.errors import ConfigError
from lightning_modules.config.schema import check, check_together


class BatchLoader:
    """Iterates over dict batches of in-memory tensors.

    The shuffle order depends only on ``seed`` and the epoch number, so a run resumed at
    epoch k sees exactly the batches an uninterrupted run sees. ``num_batches`` fixes the
    length of an epoch: a small labeled set is then reshuffled and repeated within it, so
    runs with different label fractions get the same number of steps per epoch.

    Under DDP (``world`` > 1) ``batch_size`` is per rank, as in Lightning: the order is drawn for
    global batches of ``batch_size * world`` (the same on every rank, from the same seed) and rank
    ``rank`` takes its contiguous slice of each. So B per rank on W ranks sees, step by step, exactly
    the images that batch W*B sees on one process. (Not a torch DataLoader: Lightning injects no
    DistributedSampler here, this is its replacement.)
    """

    def __init__(
        self,
        tensors: dict[str, torch.Tensor],
        batch_size: int,
        shuffle: bool,
        drop_last: bool,
        seed: int = 0,
        epoch_fn=None,
        num_batches: int | None = None,
        rank: int = 0,
        world: int = 1,
    ):
        self.tensors, self.batch_size = tensors, batch_size
        self.rank, self.world = rank, world
        self.global_batch = global_batch = batch_size * world
        self.shuffle, self.drop_last, self.seed = shuffle, drop_last, seed
        self.epoch_fn = epoch_fn or (lambda: 0)
        self.n = len(next(iter(tensors.values())))
        # Where each global batch starts in the order; an epoch of num_batches repeats this pass.
        self.starts = list(range(0, self.n - global_batch + 1 if drop_last else self.n, global_batch))
        if world > 1 and len(self.starts) > 1 and self.n - self.starts[-1] < world:
            # A last eval batch too small to give every rank an example joins the one before: every rank then
            # runs the same number of batches (collectives stay matched), none of them empty.
            self.starts.pop()
        self.per_pass = len(self.starts)
        if self.per_pass == 0:  # one process checks batch_size in setup(); the global batch is known only here
            raise ConfigError(
                f"datamodule.batch_size={batch_size} on {world} processes is a global batch of {global_batch},"
                f" larger than the {self.n} training examples; allowed is at most {self.n // world} per process"
            )
        self.num_batches = num_batches or self.per_pass

    def __len__(self) -> int:
        return self.num_batches

    def _order(self, repeat: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        gen = torch.Generator().manual_seed((self.seed * 100_003 + self.epoch_fn()) * 1_009 + repeat)
        return torch.randperm(self.n, generator=gen)

    def __iter__(self):
        for i in range(self.num_batches):
            repeat, j = divmod(i, self.per_pass)
            if j == 0:
                order = self._order(repeat)
            start = self.starts[j]
            # The last eval batch runs to the end (it may have absorbed a small remainder).
            end = self.n if not self.drop_last and j + 1 == self.per_pass else start + self.global_batch
            # Near-equal contiguous slices: B each for a full batch; a short last eval batch splits evenly.
            global_idx = order[start:end]
            yield self.take(torch.tensor_split(global_idx, self.world)[self.rank], global_idx)

    def take(self, idx: torch.Tensor, global_idx: torch.Tensor) -> dict:
        """The batch of rows ``idx``: this rank's share of the global batch ``global_idx`` (a subclass may
        shape the batch by the global one, e.g. pad text to its longest example)."""
        return {k: v[idx] for k, v in self.tensors.items()}


def label_subset(y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a stratified, seeded ``fraction`` of the labels ``y`` (at least one per class)."""
    n_classes = len(np.unique(y))
    keep = max(n_classes, round(fraction * len(y)))
    if keep > len(y) - n_classes:  # (nearly) all: the rest could not hold one of each class to split off
        return np.arange(len(y))
    idx, _ = train_test_split(np.arange(len(y)), train_size=keep, stratify=y, random_state=seed)
    return np.sort(idx)


class InMemoryImageDataModule(PretuneDataModule):
    """Seeded stratified train/val/test split, optional label fraction, batch augmentation.

    ``labeled=False`` (pre-training) serves the whole training split as images only;
    ``labeled=True`` (fine-tuning) serves ``label_fraction`` of it with labels.
    """

    name = "images"

    def __init__(
        self,
        batch_size: int = 64,
        eval_batch_size: int = 256,
        image_size: int = 32,
        channels: int = 1,
        label_fraction: float = 1.0,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        split_seed: int = 0,
        label_seed: int = 0,
        labeled: bool = True,
        augment: dict | None = None,
        train_batches_per_epoch: int | None = None,
    ):
        super().__init__()
        self.batch_size = check("datamodule.batch_size", batch_size)
        self.eval_batch_size = check("datamodule.eval_batch_size", eval_batch_size)
        self.image_size = check("datamodule.image_size", image_size)
        self.channels = check("datamodule.channels", channels)
        self.label_fraction = float(check("datamodule.label_fraction", label_fraction))
        self.val_fraction = check("datamodule.val_fraction", val_fraction)
        self.test_fraction = check("datamodule.test_fraction", test_fraction)
        check_together({"datamodule.val_fraction": val_fraction, "datamodule.test_fraction": test_fraction})
        self.split_seed = check("datamodule.split_seed", split_seed)
        self.label_seed, self.labeled = check("datamodule.label_seed", label_seed), labeled
        check("datamodule.train_batches_per_epoch", train_batches_per_epoch)  # null: one pass over the data
        self.train_batches_per_epoch = train_batches_per_epoch
        self.augment = BatchAugment.from_config("datamodule.augment", augment)
        self.splits: dict[str, dict[str, torch.Tensor]] = {}
        self.spec: ImageSpec | None = None

    # --- what a subclass provides -------------------------------------------------------
    def load(self) -> tuple[torch.Tensor, np.ndarray, tuple[str, ...]]:
        """Return images (N, C, H, W) float in [0, 1], integer labels (N,), and class names."""
        raise NotImplementedError

    def load_splits(self):
        """Return {"train"|"val"|"test": (images, labels)} and class names.

        The default splits ``load()`` with a seeded stratified split; a source with its own
        split folders overrides this.
        """
        images, labels, classes = self.load()
        idx = np.arange(len(labels))
        held = self.val_fraction + self.test_fraction
        try:
            train_idx, rest = train_test_split(idx, test_size=held, stratify=labels, random_state=self.split_seed)
            val_idx, test_idx = train_test_split(
                rest, test_size=self.test_fraction / held, stratify=labels[rest], random_state=self.split_seed
            )
        except ValueError as err:  # a split too small to hold every class (scikit-learn says which)
            raise ConfigError(
                f"datamodule.val_fraction={self.val_fraction}, datamodule.test_fraction={self.test_fraction}:"
                f" each split of the {len(labels)} images needs an image of every class ({err})"
            ) from err
        return {
            s: (images[i], labels[i]) for s, i in (("train", train_idx), ("val", val_idx), ("test", test_idx))
        }, classes

    # --- shared logic -------------------------------------------------------------------
    def resize(self, images: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) as the config asks: ``channels`` (grey repeated to RGB, RGB averaged to grey),
        ``image_size``."""
        if images.shape[1] != self.channels:
            images = images.repeat(1, self.channels, 1, 1) if images.shape[1] == 1 else images.mean(1, keepdim=True)
        if images.shape[-1] == self.image_size and images.shape[-2] == self.image_size:
            return images
        return F.interpolate(
            images,
            size=(self.image_size, self.image_size),
            mode="bilinear",
            align_corners=False,
            antialias=True,
        )

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        splits, classes = self.load_splits()
        train_x, train_y = splits["train"]
        # Normalise with statistics of all training images (labeled or not), shared by every split and
        # by both stages, so a fine-tune sees inputs on the scale its backbone was pre-trained on.
        mean, std = train_x.mean(), train_x.std().clamp_min(1e-6)
        if self.labeled and self.label_fraction < 1:
            train_x, train_y = self._label_subset(train_x, train_y)
        splits["train"] = (train_x, train_y)
        for name, (x, y) in splits.items():
            batch = {"image": ((x - mean) / std).float().contiguous()}
            if self.labeled or name != "train":
                batch["label"] = torch.as_tensor(y, dtype=torch.long)
            self.splits[name] = batch
        n_train = len(train_y)
        if self.batch_size > n_train:
            what = "labeled training examples" if self.labeled else "training images"
            raise ConfigError(
                f"datamodule.batch_size={self.batch_size} is larger than the {n_train} {what}"
                f" (label_fraction={self.label_fraction}); allowed is at most {n_train}"
            )
        self.spec = ImageSpec(self.channels, self.image_size, len(classes), tuple(classes))

    def _label_subset(self, x: torch.Tensor, y: np.ndarray):
        """Keep a stratified, seeded ``label_fraction`` of the training labels (at least one per class)."""
        idx = label_subset(y, self.label_fraction, self.label_seed)
        return x[idx], y[idx]

    def train_dataloader(self):
        return BatchLoader(
            self.splits["train"],
            self.batch_size,
            shuffle=True,
            drop_last=True,
            seed=self.label_seed,
            epoch_fn=self.epoch,
            num_batches=self.train_batches_per_epoch,
            **self.shard(),
        )

    def eval_loader(self, split: str, batch_size: int | None = None, sharded: bool = True):
        """A split in order; ``sharded=False``: all of it on this process (e.g. the forgetting probe)."""
        shard = self.shard() if sharded else {}
        return BatchLoader(self.splits[split], batch_size or self.eval_batch_size, False, False, **shard)

    def val_dataloader(self):
        return self.eval_loader("val")

    def test_dataloader(self):
        return self.eval_loader("test")

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        # Augment training batches only, on whatever device they landed on.
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.training and not self.augment.is_identity:
            batch = dict(batch, image=self.augment(batch["image"]))
        return batch
