"""One augmentation recipe for every loading path (``datamodules/transforms/recipe.py``): presets by image size, the
evaluation crop, the in-memory draws unchanged, the same pixels held in memory and streamed, an op a path cannot do
refused in one line."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from datamodules.sources.digits import DigitsDataModule
from datamodules.transforms.augment import BatchAugment
from datamodules.transforms.recipe import PRESETS, Recipe, eval_crop, resolve
from lightning_modules.core.errors import ConfigError
from tests.test_streaming import stream, write_folder

NULLS = dict.fromkeys(("scale", "ratio", "flip", "rotate", "translate", "brightness", "contrast", "noise", "erase"))


def test_presets_follow_the_image_size_and_a_set_key_wins():
    auto = {"preset": "auto", **NULLS}
    assert resolve("datamodule.augment", auto, 224) == PRESETS["photo"] == Recipe((0.08, 1.0), (3 / 4, 4 / 3), True)
    assert resolve("datamodule.augment", auto, 32) == PRESETS["small"]
    assert resolve("datamodule.augment", {"preset": "small"}, 224) == PRESETS["small"]  # digits at any size
    assert resolve("datamodule.augment", None, 224) == Recipe()  # augment: null
    assert resolve("datamodule.augment", {**auto, "flip": True, "rotate": 0}, 32).active() == [
        "scale",
        "flip",
        "translate",
        "brightness",
        "contrast",
    ]
    assert resolve("datamodule.augment", {"scale": [0.5, 1.0]}, 32) == Recipe(scale=(0.5, 1.0))  # no preset: none
    assert (eval_crop(None, auto, 224), eval_crop(None, auto, 63), eval_crop(0.9, auto, 32)) == (0.875, 1.0, 0.9)
    assert eval_crop(None, {"preset": "small"}, 224) == 1.0 and eval_crop(None, None, 224) == 1.0
    with pytest.raises(
        ConfigError,
        match=r"datamodule.augment.shear is unknown: allowed are auto_augment, blur, blur_sigma, brightness",
    ):
        resolve("datamodule.augment", {"shear": 3}, 32)
    with pytest.raises(
        ConfigError, match=r"datamodule.augment.ratio=\[2, 1\] is invalid: allowed is a list of 2 items"
    ):
        resolve("datamodule.augment", {"ratio": [2, 1]}, 32)


def _before_issue_20(x: torch.Tensor, scale, rotate, translate, flip, brightness, contrast) -> torch.Tensor:
    """The in-memory augmentation as it drew before the recipe (one process): the draws of make run's studies."""
    n = x.shape[0]
    uniform = lambda lo, hi: torch.empty(n, dtype=x.dtype).uniform_(lo, hi)  # noqa: E731
    side = uniform(*scale).sqrt()
    angle = uniform(-rotate, rotate) * (math.pi / 180)
    room = (1 - side) + translate
    tx, ty = uniform(-1, 1) * room, uniform(-1, 1) * room
    sx = side * torch.where(torch.rand(n) < 0.5, -1.0, 1.0) if flip else side
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([sx * cos, -side * sin, tx], 1), torch.stack([sx * sin, side * cos, ty], 1)], 1)
    bg = x.amin(dim=(1, 2, 3), keepdim=True)
    out = F.grid_sample(x - bg, F.affine_grid(theta, list(x.shape), align_corners=False), align_corners=False) + bg
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    c, b = 1 + uniform(-contrast, contrast).view(n, 1, 1, 1), uniform(-brightness, brightness).view(n, 1, 1, 1)
    return (out - mean) * c + mean + b


@pytest.mark.parametrize("flip", [False, True])
def test_the_in_memory_draws_are_those_before_the_recipe(flip):
    """digits' and mnist5k's recipe (preset small) and SimCLR's keys draw exactly as before: make run's tables hold."""
    x = torch.randn(16, 1, 32, 32)
    recipe = DigitsDataModule(augment={"preset": "small", **NULLS, "flip": flip}).recipe
    torch.manual_seed(3)
    new = BatchAugment.from_recipe(recipe, "datamodule.augment", "")(x)
    torch.manual_seed(3)
    assert torch.equal(new, _before_issue_20(x, (0.7, 1.0), 10.0, 0.05, flip, 0.1, 0.1))
    # A crop of another aspect ratio: the same map, width and height apart.
    wide = BatchAugment(scale=(0.5, 1.0), ratio=(2.0, 3.0))(torch.rand(4, 1, 32, 32))
    assert wide.shape == (4, 1, 32, 32)


def test_an_op_a_path_cannot_do_is_one_line_and_streaming_does_it(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"^datamodule.augment.auto_augment=randaugment is applied per image by streaming workers, and these"
        r" images are held in memory; allowed there is datamodule.augment.auto_augment=none$",
    ):
        DigitsDataModule(augment={"auto_augment": "randaugment"})
    with pytest.raises(ConfigError, match=r"^objective.augment.auto_augment=autoaugment cannot be applied to a whole"):
        BatchAugment.from_config("objective.augment", {"auto_augment": "autoaugment"})
    folder = write_folder(tmp_path, n=6)
    policy = {"preset": "auto", "auto_augment": "trivialaugment"}
    with pytest.raises(ConfigError, match=r"held in memory \(datamodule.loading=stream streams them\); allowed there"):
        stream(folder, loading="memory", augment=policy)
    streamed = stream(folder, augment=policy, batch_size=4)
    assert streamed.recipe.auto_augment == "trivialaugment" and len(list(streamed.train_dataloader())) == 3
    assert streamed.describe()["augment"]["auto_augment"] == "trivialaugment"


def test_held_in_memory_and_streamed_the_same_folder_gives_the_same_pixels(tmp_path):
    """No augmentation: each training batch's images, and with a 0.875 evaluation crop each evaluation batch's, are
    the same uint8 pixels in the same order whichever path reads them."""
    folder = write_folder(tmp_path, n=10)
    options = dict(augment=None, eval_crop_pct=0.875, batch_size=5)
    held, streamed = stream(folder, loading="memory", **options), stream(folder, **options)
    assert held.eval_crop == streamed.eval_crop == 0.875
    tagged = dict(held.splits["train"], i=torch.arange(len(held.splits["train"]["image"])))
    from datamodules.loading.in_memory import BatchLoader

    order = BatchLoader(tagged, 5, True, True, seed=held.label_seed)
    for a, b in zip(order, streamed.train_dataloader(), strict=True):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
    for split in ("val", "test"):
        stored = torch.cat([b["image"] for b in streamed.eval_loader(split)])
        assert torch.equal(stored, held.splits[split]["image"])
    # A small preset streamed: the device's part (rotation, translation, colour) after the workers' crop.
    small = stream(folder, augment={"preset": "small"}, batch_size=5)
    active = set(small.augment.recipe.active())
    assert [method for names, method in BatchAugment.OPS if set(names) & active] == ["_geometry", "_photometric"]
    assert small.augment.recipe.scale == (1.0, 1.0) and small.recipe.scale == (0.7, 1.0)  # the crop is the workers'
