"""Whole-batch image augmentation as tensor ops, so the loader never becomes the bottleneck: the in-memory path's
machinery for every op of the recipe (``recipe.py``), and the streaming paths' for the ops their workers leave
to the device (all but the crop, the flip and torchvision's policies).

One random affine matrix per sample (the random crop at ``scale`` and ``ratio``, rotation, translation,
horizontal flip) applied with a single ``affine_grid``/``grid_sample`` call, then per-sample brightness/contrast
jitter, the photo ops of the BYOL/DINO recipes (``photo.py``: colour jitter, grayscale, blur, solarize), Gaussian
noise and random erasing. ``OPS`` lists them in the order they apply, each with the recipe's fields it reads; an op
whose fields do nothing is skipped, draws included, so a recipe without the photo ops draws what it always did.

The photo ops act on pixels in [0, 1]: the batch is un-normalised with the mean and std it was normalised with
(``set_pixel_stats``: the data's, held in memory or streamed) and normalised again after. ``size`` makes the crop
at another side length (multi-crop's small local views).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from datamodules.transforms import photo
from datamodules.transforms.recipe import OPS, WORKER_OPS, Recipe, resolve, unsupported
from lightning_modules.core.distributed import shard_draw


class BatchAugment(nn.Module):
    # (the recipe's fields an op reads, the method applying it), in the order the ops apply. A new op is a line
    # here and its method; ``auto_augment`` has none (torchvision's policies need one PIL image at a time).
    OPS = (
        (("scale", "ratio", "rotate", "translate", "flip", "size"), "_geometry"),
        (("brightness", "contrast"), "_photometric"),
        (("jitter", "jitter_strength", "grayscale", "blur", "blur_sigma", "solarize"), "_photo"),
        (("noise",), "_noise"),
        (("erase",), "_random_erase"),
    )
    SUPPORTED = frozenset(name for names, _ in OPS for name in names)

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
        ratio: tuple[float, float] = (1.0, 1.0),
        jitter: float = 0.0,
        jitter_strength: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1),
        grayscale: float = 0.0,
        blur: float = 0.0,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        solarize: float = 0.0,
        size: int | None = None,
    ):
        super().__init__()
        lo, hi = float(scale[0]), float(scale[1])
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"augment.scale={list(scale)} must satisfy 0 < low <= high <= 1")
        r_lo, r_hi = float(ratio[0]), float(ratio[1])
        if not 0 < r_lo <= r_hi:
            raise ValueError(f"augment.ratio={list(ratio)} must satisfy 0 < low <= high")
        self.recipe = Recipe(
            scale=(lo, hi),
            ratio=(r_lo, r_hi),
            flip=bool(flip),
            rotate=float(rotate),
            translate=float(translate),
            brightness=float(brightness),
            contrast=float(contrast),
            noise=float(noise),
            erase=float(erase),
            jitter=float(jitter),
            jitter_strength=tuple(float(v) for v in jitter_strength),
            grayscale=float(grayscale),
            blur=float(blur),
            blur_sigma=tuple(float(v) for v in blur_sigma),
            solarize=float(solarize),
            size=None if size is None else int(size),
        )
        self.scale, self.ratio = self.recipe.scale, self.recipe.ratio
        self.rotate, self.translate, self.flip = self.recipe.rotate, self.recipe.translate, self.recipe.flip
        self.brightness, self.contrast = self.recipe.brightness, self.recipe.contrast
        self.noise, self.erase = self.recipe.noise, self.recipe.erase
        self.size = self.recipe.size
        r = self.recipe
        self.photo = photo.PhotoOps(r.jitter, r.jitter_strength, r.grayscale, r.blur, r.blur_sigma, r.solarize)
        active = set(self.recipe.active())
        self.steps = [getattr(self, method) for names, method in self.OPS if active & set(names)]

    def set_pixel_stats(self, mean, std) -> None:
        """The mean and std the batches were normalised with (per channel, or one for all): the photo ops undo
        them, act on pixels in [0, 1], and apply them again. Unset: the batches are taken as pixels already."""
        self.photo.set_pixel_stats(mean, std)

    @classmethod
    def from_recipe(cls, recipe: Recipe, key: str, why: str) -> BatchAugment:
        """The batch machinery for ``recipe``; an op it has no entry for is one line (``why``: the path's reason)."""
        unsupported(recipe, cls.SUPPORTED, key, why)
        return cls(**{name: getattr(recipe, name) for name in recipe.active()})

    @classmethod
    def from_config(cls, key: str, augment: dict | None, image_size: int = 32, stats=None) -> BatchAugment:
        """The augmentation a config node (``objective.augment``: an objective's views) describes, each value
        checked by its rule under ``key``; null means none. ``stats``: the (mean, std) the data's batches were
        normalised with (its spec's), which the photo ops undo."""
        recipe = resolve(key, augment, image_size)
        made = cls.from_recipe(recipe, key, "cannot be applied to a whole batch on the device")
        if stats is not None:
            made.set_pixel_stats(*stats)
        return made

    @property
    def is_identity(self) -> bool:
        return not self.steps

    # Every random draw goes through shard_draw: under DDP each rank draws for the global batch and keeps
    # its slice, so the augmentations are those a single process draws for the same global batch.
    def _uniform(self, n: int, lo: float, hi: float, like: torch.Tensor) -> torch.Tensor:
        return shard_draw(lambda m: torch.empty(m, device=like.device, dtype=like.dtype).uniform_(lo, hi), n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for step in self.steps:
            x = step(x)
        return x

    def _geometry(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        # Side length of the crop relative to the image: sqrt of the area fraction.
        side = self._uniform(n, *self.scale, x).sqrt()
        angle = self._uniform(n, -self.rotate, self.rotate, x) * (math.pi / 180)
        width = height = side
        if self.ratio != (1.0, 1.0):  # log-uniform aspect ratio, as torchvision's random-resized crop
            stretch = (self._uniform(n, math.log(self.ratio[0]), math.log(self.ratio[1]), x) / 2).exp()
            width, height = (side * stretch).clamp(max=1), (side / stretch).clamp(max=1)
        # The crop may sit anywhere inside the image, plus the extra translation.
        tx = self._uniform(n, -1, 1, x) * ((1 - width) + self.translate)
        ty = self._uniform(n, -1, 1, x) * ((1 - height) + self.translate)
        if self.flip:
            sx = width * torch.where(shard_draw(lambda m: torch.rand(m, device=x.device), n) < 0.5, -1.0, 1.0)
        else:
            sx = width
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack(
            [torch.stack([sx * cos, -height * sin, tx], 1), torch.stack([sx * sin, height * cos, ty], 1)], 1
        )
        shape = list(x.shape) if self.size is None else [*x.shape[:2], self.size, self.size]
        grid = F.affine_grid(theta, shape, align_corners=False)
        # Pad with the per-image minimum (the background once normalised), not with zero.
        bg = x.amin(dim=(1, 2, 3), keepdim=True)
        return F.grid_sample(x - bg, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + bg

    def _photometric(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        c = 1 + self._uniform(n, -self.contrast, self.contrast, x).view(n, 1, 1, 1)
        b = self._uniform(n, -self.brightness, self.brightness, x).view(n, 1, 1, 1)
        return (x - mean) * c + mean + b

    def _photo(self, x: torch.Tensor) -> torch.Tensor:
        return self.photo(x)

    def _noise(self, x: torch.Tensor) -> torch.Tensor:
        shape, like = x.shape[1:], {"device": x.device, "dtype": x.dtype}
        return x + self.noise * shard_draw(lambda m: torch.randn(m, *shape, **like), x.shape[0])

    def _random_erase(self, x: torch.Tensor) -> torch.Tensor:
        """With probability ``erase``, blank one random rectangle (a quarter of the side) per image."""
        n, _, h, w = x.shape
        eh, ew = max(1, h // 4), max(1, w // 4)
        top = shard_draw(lambda m: torch.randint(0, h - eh + 1, (m, 1, 1), device=x.device), n)
        left = shard_draw(lambda m: torch.randint(0, w - ew + 1, (m, 1, 1), device=x.device), n)
        rows = torch.arange(h, device=x.device).view(1, h, 1)
        cols = torch.arange(w, device=x.device).view(1, 1, w)
        box = (rows >= top) & (rows < top + eh) & (cols >= left) & (cols < left + ew)
        box &= shard_draw(lambda m: torch.rand(m, 1, 1, device=x.device), n) < self.erase
        return x.masked_fill(box.unsqueeze(1), 0.0)


def device_part(recipe: Recipe) -> BatchAugment:
    """On a streaming path, the ops of ``recipe`` that the workers leave to the device (all but ``WORKER_OPS``),
    applied per batch after normalisation, as in memory."""
    return BatchAugment.from_recipe(recipe.only(set(OPS) - set(WORKER_OPS)), "datamodule.augment", "")
