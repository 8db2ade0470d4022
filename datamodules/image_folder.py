"""A user's own images in the common ``root/train/<class>/*.png|jpg`` layout.

``val/`` and ``test/`` folders are used when present; otherwise they are split off the
training images with the configured fractions (seeded, stratified).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from sklearn.model_selection import train_test_split

from datamodules.in_memory import InMemoryImageDataModule
from lightning_modules.config.errors import ConfigError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


class ImageFolderDataModule(InMemoryImageDataModule):
    name = "image_folder"

    def __init__(self, root: str | None = None, **kwargs):
        super().__init__(**kwargs)
        self.root = root

    def _scan(self, split_dir: Path) -> dict[str, list[Path]]:
        classes = {}
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            files = sorted(f for f in class_dir.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            if files:
                classes[class_dir.name] = files
        return classes

    def _read(self, files_by_class: dict[str, list[Path]], classes: list[str]):
        mode = "L" if self.channels == 1 else "RGB"
        images, labels = [], []
        for label, name in enumerate(classes):
            for f in files_by_class.get(name, []):
                try:
                    with Image.open(f) as im:
                        im = im.convert(mode).resize((self.image_size, self.image_size), Image.BILINEAR)
                        arr = np.asarray(im, dtype=np.uint8)  # stored 8-bit, decoded per batch
                except (UnidentifiedImageError, OSError) as err:
                    raise ConfigError(f"datamodule.root={self.root}: cannot read image {f} ({err})") from err
                images.append(arr.reshape(self.image_size, self.image_size, -1))
                labels.append(label)
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
        return x, np.asarray(labels, dtype=np.int64)

    def load_splits(self):
        if not self.root:
            raise ConfigError("datamodule.root is not set: allowed is a folder with train/<class>/ images")
        root = Path(self.root).expanduser()
        train_dir = root / "train"
        if not train_dir.is_dir():
            raise ConfigError(f"datamodule.root={self.root}: no train/ folder (expected train/<class>/*.png|jpg)")
        train = self._scan(train_dir)
        if not train:
            raise ConfigError(f"datamodule.root={self.root}: train/ holds no class folder with images")
        classes = sorted(train)
        held = {s: self._scan(root / s) for s in ("val", "test") if (root / s).is_dir()}
        for split, by_class in held.items():
            unknown = sorted(set(by_class) - set(train))
            if unknown:
                raise ConfigError(f"datamodule.root={self.root}: {split}/ has classes not in train/: {unknown}")
        train_x, train_y = self._read(train, classes)
        splits = {"train": (train_x, train_y)}
        n_total = len(train_y)
        for split, fraction in (("val", self.val_fraction), ("test", self.test_fraction)):
            if split in held:
                splits[split] = self._read(held[split], classes)
                continue
            # No folder for this split: carve it from what is left of train, stratified.
            x, y = splits["train"]
            n_hold = max(len(classes), round(fraction * n_total))
            if n_hold >= len(y):
                raise ConfigError(f"datamodule.root={self.root}: too few training images to split off {split}/")
            keep, hold = train_test_split(np.arange(len(y)), test_size=n_hold, stratify=y, random_state=self.split_seed)
            splits["train"], splits[split] = (x[keep], y[keep]), (x[hold], y[hold])
        return splits, tuple(classes)
