"""One training augmentation for every loading path, stated once (``datamodule.augment``), and one evaluation crop
(``datamodule.eval_crop_pct``): the path a run takes (held in memory, streamed from a folder, prepared shards)
changes how fast the images come, never what is done to them.

**What the user states.** ``augment.preset`` gives every op left ``null`` its value: ``photo`` is ImageNet's
convention (random-resized crop from 8% of the area, aspect 3/4 to 4/3, horizontal flip), ``small`` suits images
of a few dozen pixels (mild crops from 70% of the area, square, ±10° rotation, 5% translation, ±0.1 brightness
and contrast, no flip), ``none`` does nothing, and ``auto`` is ``photo`` at ``image_size`` >= 64 and ``small``
below. ``eval_crop_pct=null`` is ImageNet's 0.875 centre crop with the photo preset and no crop (1.0) otherwise: a
small image has no border to spare.

**Who applies each op.** ``Recipe`` is what to do; each path has one entry per op for how:

- held in memory: ``BatchAugment`` (``augment.py``), whole-batch tensor ops on the device, for every op but
  ``auto_augment`` (torchvision's policies work on one PIL image at a time);
- streamed (a folder, shards): the DataLoader workers apply ``WORKER_OPS`` to each image with torchvision
  (``images.py``: the crop is taken from the file at its full resolution, the policies need PIL), and the same
  ``BatchAugment`` applies the rest to each batch on the device, after normalisation, as in memory.

An op a path has no entry for is refused in one line (``unsupported``), never silently dropped. Adding an op is a
field here (with the value that does nothing), its rule in ``config/rules/datamodule.py``, and its entry in
``BatchAugment`` (and, for an op that must run per image, in ``images.py`` and ``WORKER_OPS``).

The photo ops of the BYOL/DINO recipes (colour jitter, grayscale, blur, solarize: ``photo.py``) are ops like any
other, off by default, applied on the device on every path (after the workers' crop when streamed); ``size`` (the
crop's side: multi-crop's small local views) is an objective's views' alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace

from lightning_modules.config.rules import check, rule_for
from lightning_modules.core.errors import ConfigError

PHOTO_SIZE = 64  # image_size from which preset=auto is photo, and eval_crop_pct=null is 0.875
PHOTO_EVAL_CROP = 0.875


@dataclass(frozen=True)
class Recipe:
    """The training augmentation; each field's default does nothing. Images are normalised (mean 0, std 1) when
    the photometric ops apply: ``brightness`` and ``noise`` are in standard deviations."""

    scale: tuple[float, float] = (1.0, 1.0)  # random crop: fraction of the area
    ratio: tuple[float, float] = (1.0, 1.0)  # ... and its aspect ratio (width / height)
    flip: bool = False  # horizontal, with probability 1/2
    rotate: float = 0.0  # degrees, either way
    translate: float = 0.0  # fraction of the side, either way
    brightness: float = 0.0  # + U(-b, b)
    contrast: float = 0.0  # about the image's mean, x U(1 - c, 1 + c)
    auto_augment: str | None = None  # randaugment | trivialaugment | autoaugment (torchvision's)
    noise: float = 0.0  # + N(0, noise²) per pixel
    erase: float = 0.0  # probability of blanking a rectangle a quarter of the side
    # The photo ops of the BYOL/DINO recipes (photo.py), on pixels in [0, 1] (the batch un-normalised and
    # normalised again): probabilities, with the strengths of torchvision's ColorJitter and the blur's sigma range.
    jitter: float = 0.0  # ColorJitter(*jitter_strength): brightness, contrast, saturation, hue
    jitter_strength: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    grayscale: float = 0.0
    blur: float = 0.0  # a Gaussian of sigma U(*blur_sigma) pixels
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize: float = 0.0  # pixels >= 0.5 become 1 - pixel
    size: int | None = None  # the crop's side in pixels (null: the input's): multi-crop's local views

    def active(self) -> list[str]:
        """The ops that change an image, in field order (an op's strength only when the op itself acts)."""
        identity = Recipe()
        changed = [f.name for f in fields(self) if getattr(self, f.name) != getattr(identity, f.name)]
        return [name for name in changed if STRENGTH_OF.get(name, name) in changed]

    def only(self, names) -> Recipe:
        """This recipe with every op not in ``names`` set to do nothing."""
        identity = Recipe()
        return replace(self, **{f.name: getattr(identity, f.name) for f in fields(self) if f.name not in names})

    def record(self) -> dict:
        """For the run record: the ops that act, with their values (lists, not tuples)."""
        values = asdict(self)
        return {name: list(values[name]) if isinstance(values[name], tuple) else values[name] for name in self.active()}


PRESETS = {
    "photo": Recipe(scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip=True),
    "small": Recipe(scale=(0.7, 1.0), rotate=10.0, translate=0.05, brightness=0.1, contrast=0.1),
    "none": Recipe(),
}
OPS = tuple(f.name for f in fields(Recipe))
STRENGTH_OF = {"jitter_strength": "jitter", "blur_sigma": "blur"}  # a strength acts only with its op
WORKER_OPS = ("scale", "ratio", "flip", "auto_augment")  # per image in the streaming workers; the rest per batch


def preset_of(node: Mapping | None, image_size: int) -> str:
    """The preset a config node names (``auto``: by ``image_size``); ``none`` for a node that is null or names
    none (then a key left out does nothing)."""
    preset = (node or {}).get("preset") or "none"
    if preset == "auto":
        return "photo" if image_size >= PHOTO_SIZE else "small"
    return preset


def resolve(key: str, node: Mapping | None, image_size: int) -> Recipe:
    """The recipe a config node (``datamodule.augment``, ``objective.augment``) describes at ``image_size``, each
    value checked by its rule under ``key``. ``null`` is no augmentation; keys left out or ``null`` take the
    preset's value (``preset_of``)."""
    if node is None:
        return Recipe()
    values = dict(node)
    # The keys with a rule under ``key``: ``size`` is an objective's views' alone (a datamodule serves its
    # training images at image_size).
    allowed = {name for name in (*OPS, "preset") if rule_for(f"{key}.{name}") is not None}
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]} is unknown: allowed are {', '.join(sorted(allowed))}")
    for name, value in values.items():
        check(f"{key}.{name}", value)
    base = PRESETS[preset_of(values, image_size)]
    chosen = {name: value for name, value in values.items() if value is not None and name != "preset"}
    if chosen.get("auto_augment") == "none":
        chosen["auto_augment"] = None
    for name in ("scale", "ratio", "jitter_strength", "blur_sigma"):
        if name in chosen:
            chosen[name] = tuple(float(v) for v in chosen[name])
    probabilities = ("jitter", "grayscale", "blur", "solarize")
    for name in ("rotate", "translate", "brightness", "contrast", "noise", "erase", *probabilities):
        if name in chosen:
            chosen[name] = float(chosen[name])
    if "size" in chosen:
        chosen["size"] = int(chosen["size"])
    return replace(base, **chosen)


def eval_crop(value: float | None, augment: Mapping | None, image_size: int) -> float:
    """``datamodule.eval_crop_pct``: as set, else 0.875 with the photo preset (ImageNet's) and 1.0 (no crop)
    with any other."""
    check("datamodule.eval_crop_pct", value)
    if value is not None:
        return float(value)
    return PHOTO_EVAL_CROP if preset_of(augment, image_size) == "photo" else 1.0


def unsupported(recipe: Recipe, supported, key: str, why: str) -> None:
    """One line for the first op of ``recipe`` that a path's machinery has no entry for (``supported``)."""
    for name in recipe.active():
        if name not in supported:
            value = getattr(recipe, name)
            raise ConfigError(f"{key}.{name}={value} {why}; allowed there is {key}.{name}={_identity(name)}")


def _identity(name: str) -> str:
    value = getattr(Recipe(), name)
    return "none" if value is None else str(list(value) if isinstance(value, tuple) else value).lower()
