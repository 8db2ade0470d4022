"""Whole-batch image augmentation as tensor ops, so the loader never becomes the bottleneck.

One random affine matrix per sample (scale = random-resized-crop, rotation, translation,
optional horizontal flip) applied with a single ``affine_grid``/``grid_sample`` call, then
per-sample brightness/contrast jitter, Gaussian noise and random erasing.

The photo ops of the BYOL/DINO recipes (``photo.py``) come between the jitter and the noise, each off unless
asked for, so the draws of a recipe without them are what they always were: ``jitter`` (the probability of
torchvision's ``ColorJitter(*jitter_strength)``: brightness, contrast, saturation and hue factors), ``grayscale``,
``blur`` (a Gaussian of ``blur_sigma``) and ``solarize`` (probabilities). ``size`` makes the crop at another side
length (multi-crop's small local views). They act on pixels in [0, 1]: the batch is un-normalised with the data's
``pixel_stats`` (``set_pixel_stats``; the spec's mean and std) and normalised again after.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn

from datamodules.transforms import photo
from lightning_modules.config.rules import check, rule_for
from lightning_modules.core.distributed import shard_draw
from lightning_modules.core.errors import ConfigError


class BatchAugment(nn.Module):
    def __init__(
        self,
        scale: tuple[float, float] = (1.0, 1.0),
        rotate: float = 0.0,
        translate: float = 0.0,
        flip: bool = False,
        brightness: float = 0.0,
        contrast: float = 0.0,
        noise: float = 0.0,
        erase: float = 0.0,
        size: int | None = None,
        jitter: float = 0.0,
        jitter_strength: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1),
        grayscale: float = 0.0,
        blur: float = 0.0,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        solarize: float = 0.0,
    ):
        super().__init__()
        lo, hi = float(scale[0]), float(scale[1])
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"augment.scale={list(scale)} must satisfy 0 < low <= high <= 1")
        self.scale = (lo, hi)
        self.rotate, self.translate, self.flip = float(rotate), float(translate), bool(flip)
        self.brightness, self.contrast, self.noise, self.erase = (
            float(brightness),
            float(contrast),
            float(noise),
            float(erase),
        )
        self.size = None if size is None else int(size)
        self.photo = photo.PhotoOps(jitter, jitter_strength, grayscale, blur, blur_sigma, solarize)

    def set_pixel_stats(self, mean, std) -> None:
        """The mean and std the batches were normalised with (per channel, or one for all): the photo ops undo
        them, act on pixels in [0, 1], and apply them again. Unset: the batches are taken as pixels already."""
        self.photo.set_pixel_stats(mean, std)

    @classmethod
    def from_config(cls, key: str, augment: dict | None, data=None) -> BatchAugment:
        """The augmentation a config node (``datamodule.augment``, ``objective.augment``) describes, each
        value checked by its rule under ``key``; null means none. ``data``: the data's spec, whose mean and std
        the photo ops undo (``set_pixel_stats``)."""
        known = {n for n in inspect.signature(cls.__init__).parameters if rule_for(f"{key}.{n}") is not None}
        for name, value in (augment or {}).items():
            if name not in known:
                raise ConfigError(f"{key}.{name} is unknown: allowed are {', '.join(sorted(known))}")
            check(f"{key}.{name}", value)
        made = cls(**(augment or {}))
        made.set_pixel_stats(getattr(data, "mean", None), getattr(data, "std", None))
        return made

    @property
    def is_identity(self) -> bool:
        return (
            self.scale == (1.0, 1.0)
            and not (self.rotate or self.translate or self.flip)
            and not (self.brightness or self.contrast or self.noise or self.erase)
            and self.size is None
            and self.photo.is_identity
        )

    # Every random draw goes through shard_draw: under DDP each rank draws for the global batch and keeps
    # its slice, so the augmentations are those a single process draws for the same global batch.
    def _uniform(self, n: int, lo: float, hi: float, like: torch.Tensor) -> torch.Tensor:
        return shard_draw(lambda m: torch.empty(m, device=like.device, dtype=like.dtype).uniform_(lo, hi), n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_identity:
            return x
        n = x.shape[0]
        # Side length of the crop relative to the image: sqrt of the area fraction.
        side = self._uniform(n, *self.scale, x).sqrt()
        angle = self._uniform(n, -self.rotate, self.rotate, x) * (math.pi / 180)
        # The crop may sit anywhere inside the image, plus the extra translation.
        room = (1 - side) + self.translate
        tx, ty = self._uniform(n, -1, 1, x) * room, self._uniform(n, -1, 1, x) * room
        if self.flip:
            sx = side * torch.where(shard_draw(lambda m: torch.rand(m, device=x.device), n) < 0.5, -1.0, 1.0)
        else:
            sx = side
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack(
            [torch.stack([sx * cos, -side * sin, tx], 1), torch.stack([sx * sin, side * cos, ty], 1)], 1
        )
        shape = list(x.shape) if self.size is None else [*x.shape[:2], self.size, self.size]
        grid = F.affine_grid(theta, shape, align_corners=False)
        # Pad with the per-image minimum (the background once normalised), not with zero.
        bg = x.amin(dim=(1, 2, 3), keepdim=True)
        out = F.grid_sample(x - bg, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + bg
        if self.brightness or self.contrast:
            mean = out.mean(dim=(1, 2, 3), keepdim=True)
            c = 1 + self._uniform(n, -self.contrast, self.contrast, x).view(n, 1, 1, 1)
            b = self._uniform(n, -self.brightness, self.brightness, x).view(n, 1, 1, 1)
            out = (out - mean) * c + mean + b
        if not self.photo.is_identity:
            out = self.photo(out)
        if self.noise:
            shape, like = out.shape[1:], {"device": out.device, "dtype": out.dtype}
            out = out + self.noise * shard_draw(lambda m: torch.randn(m, *shape, **like), n)
        if self.erase:
            out = self._random_erase(out)
        return out

    def _random_erase(self, x: torch.Tensor) -> torch.Tensor:
        """With probability ``erase``, blank one random rectangle (up to a quarter of the side) per image."""
        n, _, h, w = x.shape
        eh, ew = max(1, h // 4), max(1, w // 4)
        top = shard_draw(lambda m: torch.randint(0, h - eh + 1, (m, 1, 1), device=x.device), n)
        left = shard_draw(lambda m: torch.randint(0, w - ew + 1, (m, 1, 1), device=x.device), n)
        rows = torch.arange(h, device=x.device).view(1, h, 1)
        cols = torch.arange(w, device=x.device).view(1, 1, w)
        box = (rows >= top) & (rows < top + eh) & (cols >= left) & (cols < left + ew)
        box &= shard_draw(lambda m: torch.rand(m, 1, 1, device=x.device), n) < self.erase
        return x.masked_fill(box.unsqueeze(1), 0.0)
