"""Prepared shards: the preparation command (image folders, text and image-text tables; atomic, bad images),
the refusals of a directory that was not prepared or was prepared in another version, and ``datamodule=shards``
streaming them with litdata: seeded order, every evaluation item once, a URL like a path, the loader's state
resuming the batches the trainer did not finish, and each DDP rank reading its own part of an epoch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.loading.prepare import META, prepare
from datamodules.sources.shards import ShardsDataModule
from lightning_modules.core.errors import ConfigError
from tests.conftest import ROOT, started
from tests.test_streaming import CLASSES, _corrupt, write_folder


def shards(path, **kwargs) -> ShardsDataModule:
    options = dict(path=str(path), image_size=16, batch_size=8, num_workers=2)
    dm = ShardsDataModule(**{**options, **kwargs})
    dm.setup()
    return started(dm)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = write_folder(tmp_path_factory.mktemp("shard_images", numbered=False), n=20)  # named: the tests find it
    return prepare("image_folder", out=str(root.parent / "shards"), root=str(root), workers=1)


def test_an_image_folder_is_prepared_with_the_split_the_folder_datamodule_uses(prepared):
    from litdata import StreamingDataset

    from datamodules.sources.folders import folder_splits

    meta = json.loads((prepared / META).read_text())
    assert (meta["format"], meta["version"], meta["kind"]) == ("pretune-shards", 2, "image_folder")
    assert meta["splits"] == {"train": 42, "val": 9, "test": 9} and meta["classes"] == list(CLASSES)
    assert meta["shuffle_seed"] == 0
    files, _ = folder_splits(str(prepared.parent / "shard_images"), 0.15, 0.15, 0)
    for split in ("train", "val", "test"):
        dataset = StreamingDataset(str(prepared / split))
        written = [dataset[i]["name"] for i in range(len(dataset))]
        expected = [os.path.relpath(p, prepared.parent / "shard_images") for p in files[split][0]]
        assert sorted(written) == sorted(expected)
        # Training items in a seeded random order (the folder's is by class), the others in the split's.
        order = np.random.default_rng(0).permutation(len(expected)) if split == "train" else range(len(expected))
        assert written == [expected[i] for i in order]
    item = StreamingDataset(str(prepared / "val"))[0]
    assert Image.open(__import__("io").BytesIO(bytes(item["image"]))).size == (26, 20)  # the file, as it was


def test_training_batches_are_seeded_and_evaluation_reads_every_item_once(prepared, tmp_path):
    a, b, other = shards(prepared), shards(prepared), shards(prepared, seed=1)
    labels = [x["label"].tolist() for x in a.train_dataloader()]
    assert len(labels) == 42 // 8 and all(len(x) == 8 for x in labels)
    assert labels == [x["label"].tolist() for x in b.train_dataloader()]
    assert labels != [x["label"].tolist() for x in other.train_dataloader()]
    a.epoch = lambda: 1
    assert labels != [x["label"].tolist() for x in a.train_dataloader()]  # reshuffled each epoch
    batch = next(iter(b.train_dataloader()))
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (8, 3, 16, 16)
    assert b.spec.num_classes == 3 and b.spec.class_names == CLASSES
    for split in ("val", "test"):
        assert sum(len(x["label"]) for x in a.eval_loader(split)) == 9
    # The same shards through a URL (litdata's local: scheme stands in for s3:// here): the same batches.
    url = shards(f"local:{prepared}", cache_dir=str(tmp_path / "cache"))
    assert [x["label"].tolist() for x in url.train_dataloader()] == labels
    assert [x["label"].tolist() for x in url.eval_loader("test")] == [
        x["label"].tolist() for x in b.eval_loader("test")
    ]


def test_a_resumed_epoch_starts_where_the_uninterrupted_runs_loader_stood(prepared):
    def epoch_of(dm, epoch):
        dm.epoch = lambda: epoch
        return [x["image"] for x in dm.train_dataloader()]

    uninterrupted = shards(prepared)
    full, following = epoch_of(uninterrupted, 1), epoch_of(uninterrupted, 2)
    dm = shards(prepared)  # a fresh process resuming epoch 1 after its first two batches
    trainer = {"epoch": 1, "trained": 2}  # Lightning's restored progress, on a resume from a mid-epoch checkpoint
    dm.epoch, dm.batches_trained = (lambda: trainer["epoch"]), (lambda: trainer["trained"])
    loader = dm.train_dataloader()
    rest = [x["image"] for x in loader]
    assert len(rest) == len(full) - 2 and all(torch.equal(x, y) for x, y in zip(rest, full[2:], strict=True))
    # The next epoch is whole, and the uninterrupted run's (its number from the trainer, not litdata's counter).
    trainer.update(epoch=2, trained=0)
    second = [x["image"] for x in loader]
    expected = following
    assert len(second) == len(full) and torch.equal(torch.cat(second), torch.cat(expected))


def class_sorted_folder(root: Path, sizes: tuple[int, ...], held: int = 2, side: int = 8) -> Path:
    """A folder as users have them: train/<class>/ (classes of ``sizes`` images, so the file order is by class)
    and val/, test/ folders (``held`` images a class), tiny grey images."""
    rng = np.random.default_rng(0)
    for split, counts in (("train", sizes), ("val", [held] * len(sizes)), ("test", [held] * len(sizes))):
        for c, count in enumerate(counts):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 255, (side, side), dtype=np.uint8), "L").save(folder / f"{i:04d}.png")
    return root


def batch_deviation(batches: list[torch.Tensor], frequencies: np.ndarray) -> list[float]:
    """Per batch of labels, the total variation distance between its class histogram and the classes' frequencies:
    0 for a batch in the split's proportions, 1 for one of a class absent from the split."""
    return [
        0.5 * float(np.abs(np.bincount(b.numpy(), minlength=len(frequencies)) / len(b) - frequencies).sum())
        for b in batches
    ]


def test_every_training_batch_of_a_class_sorted_folder_is_a_fair_sample_whatever_the_workers(tmp_path):
    """Classes of 12 to 108 images written class by class into 8 chunks: every batch's class histogram stays near the
    split's frequencies, with 0, 1 and 3 workers (before issue 20: chunks of a class or two, batches alike)."""
    sizes = (12, 36, 60, 84, 108)
    root = class_sorted_folder(tmp_path / "images", sizes)
    out = prepare("image_folder", out=str(tmp_path / "shards"), root=str(root), workers=1, chunk_mb=0.005)
    assert len(list((out / "train").glob("chunk-*.bin"))) >= 6
    frequencies = np.array(sizes) / sum(sizes)
    for workers in (0, 1, 3):
        dm = shards(out, batch_size=30, channels=1, num_workers=workers)
        labels = [b["label"] for epoch in (0, 1) for b in _epoch(dm, epoch)]
        assert len(labels) == 2 * (300 // 30) and all(len(b) == 30 for b in labels)
        deviation = batch_deviation(labels, frequencies)
        # Batches drawn at random from the split: 0.128 on average, 99.9% of 20-batch means below 0.161 and of single
        # batches below 0.313 (simulated). The folder's order (version 1 of the shards): 0.56 on average, max 0.81.
        assert max(deviation) < 0.34 and np.mean(deviation) < 0.17, (workers, deviation)


def _epoch(dm, epoch: int) -> list[dict]:
    dm.epoch = lambda: epoch
    return list(dm.train_dataloader())


def _rank_items(rank: int, world: int, port: int, path: str, out: str) -> None:
    """One rank of a gloo group: the training images it reads in epoch 0 (crops off: an image is its identity)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    flat = {"scale": [1.0, 1.0], "ratio": [1.0, 1.0], "flip": False}
    dm = ShardsDataModule(path=path, image_size=16, batch_size=4, num_workers=0, augment=flat)
    dm.setup()
    torch.save(torch.cat([b["image"] for b in dm.train_dataloader()]), f"{out}/{rank}.pt")
    dm.teardown("fit")
    dist.barrier()
    os._exit(0)


@pytest.mark.slow
def test_each_ddp_rank_reads_its_own_part_of_every_epoch(prepared, tmp_path):
    from tests.test_ddp import _free_port

    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")}
    spawn = (
        "import sys, torch; from tests.test_ddp import _free_port; from tests.test_shards import _rank_items;"
        " torch.multiprocessing.spawn(_rank_items, args=(2, _free_port(), sys.argv[1], sys.argv[2]), nprocs=2)"
    )
    result = subprocess.run(
        [sys.executable, "-c", spawn, str(prepared), str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert _free_port  # (imported for the spawned ranks)
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in (0, 1)]
    keys = [{hash(x.numpy().tobytes()) for x in images} for images in ranks]
    assert len(ranks[0]) == len(ranks[1]) > 0  # the same number of batches on every rank
    assert not keys[0] & keys[1]  # no image on both ranks
    assert len(keys[0] | keys[1]) >= 42 - 2 * 4  # together: the epoch, up to what drop_last leaves out


# --- what is refused, and preparation that is interrupted --------------------------------------------------


def test_a_directory_not_prepared_or_prepared_in_another_version_is_refused(prepared, tmp_path):
    with pytest.raises(ConfigError, match=r"datamodule.path=.*missing: no such directory; prepare it with"):
        shards(tmp_path / "missing")
    (tmp_path / "raw").mkdir()
    with pytest.raises(ConfigError, match=r"not a prepared shard directory, it has no pretune.json; prepare it"):
        shards(tmp_path / "raw")
    old = tmp_path / "old"
    old.mkdir()
    (old / META).write_text(json.dumps({"format": "pretune-shards", "version": 0, "kind": "image_folder"}))
    with pytest.raises(ConfigError, match=r"prepared as pretune-shards version 0, this pretune reads .* version 2;"):
        shards(old)
    with pytest.raises(ConfigError, match=r"datamodule.path=local:.*: no pretune.json could be read there"):
        shards(f"local:{tmp_path / 'raw'}", cache_dir=str(tmp_path / "cache"))
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(20)))
    prepare("text", out=str(tmp_path / "text"), file=str(text), workers=1)
    with pytest.raises(ConfigError, match=r"holds text shards; datamodule=shards streams images"):
        shards(tmp_path / "text")
    with pytest.raises(ConfigError, match=r"out=.*shards exists: allowed is a new directory \(or overwrite=true"):
        prepare("image_folder", out=str(prepared), root=str(prepared.parent / "shard_images"))


def test_a_killed_preparation_leaves_nothing_that_reads_as_prepared(tmp_path):
    root = write_folder(tmp_path / "images", n=8)
    out = tmp_path / "shards"
    kill = (
        "import os, signal, sys; import datamodules.loading.prepare as p; written = p._check_written\n"
        "def then_die(directory, expected):\n"
        "    written(directory, expected)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)  # killed once the first split is on disk\n"
        "p._check_written = then_die\n"
        "p.prepare('image_folder', out=sys.argv[1], root=sys.argv[2], workers=1)"
    )
    killed = subprocess.run([sys.executable, "-c", kill, str(out), str(root)], cwd=ROOT, capture_output=True)
    assert killed.returncode == -9
    assert not out.exists() and [p.name for p in tmp_path.glob(".shards.partial-*")]
    with pytest.raises(ConfigError, match=r"no such directory"):
        shards(out)
    out.mkdir()  # a user creating the directory by hand: still not prepared, and the interrupted attempt is named
    with pytest.raises(ConfigError, match=r"an interrupted preparation left \.shards\.partial-\d+: run it again"):
        shards(out)
    out.rmdir()

    import litdata

    calls = {"n": 0}
    real = litdata.optimize

    def fails_on_the_second_split(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    litdata.optimize = fails_on_the_second_split
    try:
        with pytest.raises(KeyboardInterrupt):
            prepare("image_folder", out=str(out), root=str(root), workers=1)
    finally:
        litdata.optimize = real
    assert not out.exists() and len(list(tmp_path.glob(".shards.partial-*"))) == 1  # its own partial: removed
    prepare("image_folder", out=str(out), root=str(root), workers=1)
    assert shards(out).meta["splits"]["train"] == 16


def test_bad_images_stop_the_preparation_naming_them_or_are_left_out(tmp_path):
    root = write_folder(tmp_path / "images", n=10)
    bad = _corrupt(root)
    with pytest.raises(ConfigError, match=r"cannot read image train/bee/010_truncated.jpg \(OSError: .*on_bad_sample"):
        prepare("image_folder", out=str(tmp_path / "a"), root=str(root), workers=1)
    assert not (tmp_path / "a").exists()
    out = prepare("image_folder", out=str(tmp_path / "b"), root=str(root), workers=1, on_bad_sample="skip")
    meta = json.loads((out / META).read_text())
    assert meta["skipped"] == [str(bad.relative_to(root))] and sum(meta["splits"].values()) == 30


def test_text_and_image_text_tables_are_prepared_with_raw_text(tmp_path):
    from litdata import StreamingDataset

    rows = [{"text": f"sentence number {i}", "label": ["neg", "pos"][i % 2]} for i in range(40)]
    jsonl = tmp_path / "reviews.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = prepare("text", out=str(tmp_path / "reviews"), file=str(jsonl), label_column="label", workers=1)
    meta = json.loads((out / META).read_text())
    assert meta["kind"] == "text" and meta["classes"] == ["neg", "pos"] and sum(meta["splits"].values()) == 40
    items = [StreamingDataset(str(out / "train"))[i] for i in range(meta["splits"]["train"])]
    assert all(rows[int(x["text"].split()[-1])]["label"] == meta["classes"][x["label"]] for x in items)

    images = tmp_path / "pairs"
    images.mkdir()
    lines = ["image,caption,split"]
    for i in range(12):
        Image.fromarray(np.full((8, 10, 3), i * 20, dtype=np.uint8)).save(images / f"{i}.png")
        lines.append(f"pairs/{i}.png,a picture of {i},{['train', 'train', 'val', 'test'][i % 4]}")
    (images / "3.png").write_bytes(b"not an image")
    table = tmp_path / "pairs.csv"
    table.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=r"file=.*pairs.csv: cannot read image pairs/3.png \(UnidentifiedImageError"):
        prepare("image_text", out=str(tmp_path / "p"), file=str(table), text_column="caption", workers=1)
    options = dict(file=str(table), text_column="caption", workers=1, on_bad_sample="skip")
    out = prepare("image_text", out=str(tmp_path / "pairs_shards"), **options)
    meta = json.loads((out / META).read_text())
    assert meta["splits"] == {"train": 6, "val": 3, "test": 2} and meta["skipped"] == ["pairs/3.png"]
    item = StreamingDataset(str(out / "val"))[0]
    assert item["text"] == "a picture of 2" and bytes(item["image"]).startswith(b"\x89PNG")
    with pytest.raises(ConfigError, match=r"file=.*pairs.csv: no column 'text'; the columns are \['caption', 'image'"):
        prepare("text", out=str(tmp_path / "t"), file=str(table))


def test_the_command_line_answers_a_mistake_in_one_line(tmp_path):
    cmd = [sys.executable, "scripts/prepare_data.py"]
    for args, line in [
        (["image_folder", f"root={tmp_path}"], "error: out is not set"),
        (["videos", f"out={tmp_path / 'x'}"], "error: kind='videos' is unknown: allowed are image_folder, text"),
        (["image_folder", "workers=two"], "error: workers='two' is invalid: allowed is int"),
        (["image_folder", f"root={tmp_path}", f"out={tmp_path / 'x'}"], f"error: root={tmp_path}: no train/"),
    ]:
        result = subprocess.run(cmd + args, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and result.stderr.startswith(line), (args, result.stderr)
        assert result.stderr.count("\n") == 1
