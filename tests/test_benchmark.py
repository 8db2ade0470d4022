"""The benchmark in its tiny mode: it writes the whole table, and its two loops train the same model.

No timing is asserted: on shared CPUs the numbers mean nothing at this size.
"""

from __future__ import annotations

import json

import pytest

from scripts import benchmark


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
