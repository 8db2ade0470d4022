"""Text end to end on a tiny budget, through the real scripts: MLM pre-training of bert_micro on the embedded
corpus -> backbone/ with its tokenizer -> fine-tuning on the embedded labeled task from that run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from tests.conftest import ROOT

pytestmark = pytest.mark.slow
TINY = ["debug=limit", "trainer.enable_progress_bar=false", "logger=csv"]


def _script(name: str, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, f"scripts/{name}.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_mlm_pretrain_then_finetune_through_the_scripts(tmp_path):
    pre = tmp_path / "pre"
    _script("pretrain", "objective=mlm", "model=bert_micro", "datamodule=text_corpus", *TINY, f"hydra.run.dir={pre}")
    metrics = json.loads((pre / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["stage"] == "pretrain"
    assert 0 < metrics["val/loss"] < 9 and metrics["val/perplexity"] > 1  # ln(2000) = 7.6 for a uniform guess
    backbone = pre / "backbone"
    assert {"model.safetensors", "config.yaml", "tokenizer.json", "config.json"} <= {p.name for p in backbone.iterdir()}
    meta = yaml.safe_load((backbone / "config.yaml").read_text())
    assert meta["name"] == "bert" and meta["layer_groups"] == ["embeddings"] + [f"encoder.layer.{i}" for i in range(4)]

    ft = tmp_path / "ft"
    _script(
        "finetune",
        "datamodule=text_classification",
        "model=bert_micro",
        f"model.init={pre}",
        "freeze.layers=2",
        *TINY,
        f"hydra.run.dir={ft}",
    )
    m = json.loads((ft / "metrics.json").read_text())
    assert m["status"] == "ok"
    for key in ("train/loss", "val/acc", "val/f1", "test/acc", "test/f1"):
        assert 0 <= m[key] <= 10, key
    assert m["params/frozen"] > 0 and m["params/trainable"] > 0  # embeddings + encoder.layer.0 frozen
    assert yaml.safe_load((ft / "config.yaml").read_text())["model"]["source"]["path"] == str(backbone.resolve())
