"""One image at a time, as streaming loaders need it: decode any file to the configured channels, then the
standard transforms (torchvision's), run in DataLoader worker processes.

- **Decoding** reads the whole file (a truncated JPEG fails here, not later) and converts every mode people
  have on disk (grayscale, RGBA, palette, CMYK, 16-bit) to ``L`` (channels=1) or ``RGB`` (channels=3).
- **Training**: the recipe's per-image ops (``recipe.py``): the random-resized crop from the file at its own
  resolution, the horizontal flip, and torchvision's RandAugment, TrivialAugment or AutoAugment; the rest of the
  recipe is applied per batch on the device. **Evaluation**: the shorter side resized to ``size / crop_pct``,
  then the centre ``size`` x ``size`` crop: the aspect ratio is kept, never squashed (every path alike).
- **Randomness per sample**: each image's transform draws from a generator seeded by (seed, epoch, pass,
  index), not from a worker's stream. Which worker decodes an image, how many workers there are, and whether
  the run was resumed mid-epoch then change nothing: the same image gets the same crop in the same epoch.
- The output is uint8 (C, size, size): a quarter of float32 through the worker queues and the host-to-device
  copy; normalisation happens on the device, per batch (``Normalize``).
"""

from __future__ import annotations

import hashlib
import random
from contextlib import contextmanager

import torch
from torchvision.transforms import v2

from datamodules.transforms.decode import decode
from datamodules.transforms.recipe import Recipe

# datamodule.augment.auto_augment -> torchvision's policy (defaults as in their papers' ImageNet settings)
AUTO_AUGMENT = {
    "randaugment": lambda: v2.RandAugment(num_ops=2, magnitude=9),
    "trivialaugment": v2.TrivialAugmentWide,
    "autoaugment": lambda: v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET),
}


def fit_channels(values: list[float], channels: int) -> list[float]:
    """Statistics for ``channels`` channels from RGB ones (prepared shards read as grayscale)."""
    if len(values) == channels:
        return list(values)
    return [sum(values) / len(values)] * channels


INTERPOLATIONS = {"bicubic": v2.InterpolationMode.BICUBIC, "bilinear": v2.InterpolationMode.BILINEAR}


def _centre(size: int, crop_pct: float, interpolation: str = "bicubic", crop_mode: str = "center") -> list:
    """Resize the shorter side to ``size / crop_pct``, keep the aspect ratio, take the centre square
    (``crop_mode=squash``: both sides to ``size / crop_pct``, the aspect ratio not kept)."""
    scaled = round(size / crop_pct)
    resize_to = scaled if crop_mode == "center" else (scaled, scaled)
    return [v2.Resize(resize_to, INTERPOLATIONS[interpolation], antialias=True), v2.CenterCrop(size)]


def eval_transform(size: int, crop_pct: float = 0.875, interpolation: str = "bicubic", crop_mode: str = "center"):
    """Evaluation on every path (and how the in-memory path reads its training images, at ``crop_pct=1``)."""
    return v2.Compose([*_centre(size, crop_pct, interpolation, crop_mode), v2.PILToTensor()])


def image_preprocessing(
    channels: int, size: int, mean, std, interpolation: str = "bicubic", crop_pct: float = 1.0, crop_mode="center"
) -> dict:
    """An image source's evaluation preprocessing as plain values (``eval_preprocessing``): an 8-bit image file
    decoded to ``channels``, resized and cropped to ``size`` as ``eval_transform`` does, scaled to [0, 1] and
    normalised with ``mean`` and ``std`` per channel (a source's single statistic repeated over its channels)."""
    as_list = lambda v: [float(x) for x in (v.flatten().tolist() if isinstance(v, torch.Tensor) else v)]  # noqa: E731
    return {
        "modality": "image",
        "channels": int(channels),
        "image_size": int(size),
        "interpolation": interpolation,
        "crop_pct": float(crop_pct),
        "crop_mode": crop_mode,
        "mean": fit_channels(as_list(mean), channels),
        "std": fit_channels(as_list(std), channels),
    }


def preprocessing_transform(pre: dict):
    """``eval_transform`` as a recorded preprocessing (``image_preprocessing``) asks for it: file to uint8."""
    return eval_transform(pre["image_size"], pre["crop_pct"], pre["interpolation"], pre.get("crop_mode", "center"))


def standardize(images: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 images (B, C, H, W) -> float, scaled to [0, 1] and normalised per channel: the in-memory sources'
    ``decode`` and torchvision's ``ToTensor`` + ``Normalize`` (what timm's transforms do), operation for operation."""
    mean_t = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    return (images.float() / 255 - mean_t) / std_t


def train_transform(size: int, recipe: Recipe):
    """The ops of ``recipe`` that the streaming workers apply to each image (``recipe.WORKER_OPS``): the random
    crop, taken from the file at its own resolution (without one, the evaluation resize: the shorter side to
    ``size``, the centre square), the horizontal flip and torchvision's policy. The other ops are the device's,
    per batch (``BatchAugment``), as in memory."""
    if recipe.scale == (1.0, 1.0) and recipe.ratio == (1.0, 1.0):
        crop = _centre(size, 1.0)
    else:
        crop = [v2.RandomResizedCrop(size, scale=recipe.scale, ratio=recipe.ratio, antialias=True)]
    steps = [
        *crop,
        *([v2.RandomHorizontalFlip()] if recipe.flip else []),
        *([AUTO_AUGMENT[recipe.auto_augment]()] if recipe.auto_augment else []),
        v2.PILToTensor(),
    ]
    return v2.Compose(steps)


def sample_key(seed: int, epoch: int, repeat: int, index: int) -> int:
    """A 63-bit seed for one sample's transform: a function of (seed, epoch, pass within the epoch, index)."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{repeat}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@contextmanager
def seeded(key: int):
    """Inside, torch's and Python's generators (torchvision and timm draw from them) start from ``key``;
    after, they are as before, so a loader running in the training process leaves its streams alone."""
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    torch.manual_seed(key)
    random.seed(key)
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(py_state)


def load_sample(source, label, name: str, channels: int, size: int, transform, key: int) -> dict:
    """One batch entry: ``image`` uint8 (C, size, size), ``label`` when labeled, and ``_error`` / ``_name``
    when the file could not be decoded (then a blank image: the main process names the file or drops it)."""
    try:
        image = decode(source, channels)
    except Exception as err:  # anything a broken file makes PIL raise (OSError, SyntaxError, ValueError, ...)
        text = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        image, error = torch.zeros(channels, size, size, dtype=torch.uint8), text
    else:
        with seeded(key):
            image, error = transform(image), ""
    out = {"image": image, "_error": error, "_name": name if error else ""}
    if label is not None:
        out["label"] = int(label)
    return out


def channel_stats(images: list[torch.Tensor]) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] units of uint8 images (C, H, W) of any sizes."""
    sums = torch.zeros(images[0].shape[0], dtype=torch.float64)
    squares, count = torch.zeros_like(sums), 0
    for image in images:
        x = image.reshape(image.shape[0], -1).double() / 255
        sums += x.sum(1)
        squares += (x * x).sum(1)
        count += x.shape[1]
    mean = sums / count
    std = (squares / count - mean * mean).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.clamp_min(1e-3).tolist()


class Normalize(torch.nn.Module):
    """uint8 batch -> float, normalised per channel, on whatever device the batch is (one fused multiply-add)."""

    def __init__(self, mean: list[float], std: list[float]):
        super().__init__()
        mean_t, std_t = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
        self.mean, self.std = list(mean), list(std)
        self.register_buffer("scale", (1 / (255 * std_t)).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("shift", (-mean_t / std_t).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        scale, shift = self.scale.to(images.device), self.shift.to(images.device)
        return torch.addcmul(shift, images.float(), scale)
