"""Splits, label fractions, batches as dicts, augmentation, and the user's image folders."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.sources.digits import DigitsDataModule
from datamodules.sources.image_folder import ImageFolderDataModule
from datamodules.sources.mnist5k import MNIST5kDataModule
from datamodules.transforms.augment import BatchAugment
from lightning_modules.core.errors import ConfigError


def _labels(dm, split="train"):
    return dm.splits[split]["label"].tolist()


def test_digits_split_is_fixed_and_stratified():
    a, b = DigitsDataModule(label_seed=0), DigitsDataModule(label_seed=5)
    a.setup(), b.setup()
    sizes = {s: len(a.splits[s]["image"]) for s in ("train", "val", "test")}
    assert sum(sizes.values()) == 1797 and sizes["val"] == sizes["test"] == 270
    assert torch.equal(a.images("test"), b.images("test"))  # seed never moves the test set
    assert a.images("train").shape[1:] == (1, 32, 32)
    assert a.spec.num_classes == 10 and a.spec.channels == 1


@pytest.mark.parametrize("fraction", [0.05, 0.2])
def test_label_fraction_keeps_a_stratified_seeded_subset(fraction):
    full = DigitsDataModule()
    full.setup()
    n_full = len(_labels(full))
    dm = DigitsDataModule(label_fraction=fraction, label_seed=3, batch_size=16)
    dm.setup()
    labels = _labels(dm)
    assert len(labels) == round(fraction * n_full)
    full_counts, counts = Counter(_labels(full)), Counter(labels)
    for cls, total in full_counts.items():  # every class in proportion, to within one example
        assert abs(counts[cls] - fraction * total) <= 1
    again = DigitsDataModule(label_fraction=fraction, label_seed=3, batch_size=16)
    again.setup()
    assert labels == _labels(again)
    other = DigitsDataModule(label_fraction=fraction, label_seed=4, batch_size=16)
    other.setup()
    assert not torch.equal(dm.splits["train"]["image"], other.splits["train"]["image"])


def test_pretraining_sees_all_training_images_without_labels():
    dm = DigitsDataModule(labeled=False, label_fraction=0.05)
    dm.setup()
    assert set(dm.splits["train"]) == {"image"} and len(dm.splits["train"]["image"]) == 1257
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, dict) and batch["image"].shape == (64, 1, 32, 32)


def test_loader_order_depends_on_seed_and_epoch_only():
    dm = DigitsDataModule()
    dm.setup()
    first = [b["label"] for b in dm.train_dataloader()]
    second = [b["label"] for b in dm.train_dataloader()]
    assert all(torch.equal(x, y) for x, y in zip(first, second, strict=True))
    assert len(first) == 1257 // 64  # drop_last: no ragged final batch in training


def test_mnist5k_reads_the_shipped_file():
    dm = MNIST5kDataModule(image_size=28)
    dm.setup()
    total = sum(len(dm.splits[s]["image"]) for s in ("train", "val", "test"))
    assert total == 5000 and dm.images("train").shape[1:] == (1, 28, 28)
    assert sorted(set(_labels(dm))) == list(range(10))


def test_batch_size_larger_than_the_labeled_set_is_refused():
    dm = DigitsDataModule(label_fraction=0.05, batch_size=128)
    with pytest.raises(ConfigError, match=r"datamodule.batch_size=128 is larger than the 63 labeled"):
        dm.setup()


def test_augmentation_keeps_shape_and_changes_pixels():
    x = torch.rand(8, 1, 32, 32)
    aug = BatchAugment(scale=(0.5, 1.0), rotate=20, translate=0.1, brightness=0.2, contrast=0.2, noise=0.05, erase=0.5)
    y = aug(x)
    assert y.shape == x.shape and not torch.equal(x, y)
    assert torch.equal(BatchAugment()(x), x)  # the default is the identity
    with pytest.raises(ValueError, match="augment.scale"):
        BatchAugment(scale=(0.0, 1.0))


def _write_images(root, split, classes, n=4, size=12, mode="RGB"):
    rng = np.random.default_rng(0)
    for cls in classes:
        folder = root / split / cls
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            shape = (size, size, 3) if mode == "RGB" else (size, size)
            Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(folder / f"{i}.png")


def test_image_folder_with_val_and_test(tmp_path):
    for split in ("train", "val", "test"):
        _write_images(tmp_path, split, ["cat", "dog"], n=6 if split == "train" else 3)
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=16, channels=3, batch_size=4)
    dm.setup()
    assert dm.spec.class_names == ("cat", "dog")
    assert dm.images("train").shape == (12, 3, 16, 16)
    assert len(dm.splits["val"]["image"]) == 6 and len(dm.splits["test"]["image"]) == 6


def test_image_folder_splits_train_when_val_test_absent(tmp_path):
    _write_images(tmp_path, "train", ["a", "b"], n=20)
    dm = ImageFolderDataModule(
        root=str(tmp_path), image_size=8, channels=1, batch_size=4, val_fraction=0.2, test_fraction=0.2
    )
    dm.setup()
    sizes = [len(dm.splits[s]["image"]) for s in ("train", "val", "test")]
    assert sum(sizes) == 40 and sizes[1] == sizes[2] == 8
    assert Counter(_labels(dm, "val")) == {0: 4, 1: 4}


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda root: None, "no train/ folder"),
        (lambda root: (root / "train" / "empty").mkdir(parents=True), "train/ holds no class folder"),
        (
            lambda root: (
                _write_images(root, "train", ["a"]),
                (root / "train" / "a" / "bad.png").write_text("x"),
            ),
            "cannot read image",
        ),
        (
            lambda root: (
                _write_images(root, "train", ["a", "b"]),
                _write_images(root, "val", ["a", "zebra"]),
            ),
            "val/ has classes not in train/: ['zebra']",
        ),
    ],
    ids=["missing", "empty", "unreadable", "unknown-class"],
)
def test_image_folder_errors_are_clear(tmp_path, make, needle):
    make(tmp_path)
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=8, batch_size=2)
    with pytest.raises(ConfigError, match="datamodule.root=" if needle != "cannot read image" else "datamodule.root"):
        dm.setup()
    with pytest.raises(ConfigError) as err:
        ImageFolderDataModule(root=str(tmp_path), image_size=8, batch_size=2).setup()
    assert needle in str(err.value)


def test_fixed_length_epochs_repeat_a_small_labeled_set():
    dm = DigitsDataModule(label_fraction=0.05, batch_size=16, train_batches_per_epoch=10)
    dm.setup()
    batches = list(dm.train_dataloader())
    assert len(batches) == 10 and all(len(b["label"]) == 16 for b in batches)
    seen = torch.cat([b["image"] for b in batches[:3]])  # one pass of 63 examples = 3 full batches
    assert len({tuple(row.flatten().tolist()) for row in seen}) == 48  # no repeats within a pass
    with pytest.raises(ConfigError, match="datamodule.train_batches_per_epoch=0 is out of range"):
        DigitsDataModule(train_batches_per_epoch=0)


# --- uint8 storage: the batches, losses and weights of the float32 path, bit for bit ------------------------


def _float32_path(images: torch.Tensor, pixel_max: int, size: int) -> torch.Tensor:
    """What the datamodules held before uint8 storage: float32 in [0, 1], the whole split resized at once."""
    x = torch.from_numpy(images.numpy().astype(np.float32) / np.float32(pixel_max))
    if x.shape[-1] != size:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x


@pytest.mark.parametrize("make", [DigitsDataModule, lambda **kw: MNIST5kDataModule(**kw)], ids=["digits", "mnist5k"])
def test_uint8_storage_decodes_to_the_float32_path_bit_for_bit(make):
    dm = make(batch_size=64, label_fraction=0.2)
    dm.setup()
    assert all(s["image"].dtype == torch.uint8 for s in dm.splits.values())
    source, *_ = dm.load()
    full = DigitsDataModule() if isinstance(dm, DigitsDataModule) else MNIST5kDataModule()
    splits, _ = full.load_splits()
    old_train = _float32_path(splits["train"][0], dm.pixel_max, 32)
    mean, std = old_train.mean(), old_train.std()  # over all training images, as before
    assert torch.equal(dm.mean, mean) and torch.equal(dm.std, std)
    for split in ("val", "test"):
        assert torch.equal(dm.images(split), (_float32_path(splits[split][0], dm.pixel_max, 32) - mean) / std)
    # Training batches, decoded one by one (resized per batch), equal rows of the split decoded at once.
    from datamodules.loading.in_memory import BatchLoader

    whole, stored = dm.images("train"), dm.splits["train"]["image"]
    tagged = {"image": stored, "i": torch.arange(len(stored))}
    for b in BatchLoader(tagged, 64, shuffle=True, drop_last=True, transform=dm.decode):
        assert torch.equal(b["image"], whole[b["i"]])
    assert source.dtype == torch.uint8 and stored.nbytes <= whole.nbytes / 4  # at most a quarter of float32


def test_image_folder_is_stored_as_uint8_and_decodes_as_before(tmp_path):
    _write_images(tmp_path, "train", ["a", "b"], n=10, size=12)
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=16, channels=3, batch_size=4)
    dm.setup()
    assert dm.splits["train"]["image"].dtype == torch.uint8
    splits, _ = dm.load_splits()
    old = {s: _float32_path(x, 255, 16) for s, (x, _) in splits.items()}  # PIL resized them to 16 at reading
    mean, std = old["train"].mean(), old["train"].std()
    for split in ("train", "val", "test"):
        assert torch.equal(dm.images(split), (old[split] - mean) / std)


class Float32Digits(DigitsDataModule):
    """The float32 path: the decoded splits held in memory, batches taken from them as they are."""

    def setup(self, stage=None):
        if not self.splits:
            super().setup(stage)
            own = {"train": DigitsDataModule.decode}  # evaluation splits: DigitsDataModule.decode_eval
            self.splits = {s: own.get(s, DigitsDataModule.decode_eval)(self, x) for s, x in self.splits.items()}

    def decode(self, batch):
        return batch

    decode_eval = decode


def test_a_run_on_uint8_storage_equals_the_float32_path_bit_for_bit(cfg_factory, tmp_path):
    from lightning_modules.runtime.run import run

    common = ["model=resnet_micro", "trainer.max_epochs=2", "trainer.limit_train_batches=3", "datamodule.batch_size=32"]
    new = run(cfg_factory("finetune", *common, name="uint8"))
    old = run(cfg_factory("finetune", *common, "datamodule._target_=tests.test_datamodules.Float32Digits", name="f32"))
    for key in ("train/loss", "val/loss", "val/acc", "test/acc"):
        assert new[key] == old[key], key
    a, b = (
        torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        for name in ("uint8", "f32")
    )
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_on_the_cpu_nothing_is_placed():
    dm = DigitsDataModule()
    dm.setup()
    before = dm.splits["train"]["image"]
    assert dm.place("cpu") == "cpu" and dm.splits["train"]["image"] is before
    assert dm.batch_device() == {}


def test_a_label_fraction_just_below_one_keeps_every_label():
    """Found by the config fuzz: 0.999 left one label to split off, fewer than the classes (scikit-learn refused)."""
    full, dm = DigitsDataModule(), DigitsDataModule(label_fraction=0.999)
    full.setup(), dm.setup()
    assert _labels(dm) == _labels(full)
