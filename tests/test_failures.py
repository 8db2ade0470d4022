"""The last line of defence: whatever a script raises is one line on stderr naming what failed and where the
full traceback went; exit 2 for the configuration and the environment, 1 for a bug; metrics.json says failed;
HYDRA_FULL_ERROR=1 still shows everything. For pretrain.py, finetune.py, transfer_study.py and report.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from lightning_modules.runtime.cli import main
from tests.conftest import ROOT, make_cfg

TINY = ["debug=fast", "model=resnet_micro"]


def _script(name: str, *args: str, tmp: Path, full_error: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env["TMPDIR"] = str(tmp)
    if full_error:
        env["HYDRA_FULL_ERROR"] = "1"
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / name), *args], cwd=tmp, env=env, capture_output=True, text=True
    )


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.mark.parametrize("script", ["pretrain.py", "finetune.py", "transfer_study.py"])
def test_a_run_dir_that_cannot_be_made_is_one_line_and_a_temp_file(script, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    result = _script(script, f"hydra.run.dir={blocker}/run", tmp=tmp_path)
    assert result.returncode == 2
    line = _one_line(result.stderr)
    assert line.startswith(f"error: hydra.run.dir={blocker}/run: cannot make the run dir: Not a directory")
    log = Path(line.rsplit("full traceback in ", 1)[1])
    assert log.parent == tmp_path and "NotADirectoryError" in log.read_text()  # TMPDIR: the temp file
    full = _script(script, f"hydra.run.dir={blocker}/run", tmp=tmp_path, full_error=True)
    assert full.returncode == 1 and "Traceback" in full.stderr and "NotADirectoryError" in full.stderr


def test_an_output_dir_that_cannot_be_made_in_process(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cfg = make_cfg("finetune", TINY, blocker / "run")
    with pytest.raises(SystemExit) as exit_:
        main(cfg)
    assert exit_.value.code == 2
    line = _one_line(capsys.readouterr().err)
    assert f"Not a directory: {blocker}/run" in line and "full traceback in " in line
    assert Path(line.rsplit("full traceback in ", 1)[1]).parent == tmp_path


def _broken(monkeypatch):
    """A bug before the first training step: the objective cannot be built."""
    import lightning_modules.runtime.run as run

    def build_objective(*args, **kwargs):
        return {}["no such key"]

    monkeypatch.setattr(run, "build_objective", build_objective)


def test_a_bug_is_one_line_exit_1_with_the_traceback_in_the_run_dir(tmp_path, capsys, monkeypatch):
    _broken(monkeypatch)
    out_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        main(make_cfg("finetune", TINY, out_dir))
    assert exit_.value.code == 1
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("error: KeyError: 'no such key' (in tests/test_failures.py:")
    assert line.endswith(f"a bug); full traceback in {out_dir / 'error.log'}")
    assert "Traceback (most recent call last)" in (out_dir / "error.log").read_text()
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["status"] == "failed" and "KeyError" in metrics["error"]


def test_hydra_full_error_shows_the_bug(tmp_path, monkeypatch):
    _broken(monkeypatch)
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    out_dir = tmp_path / "run"
    with pytest.raises(KeyError, match="no such key"):
        main(make_cfg("finetune", TINY, out_dir))
    assert json.loads((out_dir / "metrics.json").read_text())["status"] == "failed"


def test_a_stale_success_is_overwritten_by_a_failure(tmp_path, capsys):
    out_dir = tmp_path / "run"
    out_dir.mkdir()
    (out_dir / "metrics.json").write_text('{"status": "ok"}')  # an earlier attempt in this run dir
    with pytest.raises(SystemExit):
        main(make_cfg("finetune", [*TINY, "optimizer.lr=0"], out_dir))
    assert json.loads((out_dir / "metrics.json").read_text())["status"] == "failed"


def test_no_test_batches_is_a_run_without_test_metrics(tmp_path):
    """Found by the fuzz: trainer.limit_test_batches=0 used to fail after training (an empty test result)."""
    out_dir = tmp_path / "run"
    main(make_cfg("finetune", ["model=resnet_micro", "debug=limit", "trainer.limit_test_batches=0"], out_dir))
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["status"] == "ok" and not any(k.startswith("test/") for k in metrics)


def test_the_transfer_study_checks_every_stage_before_it_runs_one(tmp_path):
    result = _script(
        "transfer_study.py", 'finetune=["datamodule.batch_size=0"]', f"hydra.run.dir={tmp_path}/study", tmp=tmp_path
    )
    assert result.returncode == 2
    line = _one_line(result.stderr)
    assert line == "error: strategies.scratch: datamodule.batch_size=0 is out of range: allowed is an integer >= 1"
    assert not (tmp_path / "study" / "pretrain").exists()  # nothing ran
    bad_key = _script("transfer_study.py", "seeds=[0,-1]", f"hydra.run.dir={tmp_path}/study2", tmp=tmp_path)
    assert bad_key.returncode == 2 and _one_line(bad_key.stderr).startswith("error: seeds[1]=-1 is out of range")


def test_report_a_bug_is_one_line(tmp_path, capsys, monkeypatch):
    sys.path.insert(0, str(ROOT / "scripts"))
    import report

    import lightning_modules.reports.sweep as sweep

    run = tmp_path / "sweep" / "0"
    (run / ".hydra").mkdir(parents=True)
    (run / "metrics.json").write_text("{ not json")  # a damaged file is a row of the table, not a failure
    assert report.main([str(tmp_path / "sweep")]) == 0
    assert "unreadable" in (tmp_path / "sweep" / "report" / "runs.csv").read_text()

    monkeypatch.setattr(sweep, "swept_keys", lambda rows: rows[0]["no such key"])  # a bug
    assert report.main([str(tmp_path / "sweep"), "--out", str(tmp_path / "out")]) == 1
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("error: KeyError: 'no such key' (in tests/test_failures.py:")
    assert line.endswith(f"a bug); full traceback in {tmp_path / 'out' / 'error.log'}")
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(KeyError):
        report.main([str(tmp_path / "sweep")])
