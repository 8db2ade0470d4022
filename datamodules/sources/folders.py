"""Image files without torch: which files a folder holds and how it splits. The in-memory and streaming paths and
``scripts/prepare_data.py`` share these, so they agree on the split; the preparation command imports nothing
heavier than numpy and scikit-learn from here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from lightning_modules.core.errors import ConfigError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def _scan(where: str, split_dir: Path, require_images: bool) -> dict[str, list[Path]]:
    classes, empty = {}, []
    for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(f for f in class_dir.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if files:
            classes[class_dir.name] = files
        else:
            empty.append(class_dir.name)
    if require_images and classes and empty:  # a class without examples would silently shift the labels
        raise ConfigError(
            f"{where}: class folder {split_dir.name}/{empty[0]}/ holds no images"
            f" ({', '.join(sorted(IMAGE_SUFFIXES))}); add images or remove the folder"
        )
    return classes


def _flat(by_class: dict[str, list[Path]], classes: list[str]) -> tuple[np.ndarray, np.ndarray]:
    paths = [str(f) for name in classes for f in by_class.get(name, [])]
    labels = [label for label, name in enumerate(classes) for _ in by_class.get(name, [])]
    return np.asarray(paths, dtype=object), np.asarray(labels, dtype=np.int64)


def folder_splits(root, val_fraction: float, test_fraction: float, split_seed: int, key: str = "datamodule.root"):
    """{"train"|"val"|"test": (paths, labels)} and the class names of ``root/train/<class>/*``: ``val/`` and
    ``test/`` folders when present, else carved off train (seeded, stratified). The in-memory path, the
    streaming path and ``scripts/prepare_data.py`` all split a folder with this. ``key``: how errors name root."""
    if not root:
        raise ConfigError(f"{key} is not set: allowed is a folder with train/<class>/ images")
    where = f"{key}={root}"
    folder = Path(root).expanduser()
    train_dir = folder / "train"
    if not train_dir.is_dir():
        raise ConfigError(f"{where}: no train/ folder (expected train/<class>/*.png|jpg)")
    train = _scan(where, train_dir, require_images=True)
    if not train:
        raise ConfigError(f"{where}: train/ holds no class folder with images")
    classes = sorted(train)
    held = {s: _scan(where, folder / s, require_images=False) for s in ("val", "test") if (folder / s).is_dir()}
    for split, by_class in held.items():
        unknown = sorted(set(by_class) - set(train))
        if unknown:
            raise ConfigError(f"{where}: {split}/ has classes not in train/: {unknown}")
    files = {"train": _flat(train, classes)}
    n_total = len(files["train"][1])
    for split, fraction in (("val", val_fraction), ("test", test_fraction)):
        if split in held:
            files[split] = _flat(held[split], classes)
            continue
        # No folder for this split: carve it from what is left of train, stratified.
        x, y = files["train"]
        n_hold = max(len(classes), round(fraction * n_total))
        if n_hold >= len(y):
            raise ConfigError(f"{where}: too few training images to split off {split}/")
        keep, hold = train_test_split(np.arange(len(y)), test_size=n_hold, stratify=y, random_state=split_seed)
        files["train"], files[split] = (x[keep], y[keep]), (x[hold], y[hold])
    return files, tuple(classes)
