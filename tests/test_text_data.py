"""The text sources: a corpus packed into blocks, labeled files in three formats, the embedded
standard-library data (split by module, the corpus kept clear of held-out modules), truncation reported once."""

from __future__ import annotations

import csv
import json
import logging

import pytest
import torch

from datamodules.sources.text_classification import TextClassificationDataModule
from datamodules.sources.text_corpus import TextCorpusDataModule
from tests.text_helpers import ready, sample_texts


def test_corpus_files_one_document_per_line_or_per_file_packed_into_blocks(tmp_path, bert, gpt):
    (tmp_path / "a.txt").write_text("\n".join(sample_texts()[:10]))
    (tmp_path / "b.txt").write_text("\n\n".join(sample_texts()[10:20]))
    per_line = TextCorpusDataModule(paths=[str(tmp_path / "*.txt")], document="line", max_length=32, batch_size=8)
    per_file = TextCorpusDataModule(paths=[str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], document="file")
    assert len(per_file.texts()) == 2 and len(per_line.texts()) > 20
    assert all(line.strip() for line in per_line.texts())
    ready(per_line, bert)
    train, val = per_line.splits["train"]["input_ids"], per_line.splits["val"]["input_ids"]
    assert train.shape[1] == val.shape[1] == 32 and len(val) == max(1, round(0.05 * (len(train) + len(val))))
    assert per_line.splits["train"]["attention_mask"].all()  # blocks carry no padding
    cls = bert.processor.cls_token_id
    assert (torch.cat([train, val]) == cls).sum() == len(per_line.texts())  # every document begins with [CLS]
    again = ready(TextCorpusDataModule(paths=[str(tmp_path / "*.txt")], max_length=32, batch_size=8), bert)
    assert torch.equal(again.splits["val"]["input_ids"], val)  # a seeded split
    batch = next(iter(per_line.train_dataloader()))
    assert batch["input_ids"].shape == (8, 32) and "label" not in batch
    files = [str(tmp_path / "b.txt"), str(tmp_path / "a.txt")]  # the first document ends inside a block
    gpt_data = ready(TextCorpusDataModule(paths=files, document="file", max_length=32, batch_size=4), gpt)
    blocks = torch.cat([gpt_data.splits["train"]["input_ids"], gpt_data.splits["val"]["input_ids"]])
    assert (blocks == gpt.processor.eos_token_id).sum() == 1  # GPT-style: each document ends with <|endoftext|>


def _write(path, rows, fmt):
    if fmt == "jsonl":
        path.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    else:
        with open(path, "w", newline="") as fh:
            writer = csv.writer(fh, delimiter="\t" if fmt == "tsv" else ",")
            writer.writerows([("text", "label"), *rows])
    return path


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
def test_labeled_files_in_three_formats_with_split_ratios_and_label_fraction(fmt, tmp_path, bert):
    words = [t.split()[:12] for t in sample_texts()]
    rows = [(" ".join(w[i % 6 :]), ["neg", "pos", "mixed"][i % 3]) for i, w in enumerate(words * 3)]
    path = _write(tmp_path / f"train.{fmt}", rows, fmt)
    data = TextClassificationDataModule(path=str(path), batch_size=4, max_length=16, label_fraction=0.5)
    ready(data, bert)
    assert data.spec.class_names == ("mixed", "neg", "pos") and data.spec.num_classes == 3
    sizes = {s: len(t["label"]) for s, t in data.splits.items()}
    assert sizes["val"] == sizes["test"] == round(0.15 * len(rows))
    assert sizes["train"] == round(0.5 * (len(rows) - 2 * round(0.15 * len(rows))))
    batch = next(iter(data.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "label"} and batch["input_ids"].shape[1] <= 16


def test_separate_val_and_test_files_and_integer_labels_in_numeric_order(tmp_path, bert):
    rows = [(t[:60], str(i % 12)) for i, t in enumerate(sample_texts() * 2)]
    files = {s: _write(tmp_path / f"{s}.csv", rows, "csv") for s in ("train", "val", "test")}
    data = TextClassificationDataModule(
        path=str(files["train"]), val_path=str(files["val"]), test_path=str(files["test"]), batch_size=4
    )
    ready(data, bert)
    assert data.spec.class_names == tuple(str(i) for i in range(12))
    assert {s: len(t["label"]) for s, t in data.splits.items()} == dict.fromkeys(("train", "val", "test"), len(rows))


def test_long_texts_are_truncated_and_counted_once(tmp_path, bert, caplog, monkeypatch):
    rows = [(t, "ab"[i % 2]) for i, t in enumerate(sample_texts())]
    data = TextClassificationDataModule(
        path=str(_write(tmp_path / "t.jsonl", rows, "jsonl")), max_length=16, batch_size=2
    )
    # Lightning stops its logger propagating to the root (where caplog listens) when it was imported before
    # any handler existed, and the transfer study sets its level to WARNING: both depend on test order.
    monkeypatch.setattr(logging.getLogger("pytorch_lightning"), "propagate", True)
    with caplog.at_level(logging.INFO, logger="pytorch_lightning"):
        ready(data, bert)
    lines = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert (
        len(lines) == 1
        and f"{data.truncated} of {len(rows)} texts are longer than datamodule.max_length=16" in lines[0]
    )
    assert data.truncated == sum(len(ids) > 16 for ids in bert.processor([t for t, _ in rows])["input_ids"])
    assert all(t["input_ids"].shape[1] == 16 for t in data.splits.values())
    assert (data.splits["train"]["input_ids"][:, -1] == bert.processor.sep_token_id).sum() > 0  # [SEP] kept


def test_embedded_task_splits_by_module_and_the_corpus_leaves_held_out_modules_out(tmp_path):
    from datamodules.sources import stdlib_docs

    cache = str(tmp_path / "cache")
    splits, classes = stdlib_docs.labeled_task(15, cache)
    assert len(classes) == 15 and {"email", "asyncio", "tkinter"} <= set(classes)
    texts = {s: set(t) for s, (t, _) in splits.items()}
    assert not (texts["train"] & texts["val"]) and not (texts["train"] & texts["test"])
    assert all(len(set(y)) == 15 for _, y in splits.values())  # every class in every split
    for family, assignment in stdlib_docs.module_splits(cache).items():  # a module lies in one split only
        assert set(assignment.values()) == {"train", "val", "test"}, family
    corpus = stdlib_docs.corpus_documents(cache)
    assert 1_800_000 < sum(map(len, corpus)) < 2_600_000  # ~2 M characters (Python 3.11)
    assert not (set(corpus) & (texts["val"] | texts["test"]))
    assert any(f.name.startswith("stdlib_docstrings") for f in (tmp_path / "cache").iterdir())
    stdlib_docs.stdlib_docstrings.cache_clear()
    stdlib_docs.module_splits.cache_clear()
    assert stdlib_docs.labeled_task(15, cache) == (splits, classes)  # read back from the cache: the same


def test_a_frozen_text_backbone_computes_its_features_once_and_the_probe_trains_the_same(cfg_factory):
    """A linear probe on bert_micro (dropout on: a wholly frozen backbone runs in eval mode): with the feature cache
    (each split's pooled features computed when fit starts, carried in the padded batches) and without it, the
    same metrics; a backbone that trains computes its features every step."""
    from lightning_modules.runtime.run import run

    common = [
        "datamodule=text_classification",
        "model=bert_micro",
        "model.pooling=mean",
        "datamodule.label_fraction=0.1",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=3",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "callbacks=none",
        "optimizer.lr=0.05",
    ]
    cached = run(cfg_factory("finetune", *common, "freeze.layers=all", name="cached"))
    plain = run(cfg_factory("finetune", *common, "freeze.layers=all", "finetune.cache_features=false", name="plain"))
    training = run(cfg_factory("finetune", *common, "freeze.layers=1", name="training"))
    assert cached["features_cached"] and "features_cached" not in plain and "features_cached" not in training
    for key in ("train/loss", "val/loss", "val/acc", "test/acc"):
        assert cached[key] == pytest.approx(plain[key], abs=1e-5), key
