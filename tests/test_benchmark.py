"""The benchmark in its tiny mode: it writes the whole table, and its two loops train the same model.

No timing is asserted: on shared CPUs the numbers mean nothing at this size.
"""

from __future__ import annotations

import json

import pytest

from pretune.commands import benchmark


def test_tiny_benchmark_writes_every_row_and_both_loops_train_the_same_model(tmp_path):
    table = benchmark.benchmark(
        epochs=1, repeats=1, batches_per_epoch=3, memory=False, with_startup=False, out_root=tmp_path
    )
    text = table.read_text()
    for case in benchmark.CASES:
        assert f"| {case} | 3 |" in text
    results = json.loads((table.parent / "results.json").read_text())
    for case, runs in results.items():
        plain, pretune = runs["plain"][0], runs["pretune"][0]
        assert plain["steps"] == pretune["steps"] == 3
        # Same initial weights, batches, augmentation and masks, optimizer and schedule: the same last loss.
        assert pretune["loss"] == pytest.approx(plain["loss"], rel=1e-4), case


def test_overhead_mode_times_the_same_segments_in_both_loops():
    lines = benchmark.overhead(
        "finetune: resnet_micro", repeats=1, epochs=1, overrides=("datamodule.train_batches_per_epoch=4",)
    )
    rows = {line.split(" | ")[0].strip("| "): line for line in lines if line.startswith("| ") and "plain" not in line}
    assert list(rows) == ["forward", "backward", "rest of the step", "step", "per epoch beyond its steps"]
    for name in ("forward", "backward", "step"):  # both loops were timed: positive, and the wrappers are gone
        plain, pretune = (float(cell) for cell in rows[name].split(" | ")[1:3])
        assert plain > 0 and pretune > 0, name
    from datamodules.transforms.augment import BatchAugment

    assert BatchAugment.forward.__name__ == "forward"


def test_gpu_benchmark_logic_runs_on_the_cpu_in_tiny_mode(tmp_path):
    # The GPU table's code path (hand loop with data placed, FLOP count, peak, per-epoch clock, checkpoint timer,
    # compilation) on a tiny compiled case and the text case; both loops train the same model.
    tiny = {c: benchmark.TINY_CASES[c] for c in ("fine-tune vit_micro, compiled", "MLM pre-train bert_micro (text)")}
    original = benchmark.TINY_CASES
    benchmark.TINY_CASES = tiny
    try:
        table = benchmark.gpu_benchmark(tiny=True, repeats=1, out_root=tmp_path)
    finally:
        benchmark.TINY_CASES = original
    text = table.read_text()
    assert all(f"| {case} |" in text for case in tiny)
    results = json.loads((table.parent / "results.json").read_text())
    for case, res in results.items():
        hand, pretune = res["hand"][0], res["pretune"][0]
        assert pretune["loss"] == pytest.approx(hand["loss"], rel=1e-4), case
        assert len(hand["epochs"]) == len(pretune["epochs"]) == 2 and res["flops_per_image"] > 0
        assert pretune["checkpoints"] >= 2  # last.ckpt each epoch, timed
    assert results["fine-tune vit_micro, compiled"]["pretune"][0]["compile_s"] > 0
    # LoRA against full fine-tuning of the same backbone (issue 22's GPU case), its own table below the main one
    lora = json.loads((table.parent / "lora.json").read_text())["vit_micro"]
    full_trained, lora_trained = (lora[v][0]["metrics"]["params/trainable"] for v in ("full", "lora"))
    assert 0 < lora_trained < full_trained / 5
    assert "| vit_micro |" in text.split("freeze=lora (rank 8")[1] and f"{full_trained:,} / {lora_trained:,}" in text


def test_gpu_benchmark_without_a_gpu_says_so_in_one_line():
    import subprocess
    import sys

    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    result = subprocess.run(
        [sys.executable, "scripts/benchmark.py", "--device", "cuda"], cwd=benchmark.ROOT, capture_output=True, text=True
    )
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [
        "error: --device cuda: torch sees no CUDA GPU here (torch.cuda.is_available() is False)"
    ]


@pytest.mark.slow
def test_the_streaming_throughput_table_measures_every_loader_against_a_training_step(tmp_path):
    from pretune.commands import bench_streaming

    lines = bench_streaming.throughput(
        tmp_path, images=192, workers=[1, 2], model="test_vit", device="cpu", train_batch=2, repeats=1
    )
    rows = [line for line in lines if line.startswith("| ") and "worker" in line]
    assert len(rows) == 4  # 1 and 2 workers, with and without RandAugment
    for row in rows:
        folder, shards = (float(cell) for cell in row.split(" | ")[1:3])
        assert folder > 0 and shards > 0, row
