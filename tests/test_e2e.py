"""End to end on a tiny budget, through the real scripts: pre-train -> backbone/ -> fine-tune, a multirun,
and the main job's transfer study."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import yaml
from hydra import compose, initialize_config_dir

from tests.conftest import CONF, ROOT
from tests.wandb_log import read_offline_run

pytestmark = pytest.mark.slow
TINY = ["debug=limit", "trainer.enable_progress_bar=false", "logger=csv"]


def _script(name: str, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, f"scripts/{name}.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_pretrain_then_finetune_through_the_scripts(tmp_path):
    pre = tmp_path / "pre"
    _script("pretrain", "objective=mae", "model=vit_micro", "datamodule=digits", *TINY, f"hydra.run.dir={pre}")
    metrics = json.loads((pre / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["stage"] == "pretrain"
    assert metrics["train/loss"] > 0 and metrics["val/loss"] > 0
    # The feature monitor, on by default: k-NN and the online probe on MAE's features (the digits' labels)
    assert 0 <= metrics["val/knn_acc"] <= 1 and 0 <= metrics["val/probe_acc"] <= 1
    assert (pre / "backbone" / "model.safetensors").is_file() and (pre / "checkpoints" / "last.ckpt").is_file()
    meta = yaml.safe_load((pre / "backbone" / "config.yaml").read_text())
    assert meta["name"] == "vit_tiny_patch16_224" and meta["layer_groups"][0] == "stem"
    assert yaml.safe_load((pre / "config.yaml").read_text())["objective"]["mask_ratio"] == 0.75

    ft = tmp_path / "ft"
    _script("finetune", "datamodule=digits", f"model.init={pre}", "freeze.layers=2", *TINY, f"hydra.run.dir={ft}")
    m = json.loads((ft / "metrics.json").read_text())
    assert m["status"] == "ok"
    for key in ("train/loss", "val/acc", "val/f1", "test/acc", "test/f1", "val/acc_best"):
        assert 0 <= m[key] <= 10, key
    # stem + blocks.0 of vit_micro are frozen: patch embedding, tokens and one transformer block.
    assert m["params/frozen"] > 0 and m["params/trainable"] > m["params/frozen"]
    assert (ft / "checkpoints" / "best.ckpt").is_file() and (ft / "csv" / "metrics.csv").is_file()


def test_multirun_writes_one_complete_run_dir_per_job(tmp_path):
    _script("finetune", "-m", "freeze.layers=0,all", "model=resnet_micro", *TINY, f"hydra.sweep.dir={tmp_path}")
    runs = sorted(p for p in tmp_path.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in runs] == ["0", "1"]
    frozen = [json.loads((p / "metrics.json").read_text())["params/frozen"] for p in runs]
    assert frozen[0] == 0 and frozen[1] > 0


def test_failed_job_is_recorded_and_exits_2(tmp_path):
    result = subprocess.run(
        [sys.executable, "scripts/finetune.py", "freeze.layers=99", *TINY, f"hydra.run.dir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2
    assert "freeze.layers=99 is out of range: the backbone has 5 layer groups" in result.stderr
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "failed"


def test_transfer_study_on_a_tiny_budget(tmp_path):
    from pretune.commands.transfer_study import study

    overrides = [
        "seeds=[0,1]",
        'pretrain=["objective=simclr","trainer.max_epochs=1","datamodule.batch_size=128","trainer.limit_train_batches=2"]',
        'finetune=["datamodule.batch_size=16","trainer.max_epochs=2"]',
        "strategies.scratch.lrs=[1e-3,3e-3]",
        "strategies.linear_probe.lrs=[1e-2]",
        "strategies.full_finetune.lrs=[1e-3]",
        "~strategies.first_4",
        "~strategies.full_layer_decay",
        "strategies.first_2.lrs=[1e-3]",
        "strategies.gradual.lrs=[1e-3]",
        'strategies.gradual.overrides=["freeze=gradual","freeze.every=1"]',
        "strategies.lp_ft.lrs=[1e-2]",
        "strategies.lora.lrs=[1e-2]",
        'strategies.lp_ft.overrides=["freeze=lp_ft","freeze.probe_epochs=1","finetune.measure_forgetting=true"]',
        "label_fractions=[0.05]",
        "~strategies.imagenet_lora",
        "strategies.imagenet_probe.lrs=[1e-2]",
        'strategies.imagenet_probe.overrides=["model=efficientnet_lite0_imagenet","model.input_size=16",'
        '"freeze.layers=all","datamodule.augment=null"]',
    ]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="transfer_study", overrides=overrides)
        report = study(cfg, tmp_path)
    text = report.read_text()
    assert "| scratch | random |" in text and "| linear_probe | pre-trained |" in text
    assert (tmp_path / "transfer.png").stat().st_size > 1000
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert len(rows) == (2 + 1 + 1 + 1 + 1 + 1 + 1 + 1) * 2
    assert {r["strategy"] for r in rows} == {
        *("scratch", "linear_probe", "full_finetune", "first_2", "gradual", "lp_ft", "lora", "imagenet_probe")
    }
    assert "| 5% | imagenet_probe | ImageNet |" in text and "(best ImageNet strategy on validation)" in text
    assert all(float(r["forgetting"]) != 0 for r in rows if r["strategy"] == "full_finetune")
    assert all(r["forgetting"] != "" for r in rows if r["strategy"] == "lp_ft")  # recorded (0 if the probe won)
    assert all(r["forgetting"] == "" for r in rows if r["strategy"] == "scratch")
    assert (tmp_path / "freeze_depth.png").stat().st_size > 1000  # points at 0, 2 and all frozen groups
    assert "| 5% | lp_ft | pre-trained |" in text and "| 5% | lora | pre-trained |" in text
    lora = [r for r in rows if r["strategy"] == "lora"]  # a fraction of the backbone trained, forgetting measured
    assert all(r["forgetting"] != "" and 5 * int(r["trainable"]) < int(r["frozen"]) for r in lora)
    assert (tmp_path / "pretrain" / "backbone" / "model.safetensors").is_file()


def test_debug_fast_runs_one_batch_of_each_loop_in_process(cfg_factory):
    from lightning_modules.runtime.run import run

    metrics = run(cfg_factory("finetune", "debug=fast", "model=resnet_micro"))
    assert metrics["status"] == "ok" and "test/acc" in metrics and "train/loss" in metrics


def test_callbacks_none_writes_no_checkpoint_and_tests_the_final_weights(cfg_factory, tmp_path):
    from lightning_modules.runtime.run import run

    metrics = run(cfg_factory("finetune", "debug=limit", "model=resnet_micro", "callbacks=none", name="bare"))
    assert metrics["status"] == "ok" and "test/acc" in metrics
    assert "best_checkpoint" not in metrics and "val/acc_best" not in metrics
    assert not (tmp_path / "bare" / "checkpoints").exists()  # Lightning adds none of its own either


def test_a_bad_value_is_recorded_as_failed_before_any_training(tmp_path):
    result = subprocess.run(
        [sys.executable, "scripts/finetune.py", "optimizer.lr=-1", f"hydra.run.dir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "optimizer.lr=-1 is out of range" in result.stderr
    recorded = json.loads((tmp_path / "metrics.json").read_text())
    assert recorded["status"] == "failed" and "optimizer.lr" in recorded["error"]


def test_a_diverging_run_stops_naming_the_step_and_the_sweep_goes_on(tmp_path):
    # lr=1e6 with SGD blows the loss up within a few steps; the second job is healthy.
    result = subprocess.run(
        [
            sys.executable,
            "scripts/finetune.py",
            "-m",
            "optimizer=sgd",
            "optimizer.lr=1e6,0.01",
            "model=resnet_micro",
            *TINY,
            f"hydra.sweep.dir={tmp_path}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    first = json.loads((tmp_path / "0" / "metrics.json").read_text())
    second = json.loads((tmp_path / "1" / "metrics.json").read_text())
    assert first["status"] == "failed" and "train/loss became" in first["error"] and "at step" in first["error"]
    assert second["status"] == "ok"


def test_report_turns_a_partial_sweep_into_tables_and_plots(tmp_path):
    sweep = tmp_path / "sweep"
    _script(
        "finetune",
        "-m",
        "optimizer.lr=1e-3,1e-2",
        "freeze.layers=0,all",
        "model=resnet_micro",
        *TINY,
        f"hydra.sweep.dir={sweep}",
    )
    (sweep / "3" / "metrics.json").unlink()  # a job still running: the report must not drop it
    out = _script("report", str(sweep), "--wandb")
    assert f"Report: {sweep / 'report' / 'report.md'}" in out.stdout
    rows = list(csv.DictReader((sweep / "report" / "runs.csv").open()))
    assert [r["run"] for r in rows] == ["0", "1", "2", "3"]
    assert {(r["optimizer.lr"], r["freeze.layers"]) for r in rows} == {
        ("0.001", "0"),
        ("0.001", "all"),
        ("0.01", "0"),
        ("0.01", "all"),
    }
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "missing"]
    text = (sweep / "report" / "report.md").read_text()
    best = max(rows[:3], key=lambda r: float(r["val/acc_best"]))
    assert f"**Best:** `optimizer.lr={best['optimizer.lr']} freeze.layers={best['freeze.layers']}`" in text
    for png in ("optimizer.lr.png", "freeze.layers.png", "heatmap.png"):
        assert (sweep / "report" / png).stat().st_size > 1000
    # --wandb: the same table and plots as a W&B run of the sweep's group (offline here).
    logged = read_offline_run(sweep / "report")
    assert logged["job_type"] == "report" and logged["group"] == "sweep"
    assert {"report/runs", "report/heatmap", "report/optimizer.lr", "report/freeze.layers"} <= logged["history_keys"]
    images = {k: v for row in logged["history"] for k, v in row.items() if k.startswith("report/")}
    assert images["report/heatmap"]["_type"] == "image-file" and images["report/runs"]["_type"] == "table-file"
    assert (
        next((sweep / "report" / "wandb").glob("offline-run-*")) / "files" / images["report/heatmap"]["path"]
    ).is_file()
    missing = subprocess.run(
        [sys.executable, "scripts/report.py", str(tmp_path / "nothing")], cwd=ROOT, capture_output=True, text=True
    )
    assert missing.returncode == 2 and "is not a directory" in missing.stderr


def test_finetune_on_a_users_image_folder(tmp_path):
    from tests.test_datamodules import _write_images

    for split, n in (("train", 8), ("val", 3), ("test", 3)):
        _write_images(tmp_path / "data", split, ["cats", "dogs", "owls"], n=n, size=20)
    run_dir = tmp_path / "run"
    _script(
        "finetune",
        "datamodule=image_folder",
        f"datamodule.root={tmp_path / 'data'}",
        "datamodule.batch_size=8",
        "model=resnet_micro",
        *TINY,
        f"hydra.run.dir={run_dir}",
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "ok" and 0 <= metrics["test/acc"] <= 1
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["model"]["kwargs"]["in_chans"] == 3  # RGB folders feed a 3-channel backbone
