"""The photo ops of the BYOL and DINO recipes, for whole batches: colour jitter, random grayscale, Gaussian blur
and solarization, each applied to an image with its own probability.

They mean what torchvision's ``RandomApply([ColorJitter(b, c, s, h)], p=jitter)``, ``RandomGrayscale(grayscale)``,
``RandomApply([GaussianBlur(k, sigma)], p=blur)`` and ``RandomSolarize(0.5, p=solarize)`` mean on a PIL image or a
float tensor in [0, 1], the streaming path's transforms, so one recipe can drive both paths:

- colour jitter: factors ``U(1-b, 1+b)`` brightness (``x * f``), ``U(1-c, 1+c)`` contrast (blend with the image's
  mean grey level), ``U(1-s, 1+s)`` saturation (blend with the image's grey) and a hue shift ``U(-h, h)`` of a turn
  (in HSV), in that fixed order (torchvision draws the order per call), each clamped to [0, 1];
- grayscale: ITU-R 601 luma (0.299 R + 0.587 G + 0.114 B), on every channel;
- blur: a Gaussian of sigma ``U(*blur_sigma)`` pixels, separable, its kernel 2·ceil(3·max sigma)+1 wide (at most
  the image's side), reflect-padded;
- solarize: pixels at or above 0.5 become 1 - pixel.

Written here rather than taken from torchvision or lightly: theirs transform one image (or a batch with one set of
factors); here every image of a batch draws its own, in one tensor op, from draws made for the global batch under
DDP (``shard_draw``), as the rest of ``BatchAugment`` does. Draw order, for a batch of N: the jitter's apply mask
(N uniforms), then brightness, contrast, saturation, hue factors (N each); grayscale's mask; blur's mask, then its
sigmas; solarize's mask. An op that is off draws nothing.

Grey (1-channel) images have no colour: saturation, hue and grayscale are skipped (once noted in the log);
brightness, contrast, blur and solarize apply.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_info
from torch import nn

from lightning_modules.core.distributed import shard_draw

LUMA = (0.299, 0.587, 0.114)
SOLARIZE_AT = 0.5
_grey_noted = False  # the note that grey images skip the colour ops: once a process


def _uniform(n: int, lo: float, hi: float, like: torch.Tensor) -> torch.Tensor:
    return shard_draw(lambda m: torch.empty(m, device=like.device, dtype=like.dtype).uniform_(lo, hi), n)


def _chosen(n: int, p: float, like: torch.Tensor) -> torch.Tensor:
    """Which of ``n`` images an op of probability ``p`` applies to (a bool mask, drawn for the global batch)."""
    return shard_draw(lambda m: torch.rand(m, device=like.device), n) < p


def grey(x: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W): the luma of RGB images, or grey images as they are."""
    if x.shape[1] == 1:
        return x
    weights = torch.tensor(LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * weights).sum(1, keepdim=True)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (factor * x + (1 - factor) * other).clamp(0, 1)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) RGB in [0, 1] to HSV, hue in [0, 1) of a turn."""
    r, g, b = x.unbind(1)
    value, _ = x.max(1)
    chroma = value - x.min(1).values
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    saturation = torch.where(value > 0, chroma / torch.where(value > 0, value, torch.ones_like(value)), 0 * value)
    # The sector of the colour wheel is set by the largest channel (ties: red, then green).
    hue = torch.where(value == r, ((g - b) / safe) % 6, torch.where(value == g, (b - r) / safe + 2, (r - g) / safe + 4))
    hue = torch.where(chroma > 0, hue / 6, torch.zeros_like(hue))
    return torch.stack([hue, saturation, value], 1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """Back from ``rgb_to_hsv``: channel n of (R, G, B) = v - v·s·clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6
    with n = 5, 3, 1."""
    hue, saturation, value = (t.unsqueeze(1) for t in x.unbind(1))
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = (n + hue * 6) % 6
    return value - value * saturation * torch.minimum(k, 4 - k).clamp(0, 1)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, width: int) -> torch.Tensor:
    """Each image blurred by its own sigma (``sigma``: (N,)), separably, with a ``width``-tap kernel (odd)."""
    n, c, h, w = x.shape
    taps = torch.arange(width, device=x.device, dtype=x.dtype) - width // 2
    kernel = torch.exp(-(taps.view(1, -1) ** 2) / (2 * sigma.view(-1, 1) ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (N*C, width): one per channel
    pad = width // 2
    y = F.pad(x.reshape(1, n * c, h, w), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, kernel.view(n * c, 1, 1, width), groups=n * c)
    y = F.conv2d(y, kernel.view(n * c, 1, width, 1), groups=n * c)
    return y.view(n, c, h, w)


class PhotoOps(nn.Module):
    """The four ops with their probabilities (0: off). Called on a normalised batch; works on its pixels."""

    def __init__(
        self,
        jitter: float = 0.0,
        jitter_strength=(0.4, 0.4, 0.2, 0.1),
        grayscale: float = 0.0,
        blur: float = 0.0,
        blur_sigma=(0.1, 2.0),
        solarize: float = 0.0,
    ):
        super().__init__()
        self.jitter, self.grayscale, self.blur, self.solarize = (float(p) for p in (jitter, grayscale, blur, solarize))
        self.brightness, self.contrast, self.saturation, self.hue = (float(v) for v in jitter_strength)
        self.blur_sigma = (float(blur_sigma[0]), float(blur_sigma[1]))
        self.mean = self.std = None

    def set_pixel_stats(self, mean, std) -> None:
        self.mean = None if mean is None else torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)
        self.std = None if std is None else torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)

    @property
    def is_identity(self) -> bool:
        return not (self.jitter or self.grayscale or self.blur or self.solarize)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean, std = (
            (torch.zeros(()), torch.ones(()))
            if self.mean is None
            else (self.mean.to(x.device, x.dtype), self.std.to(x.device, x.dtype))
        )
        pixels = x * std + mean
        colour = pixels.shape[1] == 3
        if not colour:
            self._note_grey()
        n = len(pixels)
        if self.jitter:
            pixels = self._jitter(pixels, colour)
        if self.grayscale:
            chosen = _chosen(n, self.grayscale, pixels).view(n, 1, 1, 1)
            if colour:
                pixels = torch.where(chosen, grey(pixels).expand_as(pixels), pixels)
        if self.blur:
            chosen = _chosen(n, self.blur, pixels).view(n, 1, 1, 1)
            sigma = _uniform(n, *self.blur_sigma, pixels)
            width = min(2 * math.ceil(3 * self.blur_sigma[1]) + 1, 2 * ((min(pixels.shape[-2:]) - 1) // 2) + 1)
            pixels = torch.where(chosen, gaussian_blur(pixels, sigma, width), pixels)
        if self.solarize:
            chosen = _chosen(n, self.solarize, pixels).view(n, 1, 1, 1)
            pixels = torch.where(chosen & (pixels >= SOLARIZE_AT), 1 - pixels, pixels)
        return (pixels - mean) / std

    def _jitter(self, x: torch.Tensor, colour: bool) -> torch.Tensor:
        n = len(x)
        chosen = _chosen(n, self.jitter, x).view(n, 1, 1, 1)

        def factor(strength: float) -> torch.Tensor:
            return _uniform(n, max(0.0, 1 - strength), 1 + strength, x).view(n, 1, 1, 1)

        brightness, contrast, saturation = factor(self.brightness), factor(self.contrast), factor(self.saturation)
        hue = _uniform(n, -self.hue, self.hue, x).view(n, 1, 1)
        y = (x * brightness).clamp(0, 1)
        y = _blend(y, grey(y).mean(dim=(1, 2, 3), keepdim=True), contrast)
        if colour:
            y = _blend(y, grey(y), saturation)
            hsv = rgb_to_hsv(y)
            y = hsv_to_rgb(torch.stack([(hsv[:, 0] + hue) % 1, hsv[:, 1], hsv[:, 2]], 1))
        return torch.where(chosen, y, x)

    def _note_grey(self) -> None:
        global _grey_noted
        if _grey_noted or not (self.grayscale or self.jitter and (self.saturation or self.hue)):
            return
        _grey_noted = True
        rank_zero_info(
            "augment: the images are grey (1 channel): grayscale, saturation and hue are skipped"
            " (brightness, contrast, blur and solarize apply)"
        )
