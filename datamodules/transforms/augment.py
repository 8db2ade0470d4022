"""Whole-batch image augmentation as tensor ops, so the loader never becomes the bottleneck.

One random affine matrix per sample (scale = random-resized-crop, rotation, translation,
optional horizontal flip) applied with a single ``affine_grid``/``grid_sample`` call, then
per-sample brightness/contrast jitter, Gaussian noise and random erasing.
"""

from __future__ import annotations

import inspect
import math

import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.config.rules import check
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

    @classmethod
    def from_config(cls, key: str, augment: dict | None) -> BatchAugment:
        """The augmentation a config node (``datamodule.augment``, ``objective.augment``) describes, each
        value checked by its rule under ``key``; null means none."""
        known = inspect.signature(cls.__init__).parameters.keys() - {"self"}
        for name, value in (augment or {}).items():
            if name not in known:
                raise ConfigError(f"{key}.{name} is unknown: allowed are {', '.join(sorted(known))}")
            check(f"{key}.{name}", value)
        return cls(**(augment or {}))

    @property
    def is_identity(self) -> bool:
        return (
            self.scale == (1.0, 1.0)
            and not (self.rotate or self.translate or self.flip)
            and not (self.brightness or self.contrast or self.noise or self.erase)
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
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        # Pad with the per-image minimum (the background once normalised), not with zero.
        bg = x.amin(dim=(1, 2, 3), keepdim=True)
        out = F.grid_sample(x - bg, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + bg
        if self.brightness or self.contrast:
            mean = out.mean(dim=(1, 2, 3), keepdim=True)
            c = 1 + self._uniform(n, -self.contrast, self.contrast, x).view(n, 1, 1, 1)
            b = self._uniform(n, -self.brightness, self.brightness, x).view(n, 1, 1, 1)
            out = (out - mean) * c + mean + b
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
