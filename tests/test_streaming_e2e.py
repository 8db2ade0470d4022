"""Streaming runs end to end, through the scripts: killed in the middle of an epoch and resumed with
``ckpt_path=last``, a run ends with the weights of the run never interrupted; a corrupt image in the middle of
an epoch is one line naming it (or, with ``on_bad_sample=skip``, a count in metrics.json); which path the
data took is printed once and kept in config.yaml."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from datamodules.loading.prepare import prepare
from tests.conftest import ROOT
from tests.test_streaming import _corrupt, write_folder

# Checkpoints every 2 steps: with 5 batches an epoch, some of them fall in the middle of an epoch.
EVERY_2_STEPS = ["callbacks.last_checkpoint.every_n_train_steps=2"]
COMMON = [
    "datamodule.image_size=16",
    "datamodule.batch_size=8",
    "datamodule.num_workers=2",
    "datamodule.augment.auto_augment=randaugment",
    "trainer.max_epochs=4",
    "trainer.enable_progress_bar=false",
    "logger=csv",
]


def _launch(script: str, args: list[str], run_dir, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, f"scripts/{script}.py", *args, *extra, f"hydra.run.dir={run_dir}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _weights(run_dir) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.slow
@pytest.mark.parametrize("source", ["image_folder", "shards"])
def test_a_streaming_run_killed_mid_epoch_resumes_to_the_uninterrupted_result(tmp_path, source):
    """Fine-tuning on a streamed folder, and MAE pre-training (random masks) on litdata shards: SIGKILLed in
    epoch 2 after a checkpoint at its second step, relaunched with ckpt_path=last: the same final weights."""
    images = write_folder(tmp_path / "images", n=20)
    if source == "image_folder":
        script, args = "finetune", ["model=resnet_micro", "datamodule=image_folder", f"datamodule.root={images}"]
        args.append("datamodule.loading=stream")
        keys = ("train/loss", "val/acc", "val/acc_best", "test/acc", "test/loss", "steps")
    else:
        shards = prepare("image_folder", out=str(tmp_path / "shards"), root=str(images), workers=1)
        script, args = "pretrain", ["objective=mae", "model=vit_micro", "datamodule=shards"]
        args.append(f"datamodule.path={shards}")
        keys = ("train/loss", "val/loss", "val/loss_best", "steps")
    args += COMMON + EVERY_2_STEPS

    full = _launch(script, args, tmp_path / "full")
    output = full.communicate(timeout=600)[0]
    assert full.returncode == 0, output[-3000:]
    assert output.count("data: datamodule=") == 1 and "streamed" in output  # which path: printed once ...
    record = json.loads((tmp_path / "full" / "run.json").read_text())
    assert record["data"]["loading"] == "stream"  # ... and recorded in the run record

    marker = tmp_path / "mid-epoch"
    pause = ["+callbacks.pause._target_=tests.helpers.PauseAt", "+callbacks.pause.epoch=2"]
    pause += ["+callbacks.pause.batch=3", f"+callbacks.pause.marker={marker}"]
    killed = _launch(script, args, tmp_path / "cut", *pause)
    deadline = time.time() + 600
    while not marker.exists():
        assert killed.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.2)
    os.kill(killed.pid, signal.SIGKILL)
    assert killed.wait(timeout=60) == -signal.SIGKILL
    ckpt = torch.load(tmp_path / "cut" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert (ckpt["epoch"], ckpt["global_step"]) == (2, 12)  # written two batches into epoch 2 (5 batches an epoch)

    resumed = _launch(script, args, tmp_path / "cut", "ckpt_path=last")
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output[-3000:]
    assert "Restoring states from the checkpoint path at" in output
    assert "dataloader is not resumable" not in output
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    full_metrics, resumed_metrics = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("full", "cut"))
    for key in keys:
        assert resumed_metrics[key] == full_metrics[key], key


@pytest.mark.slow
def test_a_corrupt_image_mid_epoch_is_one_line_or_a_count_in_metrics(tmp_path):
    images = write_folder(tmp_path / "images", n=20)
    bad = _corrupt(images)
    args = ["model=resnet_micro", "datamodule=image_folder", f"datamodule.root={images}"]
    args += ["datamodule.loading=stream", *COMMON, "trainer.max_epochs=1", "logger=none"]
    stopped = subprocess.run(
        [sys.executable, "scripts/finetune.py", *args, f"hydra.run.dir={tmp_path / 'stop'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert stopped.returncode == 2, stopped.stderr[-3000:]
    assert stopped.stderr.startswith(f"error: datamodule.root={images}: cannot read image {bad} (OSError: ")
    assert stopped.stderr.count("\n") == 1
    assert json.loads((tmp_path / "stop" / "metrics.json").read_text())["status"] == "failed"
    skipped = subprocess.run(
        [sys.executable, "scripts/finetune.py", *args, "datamodule.on_bad_sample=skip", f"hydra.run.dir={tmp_path}/ok"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    metrics = json.loads((tmp_path / "ok" / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["data/skipped_samples"] >= 1
    assert f"warning: datamodule.root={images}: skipped unreadable image {bad}" in skipped.stderr


@pytest.mark.slow
def test_a_streamed_folder_on_two_ddp_processes_matches_one_process_on_the_same_global_batch(tmp_path):
    from tests.test_ddp import TINY, _max_difference, _script, _weights

    # 66 images: val and test hold 10 each, 5 per rank. (With an odd split, 5 + 4, the eval losses of 2 ranks
    # differ from one process's on the in-memory path too: see the report.)
    images = write_folder(tmp_path / "images", n=22)
    common = [*TINY, "logger=none", "datamodule=image_folder", f"datamodule.root={images}"]
    common += ["datamodule.loading=stream", "datamodule.image_size=16", "datamodule.num_workers=1"]
    _script("finetune", *common, "datamodule.batch_size=8", f"hydra.run.dir={tmp_path / 'one'}")
    _script("finetune", *common, "datamodule.batch_size=4", "trainer=ddp", f"hydra.run.dir={tmp_path / 'two'}")
    one, two = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert one["status"] == two["status"] == "ok" and one["steps"] == two["steps"] == 3 * one["epochs"]
    for key in ("train/loss", "val/loss", "test/loss", "test/acc"):
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), key
    assert _max_difference(_weights(tmp_path / "one"), _weights(tmp_path / "two")) < 5e-5
