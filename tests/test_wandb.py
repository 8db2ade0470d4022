"""W&B offline runs, read back from the files they wrote: the run's identity, the resolved config,
the history and summary, the backbone artifact; and ``model.init=wandb:...`` without a server."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from lightning_modules.backbones.handoff import sha256_of
from lightning_modules.core.errors import ConfigError
from lightning_modules.core.locations import WEIGHTS
from lightning_modules.runtime.run import run
from tests.wandb_log import read_offline_run

TINY = [
    "debug=limit",
    "trainer.log_every_n_steps=1",
    "logger=wandb",
    "model=vit_micro",
    "datamodule=digits",
    "datamodule.batch_size=32",
]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    from tests.conftest import make_cfg

    out = tmp_path_factory.mktemp("wandb") / "pre"
    import os

    os.environ["WANDB_MODE"] = "offline"  # module-scoped: the autouse env fixture is per test
    try:
        metrics = run(make_cfg("pretrain", [*TINY, "objective=mae"], out))
    finally:
        os.environ.pop("WANDB_MODE")
    return out, metrics


def test_pretraining_run_records_identity_config_history_summary_and_backbone_artifact(pretrained):
    out, metrics = pretrained
    logged = read_offline_run(out)
    assert logged["job_type"] == "pretrain" and logged["tags"] == ["pretrain", "vit_tiny_patch16_224"]
    assert logged["name"] == out.name  # not under paths.log_dir: named by its directory
    config = {k: v for k, v in logged["config"].items() if k not in ("_wandb", "run")}
    assert config == yaml.safe_load((out / "config.yaml").read_text())  # the resolved config, whole
    assert logged["config"]["run"] == json.loads((out / "run.json").read_text())  # and the run record
    assert config["objective"]["mask_ratio"] == 0.75 and config["stage"] == "pretrain"
    assert {"train/loss_step", "train/loss_epoch", "val/loss", "epoch"} <= logged["history_keys"]
    assert logged["summary"]["val/loss"] == pytest.approx(metrics["val/loss"])
    assert logged["summary"]["params/trainable"] == metrics["params/trainable"] > 0
    (artifact,) = logged["artifacts"]
    assert artifact["name"] == "backbone-vit_tiny_patch16_224-mae" and artifact["type"] == "model"
    assert "latest" in artifact["aliases"] and {WEIGHTS, "config.yaml"} <= set(artifact["files"])


def test_finetune_run_records_its_backbone_source_and_per_group_lr_and_frozen_flags(pretrained, cfg_factory):
    pre, _ = pretrained
    cfg = cfg_factory("finetune", *TINY, f"model.init={pre}", "freeze.layers=2")
    metrics = run(cfg)
    out = Path(cfg.paths.output_dir)
    logged = read_offline_run(out)
    source = {"path": str((pre / "backbone").resolve()), "sha256": sha256_of(pre / "backbone" / WEIGHTS)}
    source["logged_as"] = "backbone-vit_tiny_patch16_224-mae"  # its pre-training logged it: lineage when online
    assert logged["config"]["run"]["weights"] == source  # the run record, in W&B and beside config.yaml
    assert json.loads((out / "run.json").read_text())["weights"] == source
    assert "source" not in yaml.safe_load((out / "config.yaml").read_text())["model"]  # config.yaml: as composed
    assert logged["job_type"] == "finetune"
    assert {"lr/stem", "lr/blocks.0", "frozen/stem", "frozen/blocks.3+norm", "val/acc"} <= logged["history_keys"]
    first = next(row for row in logged["history"] if "frozen/stem" in row)
    assert first["frozen/stem"] == 1.0 and first["frozen/blocks.3+norm"] == 0.0
    assert first["params/trainable"] == metrics["params/trainable"]
    assert logged["summary"]["test/acc"] == pytest.approx(metrics["test/acc"])
    assert logged["summary"]["params/trainable"] == json.loads((out / "metrics.json").read_text())["params/trainable"]
    assert [a["name"] for a in logged["artifacts"]] == ["model-vit_tiny_patch16_224-digits"]  # model/, no backbone


def test_runs_in_one_process_stay_separate_wandb_runs(cfg_factory):
    outs = []
    for seed in (0, 1):
        cfg = cfg_factory("finetune", *TINY, "trainer.max_epochs=1", f"seed={seed}", name=f"ft{seed}")
        run(cfg)
        outs.append(Path(cfg.paths.output_dir))
    configs = [read_offline_run(out)["config"] for out in outs]  # exactly one run under each
    assert [c["seed"] for c in configs] == [0, 1]


def test_wandb_init_offline_fails_with_one_clear_line(cfg_factory):
    cfg = cfg_factory("finetune", *TINY, "model.init=wandb:me/pretune/backbone-vit_tiny_patch16_224-mae:latest")
    with pytest.raises(ConfigError, match=r"model.init=wandb:me/.*:latest: W&B is offline \(WANDB_MODE=offline\)"):
        run(cfg)
    assert json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())["status"] == "failed"


def test_wandb_init_fetches_the_artifact_and_records_it(pretrained, cfg_factory, monkeypatch, tmp_path):
    """The W&B API replaced by a local stand-in: the artifact 'downloads' the pre-training's backbone/."""
    import wandb

    pre, _ = pretrained
    asked = []

    class Artifact:
        def download(self, root):
            shutil.copytree(pre / "backbone", root, dirs_exist_ok=True)
            return root

    class Api:
        def artifact(self, ref, type=None):
            asked.append((ref, type))
            return Artifact()

    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setattr(wandb, "Api", Api)
    monkeypatch.setattr("lightning_modules.backbones.artifacts.ARTIFACT_CACHE", tmp_path / "cache")
    ref = "me/pretune/backbone-vit_tiny_patch16_224-mae:latest"
    cfg = cfg_factory("finetune", *TINY, "logger=none", f"model.init=wandb:{ref}", "trainer.max_epochs=1")
    assert run(cfg)["status"] == "ok"
    assert asked == [(ref, "model")]
    source = json.loads((Path(cfg.paths.output_dir) / "run.json").read_text())["weights"]
    assert source["artifact"] == ref and source["sha256"] == sha256_of(pre / "backbone" / WEIGHTS)
    assert Path(source["path"]).is_relative_to(tmp_path / "cache")


def test_an_online_run_marks_the_fetched_artifact_as_its_input():
    from lightning_modules.backbones.artifacts import record_use

    class Run:
        offline, used = False, []

        def use_artifact(self, ref):
            self.used.append(ref)

    online = Run()
    record_use(online, "wandb:me/pretune/backbone-x-mae:v3")
    record_use(online, "/local/backbone")  # a local source is recorded in the config, not as an artifact
    assert online.used == ["me/pretune/backbone-x-mae:v3"]


@pytest.mark.slow
def test_a_run_resumed_with_ckpt_path_last_continues_its_wandb_run(cfg_factory):
    """The W&B run's id is in run.json; the run resumed in its dir takes it up (resume="allow") instead of starting
    another: offline, a second log under the same id, which wandb sync appends to the first. A new run gets a new id."""
    from tests.wandb_log import read_offline_runs

    stop = ["+callbacks.stop._target_=tests.helpers.StopAfter", "+callbacks.stop.epochs=1"]
    run(cfg_factory("finetune", *TINY, *stop, name="cut"))
    out = Path(cfg_factory("finetune", *TINY, name="cut").paths.output_dir)
    first = json.loads((out / "run.json").read_text())["wandb"]["id"]
    metrics = run(cfg_factory("finetune", *TINY, "ckpt_path=last", name="cut"))
    attempts = read_offline_runs(out)
    assert [a["id"] for a in attempts] == [first, first]
    assert json.loads((out / "run.json").read_text())["wandb"]["id"] == first
    steps = [{row["trainer/global_step"] for row in a["history"] if "train/loss_step" in row} for a in attempts]
    assert max(steps[0]) < min(steps[1])  # the resumed attempt logs the steps after the cut, not from 0
    assert attempts[1]["summary"]["test/acc"] == pytest.approx(metrics["test/acc"])
    run(cfg_factory("finetune", *TINY, "trainer.max_epochs=1", name="other"))
    assert read_offline_runs(out.parent / "other")[0]["id"] != first


@pytest.mark.parametrize(
    ("mode", "app_dir", "run_dir", "group"),
    [
        ("MULTIRUN", "multirun/finetune/t/3", "multirun/finetune/t/3", "multirun/finetune/t"),
        ("RUN", "transfer_study/t", "transfer_study/t/finetune/labels0.05_full", "transfer_study/t"),
        ("RUN", "finetune/t", "finetune/t", "mae_vit_digits"),
    ],
    ids=["sweep-job", "study-run", "single-run"],
)
def test_wandb_runs_are_named_by_their_dir_and_grouped_by_sweep_study_or_experiment(
    mode, app_dir, run_dir, group, tmp_path
):
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from lightning_modules.runtime.wandb_runs import run_identity
    from tests.conftest import make_cfg

    cfg = make_cfg("finetune", ["experiment=mae_vit_digits"], return_hydra=True)
    with open_dict(cfg):
        cfg.hydra.mode = mode
        cfg.hydra.sweep.dir = str(tmp_path / "multirun/finetune/t")
        cfg.hydra.runtime.output_dir = str(tmp_path / app_dir)
    HydraConfig.instance().set_config(cfg)
    try:
        assert run_identity(tmp_path, tmp_path / run_dir) == {"name": run_dir, "group": group}
    finally:
        HydraConfig.instance().cfg = None


def test_a_text_backbone_artifact_holds_its_tokenizer(cfg_factory):
    """MLM pre-training of bert_micro: the backbone artifact carries the tokenizer a fine-tune must load with the
    weights (and the transformers config), as backbone/ does."""
    cfg = cfg_factory(
        "pretrain",
        "debug=limit",
        "logger=wandb",
        "datamodule=text_corpus",
        "model=bert_micro",
        "objective=mlm",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=1",
        "trainer.limit_val_batches=1",
    )
    run(cfg)
    out = Path(cfg.paths.output_dir)
    (artifact,) = read_offline_run(out)["artifacts"]
    assert artifact["name"] == "backbone-bert-mlm" and artifact["type"] == "model"
    saved = {p.name for p in (out / "backbone").iterdir()}
    assert set(artifact["files"]) == saved
    assert {WEIGHTS, "config.yaml", "tokenizer.json", "tokenizer_config.json", "config.json"} <= saved


def test_a_hugging_face_backbone_artifact_is_named_after_the_model_not_the_preset(tmp_path):
    from lightning_modules.backbones.artifacts import artifact_name

    bert = {"name": "bert"}  # what the bert_micro preset leaves in model.name
    assert artifact_name({**bert, "init": "none"}, "objectives.mlm.MLM") == "backbone-bert-mlm"
    hub = {**bert, "init": "hf:sentence-transformers/all-MiniLM-L6-v2"}
    assert artifact_name(hub, "objectives.mlm.MLM") == "backbone-sentence-transformers_all-MiniLM-L6-v2-mlm"
    (tmp_path / "tiny-gpt").mkdir()
    local = {**bert, "init": f"hf:{tmp_path / 'tiny-gpt'}"}
    assert artifact_name(local, "objectives.clm.CLM") == "backbone-tiny-gpt-clm"
    (tmp_path / "minilm_package" / "model").mkdir(parents=True)  # a package's bundled model/ folder
    packaged = {**bert, "init": f"hf:{tmp_path / 'minilm_package' / 'model'}"}
    assert artifact_name(packaged, "objectives.mlm.MLM") == "backbone-minilm_package_model-mlm"
