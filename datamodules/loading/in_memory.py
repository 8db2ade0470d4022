"""In-memory image DataModule: the shared splitting, label-fraction, storage and batching logic.

Small datasets live as one tensor per split; each batch is a single index into it, so loading costs next to
nothing. Subclasses only say how to read their images and labels (``load``).

Storage. Images from an 8-bit source (digits 0..16, MNIST and image files 0..255) are kept as ``uint8`` at the
resolution they were read at, a quarter of float32's memory (digits at 8x8: a 64th of 32x32 float32), and every
batch is decoded when it is taken: ``/ pixel_max``, resized to ``image_size`` (bilinear, antialiased), normalised
with the training split's mean and std. Those are the operations the float32 path applied to the whole split at
set-up, per image and elementwise, so the decoded batches are bit-for-bit the images that path held (tested on
digits, MNIST-5k and an image folder).

Placement. On an accelerator the stored splits go onto the device once (``place``), when they fit
``datamodule.device_budget`` (a fraction of its memory): batches are then indexed, decoded and augmented there
and nothing crosses the bus during training. Above the budget they stay in host memory and each batch is gathered
into pinned memory and copied with ``non_blocking=True`` (still as uint8), decoded on the device. On the CPU the
splits stay where they are: the device path and the CPU path are the same code.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import train_test_split

from datamodules.base import PretuneDataModule
from datamodules.spec import ImageSpec
from datamodules.transforms.augment import BatchAugment
from datamodules.transforms.images import image_preprocessing
from datamodules.transforms.recipe import eval_crop, resolve
from lightning_modules.backbones.base import FEATURES
from lightning_modules.config.rules import check
from lightning_modules.config.rules.datamodule import check_split_fractions
from lightning_modules.core.errors import ConfigError

# Mean and std of the training pixels are computed over the whole decoded split at once when it holds at most
# this many values (1 GiB as float32): exactly as the float32 path did. Larger splits are reduced in chunks in
# float64 instead, never holding the float32 copy whose memory uint8 storage saves.
EXACT_STATS_VALUES = 2**28


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

    Where the batches come from and go: ``tensors`` may live on an accelerator (indexed there; the order is
    drawn on the CPU, as everywhere, and copied over once a pass) or on the CPU; with ``device`` set to an
    accelerator, CPU tensors are gathered into pinned memory and copied without blocking. ``transform`` (e.g.
    the datamodule's ``decode``) is applied to each batch where it landed. Nothing here waits for the device.
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
        transform=None,
        device: torch.device | str | None = None,
        skip_fn=None,
    ):
        self.tensors, self.batch_size = tensors, batch_size
        self.rank, self.world = rank, world
        self.global_batch = global_batch = batch_size * world
        self.shuffle, self.drop_last, self.seed = shuffle, drop_last, seed
        self.epoch_fn = epoch_fn or (lambda: 0)
        self.transform, self.skip_fn = transform, skip_fn
        first = next(iter(tensors.values()))
        self.n, self.store = len(first), first.device
        self.device = self.store if device is None else torch.device(device)
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
            return torch.arange(self.n, device=self.store)
        gen = torch.Generator().manual_seed((self.seed * 100_003 + self.epoch_fn()) * 1_009 + repeat)
        order = torch.randperm(self.n, generator=gen)  # on the CPU: the same order whatever the device
        if self.store.type != "cpu":  # one copy a pass, from pinned memory: the host does not wait
            order = order.pin_memory().to(self.store, non_blocking=True)
        return order

    # Lightning saves and restores these with its loop; the position itself is the loop's restored progress
    # (skip_fn): the loader is one batch ahead of training when a checkpoint is taken (Lightning prefetches).
    def state_dict(self) -> dict:
        return {"epoch": self.epoch_fn()}

    def load_state_dict(self, state_dict: dict) -> None:
        pass

    def __iter__(self):
        skip = self.skip_fn() if self.skip_fn is not None else 0
        order = None
        for i in range(skip if 0 < skip < self.num_batches else 0, self.num_batches):
            repeat, j = divmod(i, self.per_pass)
            if j == 0 or order is None:
                order = self._order(repeat)
            start = self.starts[j]
            # The last eval batch runs to the end (it may have absorbed a small remainder).
            end = self.n if not self.drop_last and j + 1 == self.per_pass else start + self.global_batch
            # Near-equal contiguous slices: B each for a full batch; a short last eval batch splits evenly.
            global_idx = order[start:end]
            batch = self.take(torch.tensor_split(global_idx, self.world)[self.rank], global_idx)
            yield self.transform(batch) if self.transform is not None else batch

    def take(self, idx: torch.Tensor, global_idx: torch.Tensor) -> dict:
        """The batch of rows ``idx``: this rank's share of the global batch ``global_idx`` (a subclass may
        shape the batch by the global one, e.g. pad text to its longest example), where batches go."""
        if self.store == self.device or self.device.type == "cpu":
            return {k: v.index_select(0, idx) for k, v in self.tensors.items()}
        batch = {}  # host-resident data for an accelerator: gather into pinned memory, copy without waiting
        for k, v in self.tensors.items():
            pinned = torch.empty((len(idx), *v.shape[1:]), dtype=v.dtype, pin_memory=True)
            torch.index_select(v, 0, idx, out=pinned)
            batch[k] = pinned.to(self.device, non_blocking=True)
        return batch


def label_subset(y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a stratified, seeded ``fraction`` of the labels ``y`` (at least one per class)."""
    n_classes = len(np.unique(y))
    keep = max(n_classes, round(fraction * len(y)))
    if keep > len(y) - n_classes:  # (nearly) all: the rest could not hold one of each class to split off
        return np.arange(len(y))
    idx, _ = train_test_split(np.arange(len(y)), train_size=keep, stratify=y, random_state=seed)
    return np.sort(idx)


def at_most(tensors: dict[str, torch.Tensor], limit: int | None, seed: int) -> dict[str, torch.Tensor]:
    """Labeled examples (``tensors`` with a ``label``), cut to a stratified, seeded subset of ``limit`` when there are
    more (None: all)."""
    labels = tensors["label"]
    if limit is None or limit >= len(labels):
        return tensors
    keep = torch.as_tensor(label_subset(labels.cpu().numpy(), limit / len(labels), seed))
    return {k: v.index_select(0, keep.to(v.device)) for k, v in tensors.items()}


def as_stored(batch: dict) -> dict:
    """Examples that are already what the model reads (nothing to decode)."""
    return batch


class InMemoryImageDataModule(PretuneDataModule):
    """Seeded stratified train/val/test split, optional label fraction, batch augmentation.

    ``labeled=False`` (pre-training) serves the whole training split as images only;
    ``labeled=True`` (fine-tuning) serves ``label_fraction`` of it with labels.

    ``augment`` is the training recipe and ``eval_crop_pct`` the evaluation crop (``transforms/recipe.py``), the
    same keys whichever path the data take; held in memory, every op of the recipe is a whole-batch tensor op.
    """

    name = "images"
    pixel_max = 255  # the largest value of the source's 8-bit pixels (digits: 16)
    crops_eval_at_read = False  # True: evaluation images are stored centre-cropped already (read from files)
    # Why an op with no whole-batch entry (torchvision's policies) is refused here, in the line that says so.
    held_in_memory = "is applied per image by streaming workers, and these images are held in memory"
    # How a stored image reaches image_size: decode() resizes whole images (bilinear, squares stay squares).
    eval_interpolation = "bilinear"

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
        eval_crop_pct: float | None = None,
        train_batches_per_epoch: int | None = None,
        device_budget: float = 0.25,
    ):
        super().__init__()
        self.batch_size = check("datamodule.batch_size", batch_size)
        self.eval_batch_size = check("datamodule.eval_batch_size", eval_batch_size)
        self.image_size = check("datamodule.image_size", image_size)
        self.channels = check("datamodule.channels", channels)
        self.label_fraction = float(check("datamodule.label_fraction", label_fraction))
        self.val_fraction, self.test_fraction = check_split_fractions(val_fraction, test_fraction)
        self.split_seed = check("datamodule.split_seed", split_seed)
        self.label_seed, self.labeled = check("datamodule.label_seed", label_seed), labeled
        check("datamodule.train_batches_per_epoch", train_batches_per_epoch)  # null: one pass over the data
        self.train_batches_per_epoch = train_batches_per_epoch
        self.device_budget = float(check("datamodule.device_budget", device_budget))
        self.augment_config, self.eval_crop_config = augment, eval_crop_pct
        self.resolve_recipe()  # its values checked now; resolved again in setup, at the final image size
        # The stored splits: {"image": uint8 (N, C, h, w) at the size read, "label": long (N,)}; see decode().
        self.splits: dict[str, dict[str, torch.Tensor]] = {}
        self.train_labels: torch.Tensor | None = None  # all training labels, even unserved (labeled_examples)
        self.mean = self.std = None  # of the decoded training pixels, 0-dim float32, on the splits' device
        self.placement = "cpu"  # where the splits live: cpu, device (an accelerator), or pinned (copied per batch)
        self.target = torch.device("cpu")  # where batches go
        self.spec: ImageSpec | None = None
        # Normalisation per channel; None: the statistics of the training images (use_backbone may set both).
        self.norm_mean: list[float] | None = None
        self.norm_std: list[float] | None = None

    def use_backbone(self, backbone) -> None:
        """Weights trained elsewhere expect images as they were trained on (``backbone.preprocessing``): their
        size (images are loaded at it) and their mean/std. Nothing for weights trained on this data."""
        pre = getattr(backbone, "preprocessing", None) or {}
        if pre.get("input_size"):
            self.image_size = check("datamodule.image_size", int(pre["input_size"]))
        self.norm_mean, self.norm_std = pre.get("mean"), pre.get("std")

    # --- the recipe ------------------------------------------------------------------------
    def resolve_recipe(self) -> None:
        """The training recipe and evaluation crop at ``image_size`` (``use_backbone`` may change it), and the
        machinery that applies the recipe on this path (``batch_augment``)."""
        self.recipe = resolve("datamodule.augment", self.augment_config, self.image_size)
        self.eval_crop = eval_crop(self.eval_crop_config, self.augment_config, self.image_size)
        self.augment = self.batch_augment()

    def batch_augment(self) -> BatchAugment:
        """Held in memory: every op of the recipe, a whole batch at a time."""
        return BatchAugment.from_recipe(self.recipe, "datamodule.augment", self.held_in_memory)

    def describe(self) -> dict:
        """For the run record: the recipe as resolved, and the evaluation crop."""
        return {"augment": self.recipe.record(), "eval_crop_pct": self.eval_crop}

    # --- what a subclass provides -------------------------------------------------------
    def load(self) -> tuple[torch.Tensor, np.ndarray, tuple[str, ...]]:
        """Return images (N, C, h, w) as uint8 in 0..``pixel_max`` (or float in [0, 1] for a source that is
        not 8-bit) at any size, integer labels (N,), and class names. ``decode`` resizes them per batch."""
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
    def resize(self, images: torch.Tensor, crop_pct: float = 1.0) -> torch.Tensor:
        """Images (N, C, H, W) as the config asks: ``channels`` (grey repeated to RGB, RGB averaged to grey),
        ``image_size``; with ``crop_pct`` < 1, resized to ``image_size / crop_pct`` and the centre kept."""
        if images.shape[1] != self.channels:
            images = images.repeat(1, self.channels, 1, 1) if images.shape[1] == 1 else images.mean(1, keepdim=True)
        size = self.image_size if crop_pct == 1.0 else round(self.image_size / crop_pct)
        if images.shape[-1] != size or images.shape[-2] != size:
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        if size == self.image_size:
            return images
        start = (size - self.image_size) // 2
        return images[..., start : start + self.image_size, start : start + self.image_size]

    def to_unit(self, images: torch.Tensor, crop_pct: float = 1.0) -> torch.Tensor:
        """Stored images as float32 in [0, 1] at ``image_size``, before normalisation."""
        x = images.float() / self.pixel_max if images.dtype == torch.uint8 else images.float()
        return self.resize(x, crop_pct)

    def decode(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A training batch as the model sees it: images in [0, 1], resized, normalised with the training
        statistics (the recipe's augmentation follows on the device: ``on_after_batch_transfer``)."""
        return dict(batch, image=(self.to_unit(batch["image"]) - self.mean) / self.std)

    def decode_eval(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """An evaluation batch: as ``decode``, with the evaluation crop (``eval_crop_pct``) unless the images were
        stored cropped."""
        crop = 1.0 if self.crops_eval_at_read else self.eval_crop
        return dict(batch, image=(self.to_unit(batch["image"], crop) - self.mean) / self.std)

    def decoder(self, split: str):
        return self.decode if split == "train" else self.decode_eval

    def eval_preprocessing(self) -> dict:
        """An image file as evaluation sees a stored image: resized to ``image_size / eval_crop_pct`` (the centre
        square of a non-square file), the centre ``image_size`` kept, scaled to [0, 1], normalised with this run's
        mean and std (the training images', one value for all channels; or the weights' own, per channel). A source
        of arrays on another scale (digits: 0..16) is read from 8-bit files as 0..255."""
        return image_preprocessing(
            self.channels, self.image_size, self.mean, self.std, self.eval_interpolation, self.eval_crop
        )

    def images(self, split: str) -> torch.Tensor:
        """A whole split decoded (for inspection and tests; training decodes batch by batch)."""
        return self.decoder(split)(self.splits[split])["image"]

    def stored_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for split in self.splits.values() for t in split.values())

    def _statistics(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of all decoded training pixels (before normalisation), as 0-dim float32 tensors."""
        values = len(images) * self.channels * self.image_size**2
        if values <= EXACT_STATS_VALUES:
            x = self.to_unit(images)
            return x.mean(), x.std().clamp_min(1e-6)
        total = squares = torch.zeros((), dtype=torch.float64)
        for chunk in images.split(max(1, EXACT_STATS_VALUES // (values // len(images)))):
            x = self.to_unit(chunk).double()
            total, squares = total + x.sum(), squares + (x * x).sum()
        mean = total / values
        std = ((squares - values * mean**2) / (values - 1)).clamp_min(0).sqrt()
        return mean.float(), std.float().clamp_min(1e-6)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        self.resolve_recipe()
        splits, classes = self.load_splits()
        train_x, train_y = splits["train"]
        # Normalise with statistics of all training images (labeled or not), shared by every split and
        # by both stages, so a fine-tune sees inputs on the scale its backbone was pre-trained on; or with
        # the mean/std the backbone's weights were trained with (use_backbone), per channel.
        if self.norm_mean is None or self.norm_std is None:
            self.mean, self.std = self._statistics(train_x)
        if self.norm_mean is not None:
            self.mean = torch.tensor(self.norm_mean, dtype=torch.float32).view(-1, 1, 1)
        if self.norm_std is not None:
            self.std = torch.tensor(self.norm_std, dtype=torch.float32).view(-1, 1, 1)
        if self.labeled and self.label_fraction < 1:
            train_x, train_y = self._label_subset(train_x, train_y)
        splits["train"] = (train_x, train_y)
        # Kept for the feature monitor even where training is served the images alone (labeled_examples).
        self.train_labels = torch.as_tensor(train_y, dtype=torch.long)
        for name, (x, y) in splits.items():
            batch = {"image": x.contiguous()}
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
        stats = tuple(self.mean.flatten().tolist()), tuple(self.std.flatten().tolist())
        self.augment.set_pixel_stats(*stats)  # the photo ops act on pixels
        self.spec = ImageSpec(self.channels, self.image_size, len(classes), tuple(classes), *stats)

    def _label_subset(self, x: torch.Tensor, y: np.ndarray):
        """Keep a stratified, seeded ``label_fraction`` of the training labels (at least one per class)."""
        idx = label_subset(y, self.label_fraction, self.label_seed)
        return x[idx], y[idx]

    def labeled_examples(self, split: str, limit: int | None = None) -> tuple[dict, object] | None:
        """The ``split``'s images with their labels, as stored (at most ``limit`` of them: a stratified subset, seeded
        by ``split_seed``, so the same for every run on this data), and ``decode``, which makes a batch of them what
        the model reads (never augmented). For the feature monitor (callbacks/feature_monitor.py): pre-training is
        served its training images unlabeled, and their labels are kept for this alone."""
        if split not in self.splits:  # streamed (image_folder above its memory budget): nothing held to read
            return None
        tensors = {k: v for k, v in self.splits[split].items() if k in ("image", "label")}
        if "label" not in tensors:
            if split != "train":
                return None
            tensors["label"] = self.train_labels.to(tensors["image"].device)
        return at_most(tensors, limit, self.split_seed), self.decode

    def place(self, device: torch.device | str) -> str:
        """Put the stored splits where batches for ``device`` come from, once: on an accelerator if they fit
        ``device_budget`` of its memory (``device``), else in host memory, copied per batch (``pinned``); on the
        CPU nothing moves (``cpu``). Returns the placement."""
        device = torch.device(device)
        if device.type != "cuda" or self.placement != "cpu":  # (other accelerators: Lightning copies each batch)
            return self.placement
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        size = self.stored_bytes()
        if size <= self.device_budget * torch.cuda.get_device_properties(device).total_memory:
            self.splits = {s: {k: v.to(device) for k, v in split.items()} for s, split in self.splits.items()}
            self.placement = "device"
        else:
            self.placement = "pinned"
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        self.target = device
        where = f"on {device}" if self.placement == "device" else f"in host memory, copied to {device} per batch"
        _info(f"data: the splits ({size / 2**20:.1f} MiB as stored) are {where} (datamodule.device_budget)")
        return self.placement

    def batch_device(self) -> dict:
        """Place the splits for the trainer's device (once); the loader argument saying where batches go."""
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            self.place(trainer.strategy.root_device)
        return {"device": self.target} if self.placement == "pinned" else {}

    def train_dataloader(self):
        return BatchLoader(
            self.splits["train"],
            self.batch_size,
            shuffle=True,
            drop_last=True,
            seed=self.label_seed,
            epoch_fn=self.epoch,
            num_batches=self.train_batches_per_epoch,
            transform=self.decode,
            skip_fn=self.batches_trained,
            **self.batch_device(),
            **self.shard(),
        )

    def eval_loader(self, split: str, batch_size: int | None = None, sharded: bool = True):
        """A split in order; ``sharded=False``: all of it on this process (e.g. the forgetting probe)."""
        shard = self.shard() if sharded else {}
        size = batch_size or self.eval_batch_size
        return BatchLoader(
            self.splits[split], size, False, False, transform=self.decoder(split), **self.batch_device(), **shard
        )

    def val_dataloader(self):
        return self.eval_loader("val")

    def test_dataloader(self):
        return self.eval_loader("test")

    def can_cache_features(self) -> bool:
        return self.augment.is_identity  # augmented training images would need new features at every step

    def cache_features(self, encode) -> None:
        """Store each example's features next to it (``features``): ``encode(split, identity, batches)`` returns
        them for the split's batches in order (callbacks/feature_cache.py); every batch then carries them.
        ``identity``: the tensors that determine what the backbone sees, the stored images and how they are
        decoded (size, normalisation), so features are reused only for the same decoded inputs."""
        decoding = [torch.tensor([self.image_size, self.pixel_max]), self.mean.cpu(), self.std.cpu()]
        for name, tensors in self.splits.items():
            cropped = name != "train" and self.eval_crop != 1.0 and not self.crops_eval_at_read
            identity = [tensors["image"], *decoding, *([torch.tensor([self.eval_crop])] if cropped else [])]
            batches = BatchLoader(dict(tensors), self.eval_batch_size, False, False, transform=self.decoder(name))
            tensors[FEATURES] = encode(name, identity, batches)  # in place: the loaders made already see it

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        # Augment training batches only, on whatever device they landed on.
        trainer = getattr(self, "trainer", None)
        if trainer is not None and trainer.training and not self.augment.is_identity:
            batch = dict(batch, image=self.augment(batch["image"]))
        return batch


def _info(message: str) -> None:
    from pytorch_lightning.utilities import rank_zero_info

    rank_zero_info(message)
