"""Shared fixtures: configs composed exactly as the scripts compose them, outputs in tmp_path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# Tiny, quiet, CPU-only runs.
FAST = [
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "logger=none",
]


def make_cfg(stage: str, overrides: list[str], out_dir: Path | None = None, return_hydra: bool = False) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=stage, overrides=FAST + list(overrides), return_hydra_config=return_hydra)
    if out_dir is not None:
        with open_dict(cfg):
            cfg.paths.output_dir = str(out_dir)
    return cfg


@pytest.fixture
def cfg_factory(tmp_path):
    def factory(stage: str, *overrides: str, name: str | None = None) -> DictConfig:
        return make_cfg(stage, list(overrides), tmp_path / (name or stage))

    return factory


def pytest_configure(config):
    """Under pytest-xdist (``make test`` runs ``-n 2``) each worker gets its share of the cores, as the study's pool
    gives its workers: threads beyond it only wait on the other worker's (the subprocesses tests start inherit it)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        from lightning_modules.core.cores import threads_per_job

        threads = threads_per_job(workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _offline_env(monkeypatch):
    # Nothing in the suite may reach a network.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="module")
def bert():
    """A tiny BERT-style backbone (tests/text_helpers.py), seeded, shared by a module's tests."""
    import torch

    from tests.text_helpers import BERT, text_backbone

    torch.manual_seed(0)
    return text_backbone(BERT)


@pytest.fixture(scope="module")
def gpt():
    """The GPT-style twin of ``bert``."""
    import torch

    from tests.text_helpers import GPT, text_backbone

    torch.manual_seed(0)
    return text_backbone(GPT)


_STARTED: list = []


def started(datamodule):
    """Registers a datamodule a test set up; its loaders' worker processes are stopped after the test, as
    Lightning's teardown after fit does (streamed and shard loaders keep workers alive between epochs)."""
    _STARTED.append(datamodule)
    return datamodule


@pytest.fixture(autouse=True)
def _stop_started_workers():
    yield
    while _STARTED:
        _STARTED.pop().teardown("fit")
