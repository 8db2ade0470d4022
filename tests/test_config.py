"""Every config group option composes; the command line answers fast and reports mistakes in one line."""

from __future__ import annotations

import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from tests.conftest import CONF, ROOT, make_cfg

GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name not in ("hydra", "paths"))


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


CASES = [
    (stage, g, o)
    for stage in ("pretrain", "finetune")
    for g in GROUPS
    for o in _options(g)
    if not (stage == "pretrain" and g == "freeze")
]  # freezing is a fine-tuning group


@pytest.mark.parametrize(("stage", "group", "option"), CASES, ids=["-".join(c) for c in CASES])
def test_every_group_option_composes(stage, group, option, tmp_path):
    cfg = make_cfg(stage, [f"{group}={option}"], tmp_path)
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    assert resolved["stage"] == stage
    if group not in ("experiment", "debug", "logger", "callbacks", "hparams_search"):  # these add to others
        assert resolved[group] is not None


def test_user_facing_names_exist(tmp_path):
    cfg = make_cfg(
        "finetune",
        [
            "model.init=none",
            "freeze.layers=2",
            "datamodule.batch_size=16",
            "datamodule.label_fraction=0.1",
            "optimizer.lr=0.01",
            "trainer.max_epochs=3",
            "seed=7",
            "logger=csv",
        ],
        tmp_path,
    )
    assert (cfg.model.init, cfg.freeze.layers, cfg.datamodule.batch_size) == ("none", 2, 16)
    assert (cfg.datamodule.label_fraction, cfg.optimizer.lr, cfg.trainer.max_epochs, cfg.seed) == (
        0.1,
        0.01,
        3,
        7,
    )
    assert cfg.datamodule.label_seed == 7  # the labeled subset follows the seed
    assert "csv" in cfg.logger


def _cli(*args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "scripts/finetune.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_help_and_cfg_job_answer_without_training():
    help_ = _cli("--help")
    assert help_.returncode == 0 and "freeze: first_n, gradual, linear_probe, lp_ft, none" in help_.stdout
    job = _cli("--cfg", "job", "freeze.layers=3")
    assert job.returncode == 0
    assert OmegaConf.create(job.stdout).freeze.layers == 3


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("optimizer.lr=0", "optimizer.lr=0 is out of range"),
        ("optimizer.lr=-1e-3", "optimizer.lr=-0.001 is out of range"),
        ("datamodule.batch_size=0", "datamodule.batch_size=0 is out of range"),
        ("datamodule.label_fraction=1.5", "datamodule.label_fraction=1.5 is out of range"),
        ("datamodule.label_fraction=0", "datamodule.label_fraction=0 is out of range"),
        ("freeze.layers=-1", "freeze.layers=-1 is out of range"),
        ("freeze.layers=some", "freeze.layers='some' is invalid"),
        ("model.init=/no/such/dir", "model.init=/no/such/dir: no such path"),
        ("datamodule=image_folder", "datamodule.root is required"),
    ],
)
def test_bad_values_give_one_clear_line(override, needle, tmp_path):
    result = _cli(override, f"hydra.run.dir={tmp_path}")
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert needle in lines[0]


def test_unknown_key_and_option_are_refused():
    unknown_key = _cli("optimizer.lrr=0.1")
    assert unknown_key.returncode != 0 and "lrr" in unknown_key.stderr
    unknown_option = _cli("model=vit_gigantic")
    assert unknown_option.returncode != 0 and "vit_micro" in unknown_option.stderr  # lists the options


def test_the_modality_tables_agree_with_the_classes():
    """config/modalities.py answers before torch is imported; the classes are what a run builds."""
    import importlib

    from lightning_modules.config.modalities import BACKBONE_TYPES, DATAMODULES, OBJECTIVE_TEXT_KINDS, OBJECTIVES

    def cls(target):
        module, name = target.rsplit(".", 1)
        return getattr(importlib.import_module(module), name)

    for type_, (target, modality) in BACKBONE_TYPES.items():
        assert (cls(target).type, cls(target).modality) == (type_, modality), target
    for target, modality in DATAMODULES.items():
        assert cls(target).modality == modality, target
    for target, modalities in OBJECTIVES.items():
        assert tuple(cls(target).modalities) == modalities, target
        assert cls(target).text_kind == OBJECTIVE_TEXT_KINDS.get(target), target
    # every shipped datamodule and objective config is in the tables
    from omegaconf import OmegaConf

    for group, table in (("datamodule", DATAMODULES), ("objective", OBJECTIVES)):
        for path in (CONF / group).glob("*.yaml"):
            target = OmegaConf.load(path).get("_target_")
            assert target is None or target in table, f"{group}/{path.name}: {target} is not in config/modalities.py"


def test_an_unknown_model_type_is_one_line(tmp_path):
    from lightning_modules.config.check import check_config
    from lightning_modules.core.errors import ConfigError

    allowed = r"\['dual_encoder', 'timm', 'transformers'\]"
    with pytest.raises(ConfigError, match=rf"model.type=foo is unknown: allowed are {allowed}"):
        check_config(make_cfg("finetune", ["model.type=foo"], tmp_path))
