"""Sweeps through the real scripts: an Optuna study kept in a database and extended, trials in
parallel with joblib, and the SLURM launcher rendering a real sbatch script (no cluster here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, make_cfg

pytestmark = pytest.mark.slow
TINY = ["debug=limit", "trainer.enable_progress_bar=false", "logger=csv", "model=resnet_micro"]


def _script(name: str, *args: str, env: dict | None = None, ok: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, f"scripts/{name}.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **(env or {})},
    )
    assert (result.returncode == 0) == ok, result.stderr[-3000:]
    return result


def _jobs(sweep_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(sweep_dir.glob("*/metrics.json"))]


def test_optuna_study_fine_tunes_one_pretraining_records_failures_and_extends_from_storage(tmp_path):
    pre = tmp_path / "pre"
    _script("pretrain", "objective=simclr", *TINY, f"hydra.run.dir={pre}")
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    common = [
        "hparams_search=finetune_optuna",
        f"model.init={pre}",
        *TINY,
        "datamodule.label_fraction=0.04",  # 50 labeled images: a batch size of 64 is a bad combination
        f"hydra.sweeper.storage={storage}",
        "hydra.sweeper.study_name=digits",
        "hydra.sweeper.sampler.n_startup_trials=2",
    ]
    _script("finetune", *common, "hydra.sweeper.n_trials=4", f"hydra.sweep.dir={tmp_path / 'first'}")
    _script("finetune", *common, "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={tmp_path / 'more'}")

    import optuna

    study = optuna.load_study(study_name="digits", storage=storage)
    assert len(study.trials) == 6 and study.direction == optuna.study.StudyDirection.MAXIMIZE
    jobs = _jobs(tmp_path / "first") + _jobs(tmp_path / "more")
    assert len(jobs) == 6
    # Each trial's value is its run's best val/acc; a failed run is a failed trial, the study went on.
    for trial in study.trials:
        sweep, num = ("first", trial.number) if trial.number < 4 else ("more", trial.number - 4)
        run_dir = tmp_path / sweep / str(num)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
        assert f"datamodule.batch_size={trial.params['datamodule.batch_size']}" in overrides
        if metrics["status"] == "ok":
            assert trial.state == optuna.trial.TrialState.COMPLETE and trial.value == metrics["val/acc_best"]
            source = json.loads((run_dir / "run.json").read_text())["weights"]
            assert source["path"] == str((pre / "backbone").resolve())
        else:
            assert trial.state == optuna.trial.TrialState.FAIL and "batch_size" in metrics["error"]
    assert {t.state for t in study.trials} == {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL}
    best = yaml.safe_load((tmp_path / "more" / "optimization_results.yaml").read_text())
    assert best["best_value"] == study.best_value and 1e-4 <= best["best_params"]["optimizer.lr"] <= 3e-2


def test_joblib_runs_jobs_in_parallel_splitting_the_cores(tmp_path):
    _script(
        "finetune",
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "seed=0,1",
        *TINY,
        f"hydra.sweep.dir={tmp_path}",
    )
    jobs = _jobs(tmp_path)
    assert [j["status"] for j in jobs] == ["ok", "ok"]
    assert [j["threads"] for j in jobs] == [max(1, (os.cpu_count() or 1) // 2)] * 2


def test_slurm_launcher_renders_the_sbatch_script_from_the_trainer(tmp_path):
    """No cluster here: a stand-in sbatch records the script submitit wrote, then refuses the job."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sbatch").write_text('#!/bin/sh\ncat "$1" > "$SBATCH_CAPTURE"\necho refused >&2\nexit 1\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    capture = tmp_path / "job.sbatch"
    args = [
        "-m",
        "hydra/launcher=slurm",
        "hydra.launcher.partition=gpu",
        "trainer=gpu",
        "trainer.devices=4",
        "trainer.num_nodes=2",
        "optimizer.lr=1e-4,1e-3",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SBATCH_CAPTURE": str(capture)}
    result = _script("finetune", *args, env=env, ok=False)
    assert "refused" in result.stderr
    sbatch = capture.read_text()
    for line in (
        "--array=0-1",
        "--partition=gpu",
        "--nodes=2",
        "--ntasks-per-node=4",
        "--gpus-per-node=4",
        "--time=240",
        "--signal=USR2@120",
    ):
        assert f"#SBATCH {line}" in sbatch, line


def test_slurm_launcher_config_is_validated_against_the_plugin_schema():
    from hydra.errors import ConfigCompositionException

    cfg = make_cfg("finetune", ["hydra/launcher=slurm", "trainer.devices=8"], return_hydra=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher") and cfg.hydra.launcher.tasks_per_node == 8
    with pytest.raises(ConfigCompositionException, match="partitio"):
        make_cfg("finetune", ["hydra/launcher=slurm", "hydra.launcher.partitio=gpu"], return_hydra=True)
    with pytest.raises(ConfigCompositionException, match="timeout_min"):
        make_cfg("finetune", ["hydra/launcher=slurm", "hydra.launcher.timeout_min=soon"], return_hydra=True)
