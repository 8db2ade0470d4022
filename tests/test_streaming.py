"""Image folders larger than memory, streamed: the budget that picks the path, the order and the per-image
randomness of the streamed batches (equal to the in-memory path's order, independent of the workers, split
across ranks), mid-epoch resume of the loader, and every kind of bad data. Images are written on the fly and go
through the real loaders with worker processes."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.loading.decision import choose
from datamodules.sources.image_folder import ImageFolderDataModule
from lightning_modules.core.errors import ConfigError
from tests.conftest import started

CLASSES = ("ant", "bee", "cat")


def write_folder(root: Path, n: int = 20, size=(20, 26), fmt: str = "png", seed: int = 0) -> Path:
    """``n`` small images per class under root/train/<class>/, non-square, each class its own colour."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(CLASSES):
        folder = root / "train" / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            pixels = rng.integers(0, 80, (*size, 3), dtype=np.uint8)
            pixels[..., c] += 150
            Image.fromarray(pixels).save(folder / f"{i:03d}.{fmt}")
    return root


def stream(root: Path, **kwargs) -> ImageFolderDataModule:
    options = dict(root=str(root), image_size=16, channels=3, batch_size=8, num_workers=2, loading="stream")
    dm = ImageFolderDataModule(**{**options, **kwargs})
    dm.setup()
    return started(dm)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("images"))


def test_the_budget_picks_memory_or_streaming_and_says_why(folder):
    small = choose("data", 1000, 3, 32, "auto", budget_gb=4)
    assert small.path == "memory" and "1,000 images, 0.00 GB as uint8 at 32 px; within" in small.reason
    big = choose("data", 50_000, 3, 224, "auto", budget_gb=4)
    assert big.path == "stream" and "7.53 GB" in big.reason and "over datamodule.memory_budget_gb=4" in big.reason
    assert choose("data", 10, 3, 8, "stream", 4).path == "stream"  # forced either way
    assert choose("data", 10**6, 3, 224, "memory", 4).path == "memory"
    # 60 images of 3 x 16 x 16 bytes are 46 kB: over a 40 kB budget they stream, under 50 kB they stay
    streamed = stream(folder, loading="auto", memory_budget_gb=40e-6, augment={})
    assert streamed.streams and not streamed.can_cache_features()  # (a frozen backbone's feature cache)
    in_memory = stream(folder, loading="auto", memory_budget_gb=50e-6)
    assert not in_memory.streams and in_memory.splits["train"]["image"].shape[1:] == (3, 16, 16)
    with pytest.raises(ConfigError, match=r"datamodule.loading='disk' is invalid: allowed are 'auto', 'memory', 's"):
        stream(folder, loading="disk")


def test_streamed_batches_are_the_in_memory_batches_in_the_same_order(folder):
    streamed, in_memory = stream(folder), stream(folder, loading="memory")
    for split in ("val", "test"):
        assert [b["label"].tolist() for b in streamed.eval_loader(split)] == [
            b["label"].tolist() for b in in_memory.eval_loader(split)
        ]
    batches = list(streamed.train_dataloader())
    assert [b["label"].tolist() for b in batches] == [b["label"].tolist() for b in in_memory.train_dataloader()]
    assert len(batches) == 42 // 8 and all(b["image"].shape == (8, 3, 16, 16) for b in batches)
    assert batches[0]["image"].dtype == torch.uint8  # decoded in the workers, normalised on the device
    # The same data; only the normalisation the spec records differs (README "Augmentation": streamed, per channel
    # from a sample; in memory, one value over all training pixels).
    assert replace(streamed.spec, mean=None, std=None) == replace(in_memory.spec, mean=None, std=None)
    assert len(streamed.spec.mean) == 3 and len(in_memory.spec.mean) == 1


def test_each_image_gets_the_same_crop_whatever_the_workers_and_a_new_one_each_epoch(folder):
    def epoch(dm, n):
        dm.epoch = lambda: n
        return torch.cat([b["image"] for b in dm.train_dataloader()])

    two, none = stream(folder, num_workers=2), stream(folder, num_workers=0)
    assert torch.equal(epoch(two, 0), epoch(none, 0))
    assert not torch.equal(epoch(two, 0), epoch(two, 1))  # reshuffled and re-augmented
    before = torch.get_rng_state()
    epoch(none, 0)  # decoding in this process leaves its random stream alone
    assert torch.equal(torch.get_rng_state(), before)


def test_two_ranks_stream_the_halves_of_the_global_batches_of_one_process(folder):
    one = stream(folder, batch_size=8)
    single = list(one.train_dataloader())
    ranks = []
    for rank in (0, 1):
        dm = stream(folder, batch_size=4)
        dm.shard = lambda rank=rank: {"rank": rank, "world": 2}
        ranks.append(list(dm.train_dataloader()))
    assert len(ranks[0]) == len(ranks[1]) == len(single)
    for step, batch in enumerate(single):  # the same images, the same crops
        assert torch.equal(torch.cat([ranks[0][step]["image"], ranks[1][step]["image"]]), batch["image"])


def test_a_resumed_epoch_skips_the_batches_already_trained_without_decoding_them(folder, monkeypatch):
    dm = stream(folder, num_workers=0)  # decoded in this process: the decodes can be counted
    full = [b["image"] for b in dm.train_dataloader()]
    import datamodules.loading.streaming as streaming

    decoded = []
    real = streaming.load_sample
    monkeypatch.setattr(streaming, "load_sample", lambda *a: decoded.append(a[2]) or real(*a))
    dm.batches_trained = lambda: 2  # Lightning's restored progress, on a resume from a mid-epoch checkpoint
    rest = [b["image"] for b in dm.train_dataloader()]
    assert len(rest) == len(full) - 2 and all(torch.equal(a, b) for a, b in zip(rest, full[2:], strict=True))
    assert len(decoded) == 8 * len(rest)  # the two trained batches were not decoded


# --- bad data ----------------------------------------------------------------------------------------------


def _jpeg_bytes(mode: str, size=(18, 22)) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, 128 if mode in ("L", "CMYK") else (10, 200, 30)[: len(mode)]).save(buffer, "JPEG")
    return buffer.getvalue()


def test_every_image_mode_decodes_to_the_configured_channels(tmp_path):
    write_folder(tmp_path, n=6)
    odd = tmp_path / "train" / "ant"
    Image.new("L", (20, 17), 90).save(odd / "gray.png")
    Image.new("LA", (20, 17), (90, 10)).save(odd / "gray_alpha.png")
    Image.new("RGBA", (20, 17), (250, 0, 0, 0)).save(odd / "transparent.png")
    palette = Image.new("P", (20, 17), 3)
    palette.info["transparency"] = 3
    palette.save(odd / "palette.png", transparency=3)
    (odd / "cmyk.jpg").write_bytes(_jpeg_bytes("CMYK"))
    Image.fromarray(np.full((17, 20), 40000, dtype=np.uint16)).save(odd / "sixteen_bit.png")
    Image.new("1", (20, 17), 1).save(odd / "bilevel.png")
    for channels in (3, 1):
        dm = stream(tmp_path, channels=channels, batch_size=4, val_fraction=0.1, test_fraction=0.1)
        seen = sum(len(b["label"]) for split in ("val", "test") for b in dm.eval_loader(split))
        images = [b["image"] for b in dm.train_dataloader()]
        assert all(x.shape[1] == channels for x in images) and seen + 4 * len(images) > 20
        in_memory = stream(tmp_path, channels=channels, loading="memory", val_fraction=0.1, test_fraction=0.1)
        assert in_memory.splits["train"]["image"].shape[1] == channels
    from datamodules.transforms.decode import decode

    assert decode(odd / "sixteen_bit.png", 1).getpixel((0, 0)) == round(40000 * 255 / 65535)


def _corrupt(root: Path) -> Path:
    """A truncated JPEG among the training images, where a loader meets it in the middle of an epoch."""
    data = _jpeg_bytes("RGB", size=(40, 40))
    bad = root / "train" / "bee" / "010_truncated.jpg"
    bad.write_bytes(data[: len(data) // 2])
    return bad


def test_a_corrupt_image_mid_epoch_stops_with_one_line_naming_it_or_is_skipped_and_counted(tmp_path):
    write_folder(tmp_path)
    bad = _corrupt(tmp_path)
    dm = stream(tmp_path, val_fraction=0.1, test_fraction=0.1)
    splits = {s: list(paths) for s, (paths, _) in dm.stream.items()}
    split = next(s for s, paths in splits.items() if str(bad) in paths)
    loader = dm.train_dataloader() if split == "train" else dm.eval_loader(split)
    with pytest.raises(ConfigError) as err:
        list(loader)
    message = str(err.value)
    assert "\n" not in message and f"cannot read image {bad} (OSError: " in message
    assert message.startswith(f"datamodule.root={tmp_path}") and "datamodule.on_bad_sample=skip" in message

    skip = stream(tmp_path, val_fraction=0.1, test_fraction=0.1, on_bad_sample="skip")
    loader = skip.train_dataloader() if split == "train" else skip.eval_loader(split)
    sizes = [len(b["label"]) for b in loader]
    assert sum(sizes) == (len(loader) * 8 if split == "train" else len(splits[split])) - 1
    assert skip.run_metrics() == {"data/skipped_samples": 1}
    # Held in memory, the same file is named at loading, or skipped and counted there.
    with pytest.raises(ConfigError, match=r"cannot read image .*010_truncated.jpg \(OSError: "):
        stream(tmp_path, loading="memory")
    in_memory = stream(tmp_path, loading="memory", on_bad_sample="skip")
    assert in_memory.run_metrics() == {"data/skipped_samples": 1}


def test_an_empty_class_folder_is_refused_with_its_name(tmp_path):
    write_folder(tmp_path, n=4)
    (tmp_path / "train" / "dog").mkdir()
    (tmp_path / "train" / ".cache").mkdir()  # hidden folders are not classes
    with pytest.raises(ConfigError, match=r"class folder train/dog/ holds no images \(.*\.jpg.*\); add images or"):
        stream(tmp_path)


def test_evaluation_keeps_the_aspect_ratio():
    from datamodules.transforms.images import eval_transform

    wide = Image.new("RGB", (40, 20), (0, 0, 0))
    wide.paste((255, 255, 255), (0, 0, 10, 20))  # a white band on the left quarter
    out = eval_transform(16, crop_pct=1.0)(wide)
    assert out.shape == (3, 16, 16) and out.float().mean() < 10  # centre crop of the resized image: no band


def test_pretraining_streams_images_only_and_fine_tuning_keeps_its_label_fraction(folder):
    unlabeled = stream(folder, labeled=False, label_fraction=0.2)
    batch = next(iter(unlabeled.train_dataloader()))
    assert set(batch) == {"image"} and len(unlabeled.stream["train"][1]) == 42  # every training image
    assert "label" in next(iter(unlabeled.eval_loader("val")))
    few = stream(folder, label_fraction=0.2, batch_size=4)
    in_memory = stream(folder, label_fraction=0.2, batch_size=4, loading="memory")
    assert sorted(few.stream["train"][1].tolist()) == sorted(in_memory.splits["train"]["label"].tolist())
    assert len(few.stream["train"][1]) == round(0.2 * 42)


def test_normalisation_and_size_follow_weights_trained_elsewhere_else_the_data(folder):
    from types import SimpleNamespace

    imagenet = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    pretrained = SimpleNamespace(preprocessing={"mean": imagenet[0], "std": imagenet[1], "input_size": 24})
    dm = ImageFolderDataModule(root=str(folder), image_size=16, channels=3, loading="stream", batch_size=8)
    dm.use_backbone(pretrained)  # timm's or a weight file's pretrained config (backbone.preprocessing)
    dm.setup()
    started(dm)
    assert dm.normalization == (imagenet[0], imagenet[1]) and dm.spec.image_size == 24
    assert next(iter(dm.eval_loader("val")))["image"].shape[-1] == 24
    scratch = ImageFolderDataModule(root=str(folder), image_size=16, channels=3, loading="stream", batch_size=8)
    scratch.use_backbone(SimpleNamespace(preprocessing={}))  # weights pretune trained: the data's statistics
    scratch.setup()
    mean, std = scratch.normalization  # each class folder is bright in its own channel
    assert all(0.35 < m < 0.55 for m in mean) and scratch.spec.image_size == 16
