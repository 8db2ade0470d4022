"""Text shards (``prepare_data.py text``) read by ``text_corpus`` and ``text_classification``: the corpus's blocks are
those of its documents packed as in memory, labeled texts are tokenized as in memory, batches come in the seeded
order each rank slices, a resumed epoch skips what was trained, and the wrong shards are one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from litdata import StreamingDataset

from datamodules.loading.prepare import prepare
from datamodules.sources.text_classification import TextClassificationDataModule
from datamodules.sources.text_corpus import TextCorpusDataModule
from datamodules.transforms.text import tokenize
from lightning_modules.core.errors import ConfigError
from tests.conftest import started
from tests.text_helpers import ready, sample_texts


def _ready(data, backbone):
    return started(ready(data, backbone))


@pytest.fixture(scope="module")
def reviews(tmp_path_factory):
    """120 labeled lines, sorted by label (as a user's export often is), prepared as shards."""
    tmp = tmp_path_factory.mktemp("text_shards")
    lines = [line for text in sample_texts()[:30] for line in text.splitlines() if len(line.split()) > 3][:120]
    rows = [{"text": line, "label": ["neg", "pos", "mixed"][i * 3 // len(lines)]} for i, line in enumerate(lines)]
    (tmp / "reviews.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = prepare("text", out=str(tmp / "shards"), file=str(tmp / "reviews.jsonl"), label_column="label", workers=1)
    return out


def _texts(shards, split: str) -> list[dict]:
    dataset = StreamingDataset(str(shards / split))
    return [dataset[i] for i in range(len(dataset))]


@pytest.mark.parametrize("model", ["bert", "gpt"])
def test_corpus_blocks_from_shards_are_its_documents_packed_as_in_memory(reviews, model, request):
    backbone = request.getfixturevalue(model)
    data = _ready(TextCorpusDataModule(path=str(reviews), max_length=16, batch_size=4, num_workers=2), backbone)
    assert data.describe() == {"loading": "stream"} and not data.can_cache_features()
    tokenizer = backbone.processor
    for split in ("train", "val", "test"):
        ids = tokenizer([item["text"] for item in _texts(reviews, split)], verbose=False)["input_ids"]
        eos = [tokenizer.eos_token_id] if tokenizer.cls_token_id is None else []
        flat = torch.tensor([t for doc in ids for t in doc + eos])
        expected = flat[: len(flat) // 16 * 16].view(-1, 16)  # sources/text_corpus.py's packing, by hand
        blocks = torch.cat([b["input_ids"] for b in data.eval_loader(split, batch_size=5)])
        assert torch.equal(blocks, expected), split
    in_order = {tuple(row) for b in data.eval_loader("train", batch_size=5) for row in b["input_ids"].tolist()}
    seen = torch.cat([b["input_ids"] for b in data.train_dataloader()])  # shuffled, whole batches of 4
    assert len(seen) == len(data.streamed["train"]) // 4 * 4 and {tuple(r) for r in seen.tolist()} <= in_order


def test_labeled_shards_are_tokenized_as_in_memory_in_the_seeded_order_each_rank_slices(reviews, bert):
    def data(**kwargs):
        options = dict(path=str(reviews), max_length=24, batch_size=8, num_workers=2, label_seed=3)
        return _ready(TextClassificationDataModule(**{**options, **kwargs}), bert)

    one = data()
    assert one.spec.class_names == ("mixed", "neg", "pos") and one.spec.num_classes == 3
    val = _texts(reviews, "val")
    expected, lengths, _ = tokenize(bert.processor, [x["text"] for x in val], 24)
    batches = list(one.eval_loader("val", batch_size=7))
    got = torch.cat([torch.nn.functional.pad(b["input_ids"], (0, 24 - b["input_ids"].shape[1])) for b in batches])
    assert torch.equal(got, expected["input_ids"]) and [len(b["label"]) for b in batches][0] == 7
    assert all(b["input_ids"].shape[1] == int(lengths[i * 7 : i * 7 + 7].max()) for i, b in enumerate(batches))
    assert torch.cat([b["label"] for b in batches]).tolist() == [x["label"] for x in val]
    # Training: the order is BatchLoader's (seed, epoch); two ranks of 4 take the halves of one process's 8.
    first = [b["label"].tolist() for b in one.train_dataloader()]
    assert (
        first == [b["label"].tolist() for b in data().train_dataloader()]
        and len(first) == len(one.streamed["train"]) // 8
    )
    assert first != [b["label"].tolist() for b in data(label_seed=4).train_dataloader()]
    halves = []
    for rank in (0, 1):
        ranked = data(batch_size=4)
        ranked.shard = lambda r=rank: {"rank": r, "world": 2}
        halves.append([b["label"].tolist() for b in ranked.train_dataloader()])
    assert all(a + b == f for a, b, f in zip(*halves, first, strict=True))
    # A resumed epoch skips the batches trained; a label fraction is a stratified share of the training labels.
    resumed = data()
    resumed.batches_trained = lambda: 3
    assert [b["label"].tolist() for b in resumed.train_dataloader()] == first[3:]
    tenth = data(label_fraction=0.25, batch_size=4)
    labels = np.array([x["label"] for x in _texts(reviews, "train")])
    kept = tenth.streamed["train"].indices
    assert len(kept) == round(0.25 * len(labels)) and set(np.bincount(labels[kept])) <= {6, 7, 8}


def test_the_wrong_shards_and_mixed_sources_are_one_line(reviews, bert, tmp_path):
    from tests.test_streaming import write_folder

    images = prepare("image_folder", out=str(tmp_path / "images"), root=str(write_folder(tmp_path / "f", n=6)))
    with pytest.raises(
        ConfigError,
        match=r"datamodule.path=.*images holds image_folder shards; datamodule="
        r"text_classification reads text shards \(python scripts/prepare_data.py text file=",
    ):
        TextClassificationDataModule(path=str(images))
    (tmp_path / "lines.jsonl").write_text("".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(30)))
    unlabeled = prepare("text", out=str(tmp_path / "lines"), file=str(tmp_path / "lines.jsonl"), workers=1)
    with pytest.raises(ConfigError, match=r"its text shards have no labels \(prepared without label_column\)"):
        _ready(TextClassificationDataModule(path=str(unlabeled)), bert)
    with pytest.raises(ConfigError, match=r"datamodule.val_path=.*: prepared shards bring their own splits"):
        TextClassificationDataModule(path=str(reviews), val_path=str(tmp_path / "lines.jsonl"))
    with pytest.raises(ConfigError, match=r"datamodule.paths=.*, datamodule.path=.*: give one"):
        TextCorpusDataModule(paths=["a.txt"], path=str(reviews))
    with pytest.raises(ConfigError, match=r"datamodule.path=.*lines.jsonl: allowed is a directory or URL of prepared"):
        TextCorpusDataModule(path=str(tmp_path / "lines.jsonl"))
    with pytest.raises(
        ConfigError,
        match=r"not a prepared shard directory, it has no pretune.json; prepare it with:"
        r" python scripts/prepare_data.py text",
    ):
        TextCorpusDataModule(path=str(tmp_path))


@pytest.mark.slow
def test_a_fine_tune_on_text_shards_resumed_mid_epoch_equals_the_uninterrupted_run(reviews, cfg_factory, tmp_path):
    """bert_micro (its tokenizer trained on the shards' texts as they stream) on 84 training texts, 10 batches an
    epoch: stopped after a checkpoint at step 12 (two batches into epoch 1) and resumed, it ends as the run that was
    never stopped, bit for bit."""
    from lightning_modules.runtime.run import run

    common = [
        "datamodule=text_classification",
        f"datamodule.path={reviews}",
        "model=bert_micro",
        "datamodule.batch_size=8",
        "datamodule.max_length=32",
        "datamodule.num_workers=1",
        "trainer.max_epochs=2",
        "callbacks.last_checkpoint.every_n_train_steps=4",
    ]
    full = run(cfg_factory("finetune", *common, name="full"))
    stop = ["+callbacks.stop._target_=tests.helpers.StopAtStep", "+callbacks.stop.step=12"]
    run(cfg_factory("finetune", *common, *stop, name="cut"))
    assert torch.load(tmp_path / "cut" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 12
    resumed = run(cfg_factory("finetune", *common, f"ckpt_path={tmp_path / 'cut'}", name="cut"))
    assert full["steps"] == resumed["steps"] == 20
    a, b = (
        torch.load(tmp_path / d / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"] for d in ("full", "cut")
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for key in ("train/loss", "val/loss", "val/acc", "test/acc"):
        assert resumed[key] == full[key], key
    record = json.loads((tmp_path / "full" / "run.json").read_text())
    assert record["data"] == {"loading": "stream"}


@pytest.mark.slow
def test_two_ddp_processes_on_text_shards_match_one_process_on_the_same_global_batch(reviews, tmp_path):
    """As tests/test_ddp.py's text case, the texts read from shards: each rank its slice of every global batch
    (each cut to its own longest text: an encoder's outputs do not depend on the padding, up to float noise)."""
    from tests.test_ddp import BERT, TINY, _max_difference, _script, _weights

    common = [*TINY, "logger=none", *BERT, "datamodule=text_classification", f"datamodule.path={reviews}"]
    common += ["datamodule.num_workers=1", "datamodule.max_length=32", "freeze.layers=1"]
    _script("finetune", *common, "datamodule.batch_size=16", f"hydra.run.dir={tmp_path / 'one'}")
    _script("finetune", *common, "datamodule.batch_size=8", "trainer=ddp", f"hydra.run.dir={tmp_path / 'two'}")
    one, two = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert one["status"] == two["status"] == "ok" and one["steps"] == two["steps"] == 3 * one["epochs"]
    for key in ("train/loss", "val/loss", "test/loss", "test/acc"):
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), key
    assert _max_difference(_weights(tmp_path / "one"), _weights(tmp_path / "two")) < 5e-5
