"""The transfer study's figure: the accuracy panel's range shows the spread (not 0-100), every label sits above its
whiskers and seeds, and the gains it draws are the per-seed paired differences, by hand."""

from __future__ import annotations

import pytest

from lightning_modules.reports.transfer import _accuracy_range, _plot, _top, select_and_summarise


def _rows() -> list[dict]:
    accuracies = {"scratch": (0.93, 0.92, 0.94), "full_finetune": (0.95, 0.955, 0.96)}
    return [
        {
            "label_fraction": 0.05,
            "strategy": name,
            "pretrained": name != "scratch",
            "lr": 1e-3,
            "seed": seed,
            "val_acc": acc,
            "test_acc": acc,
            "trainable": 1,
            "frozen_groups": "",
            "forgetting": "",
        }
        for name, per_seed in accuracies.items()
        for seed, acc in enumerate(per_seed)
    ]


def test_gains_are_paired_by_seed_and_the_range_shows_a_two_point_difference(tmp_path):
    summary = select_and_summarise(_rows(), baseline="scratch")
    finetune = next(s for s in summary if s["strategy"] == "full_finetune")
    assert finetune["gain_per_seed"] == pytest.approx({0: 0.02, 1: 0.035, 2: 0.02})
    assert finetune["gain"] == pytest.approx((0.02 + 0.035 + 0.02) / 3)
    low, high = _accuracy_range(summary)
    assert 85 < low < 92 and 96 < high <= 101.5  # 92..96 fills most of the axis, not a sliver of 0..100
    assert all(low <= 100 * v <= high for s in summary for v in s["per_seed"].values())
    assert all(_top(s) >= 100 * (s["test_acc"] + s["test_std"]) for s in summary)  # labels go above this
    _plot(summary, tmp_path / "transfer.png", "title")
    assert (tmp_path / "transfer.png").stat().st_size > 10_000


def test_the_study_estimates_the_time_left_from_the_finished_runs():
    from pretune.commands.transfer_study import time_left

    assert time_left(elapsed=120.0, done=4, total=10) == "~3 min 00 s left"  # 30 s a run, 6 left
    assert time_left(elapsed=10.0, done=2, total=5) == "~15 s left"
    assert time_left(elapsed=10.0, done=5, total=5) == "done"
