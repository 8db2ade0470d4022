"""Image–text contrastive pre-training (CLIP): the loss against a hand computation, the clamped temperature,
zero-shot and retrieval against hand counts, the pair data, per-tower freezing and layer decay, the towers'
hand-off, a locked tower, DDP against one process, and every bad input as one line."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from lightning_modules.core.errors import ConfigError
from tests.conftest import ROOT, make_cfg

# A tiny pre-training on the embedded pairs: 3 steps of 16 pairs per epoch, 2 epochs, 2 validation batches.
TINY = ["datamodule=image_text", "debug=limit", "datamodule.batch_size=16", "datamodule.eval_batch_size=64"]


def _pretrain(out: Path, *overrides: str) -> dict:
    from lightning_modules.runtime.run import run

    return run(make_cfg("pretrain", [*TINY, *overrides], out))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("clip") / "pre"
    metrics = _pretrain(out)
    assert metrics["status"] == "ok"
    return out


# --- the loss --------------------------------------------------------------------------------------------


def test_loss_equals_a_hand_computation_on_three_pairs():
    from lightning_modules.objectives.clip import clip_loss

    image = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]), dim=1)
    text = F.normalize(torch.tensor([[0.8, 0.6], [0.0, 1.0], [1.0, 1.0]]), dim=1)
    scale = 10.0
    cos = [[sum(a * b for a, b in zip(i, t, strict=True)) for t in text.tolist()] for i in image.tolist()]

    def xent(row: list[float], right: int) -> float:  # -log softmax(scale * row)[right]
        return -scale * row[right] + math.log(sum(math.exp(scale * c) for c in row))

    image_to_text = sum(xent(cos[i], i) for i in range(3)) / 3
    text_to_image = sum(xent([cos[i][t] for i in range(3)], t) for t in range(3)) / 3
    assert clip_loss(image, text, torch.tensor(scale)).item() == pytest.approx((image_to_text + text_to_image) / 2)


def _tiny_clip(texts, pooling: str = "cls"):
    """A small dual encoder (a 2-block ViT on 16x16 images, a 2-layer BERT with a tokenizer trained on ``texts``)
    and its CLIP objective."""
    from datamodules.spec import ImageTextSpec
    from lightning_modules.backbones.dual import DualEncoder
    from lightning_modules.objectives.clip import CLIP
    from tests.helpers import vit
    from tests.text_helpers import text_backbone

    torch.manual_seed(0)
    text = text_backbone(texts=texts, dropout=0.0, pooling=pooling)
    backbone = DualEncoder(vit(), text)
    tok = text.processor
    spec = ImageTextSpec(1, 16, len(tok), 16, tok.pad_token_id, tok)
    return backbone, CLIP(backbone, spec, embed_dim=16)


CAPTIONS = [f"a picture of {w}" for w in ("ants", "bees", "cats", "dogs", "eels", "fish", "goats", "hens")]


def test_loss_falls_on_a_tiny_batch():
    from tests.helpers import batch
    from tests.text_helpers import token_batch

    backbone, objective = _tiny_clip(CAPTIONS * 4, pooling="mean")
    pairs = {**batch(8, labels=False), **token_batch(backbone.text, CAPTIONS)}
    params = list(backbone.parameters()) + list(objective.parameters())
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    losses = []
    for _ in range(50):  # ~15 steps near a uniform guess, then down (measured: 2.32 -> 0.45 in 40 steps)
        loss = objective(backbone, pairs)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        objective.after_step(backbone)
        losses.append(loss.item())
    assert losses[0] > 1.5 and losses[-1] < 0.25 * losses[0], losses[::8]  # ln 8 = 2.08 for a uniform guess


def test_logit_scale_is_clamped_at_100_after_every_step():
    backbone, objective = _tiny_clip(CAPTIONS)
    assert objective.logit_scale.item() == pytest.approx(math.log(1 / 0.07))  # CLIP's initial temperature
    objective.logit_scale.data.fill_(math.log(99.0))
    optimizer = torch.optim.SGD([objective.logit_scale], lr=0.05)
    for _ in range(3):
        optimizer.zero_grad()
        (-objective.logit_scale).backward()  # a loss that wants a larger scale (sharper logits)
        optimizer.step()
        assert objective.logit_scale.item() > math.log(100)  # the step went past the clamp ...
        assert objective.scale().item() == pytest.approx(100.0)  # (the forward never uses more than 100)
        objective.after_step(backbone)
        assert objective.logit_scale.item() == pytest.approx(math.log(100))  # ... and is brought back


def test_a_temperature_below_the_clamp_is_refused():
    from datamodules.spec import ImageTextSpec
    from lightning_modules.objectives.clip import CLIP

    backbone, objective = _tiny_clip(CAPTIONS)
    spec = ImageTextSpec(1, 16, 10, 16, 0, None)
    with pytest.raises(ConfigError, match=r"objective.temperature=0.005 starts the logit scale at 200"):
        CLIP(backbone, spec, temperature=0.005)


# --- zero-shot and retrieval -----------------------------------------------------------------------------


def test_zero_shot_of_perfectly_aligned_towers_is_100_percent():
    """Towers built to agree: the image tower's features are one-hot in the digit drawn, the text tower's are the
    sum of one-hot rows of the class names' tokens (the templates' other words embed to 0). Through the real
    prompts, tokenizer, template averaging and argmax, every image is classified right."""
    from datamodules.spec import ImageTextSpec
    from lightning_modules.backbones.base import Backbone
    from lightning_modules.backbones.dual import DualEncoder
    from lightning_modules.backbones.tokenizer import train_tokenizer
    from lightning_modules.objectives.clip import CLIP

    names = ["zero", "one", "two", "three", "four"]
    templates = ["a photo of a {}", "{}", "the shape {} drawn"]
    tokenizer = train_tokenizer("wordpiece", [t.format(n) for n in names for t in templates] * 3, 300, 16)

    class Images(Backbone):
        modality, type = "image", "stub"

        def __init__(self):
            super().__init__(torch.nn.Identity(), len(names))

        def forward(self, batch):
            return batch["image"].flatten(1)[:, : len(names)]

    class Texts(Backbone):
        modality, type = "text", "stub"

        def __init__(self):
            table = torch.nn.Embedding(len(tokenizer), len(names))
            table.weight.data.zero_()
            for c, name in enumerate(names):
                table.weight.data[tokenizer.convert_tokens_to_ids(name), c] = 1.0
            super().__init__(table, len(names))
            self.max_positions = 16

        processor = property(lambda self: tokenizer)

        def forward(self, batch):
            return (self.model(batch["input_ids"]) * batch["attention_mask"].unsqueeze(-1)).sum(1)

    backbone = DualEncoder(Images(), Texts())
    objective = CLIP(backbone, ImageTextSpec(1, 4, len(tokenizer), 16, 0, tokenizer), embed_dim=len(names))
    for proj in (objective.image_proj, objective.text_proj):
        proj.weight.data.copy_(torch.eye(len(names)))
    labels = torch.arange(len(names)).repeat(6)
    images = F.one_hot(labels, 16).float().view(-1, 1, 4, 4) * torch.rand(len(labels), 1, 1, 1).add(0.5)
    classes = objective.class_embeddings(backbone, names, templates)
    predicted = objective.zero_shot_logits(backbone, {"image": images}, classes).argmax(1)
    assert torch.equal(predicted, labels)


def test_retrieval_recall_equals_a_hand_count():
    from lightning_modules.objectives.clip import retrieval_recall

    # 4 queries (rows) x 5 items; `relevant` marks each query's right answers.
    similarity = torch.tensor(
        [
            [0.9, 0.1, 0.3, 0.2, 0.0],  # right answer 0: ranked 1st
            [0.5, 0.4, 0.8, 0.1, 0.2],  # right answer 1: ranked 3rd
            [0.1, 0.2, 0.3, 0.4, 0.5],  # right answers 0 and 2: ranked 5th and 3rd -> first hit at 3
            [0.3, 0.9, 0.1, 0.2, 0.4],  # right answer 4: ranked 2nd
        ]
    )
    relevant = torch.zeros(4, 5, dtype=torch.bool)
    relevant[0, 0] = relevant[1, 1] = relevant[2, 0] = relevant[2, 2] = relevant[3, 4] = True
    # Hand count: hits within the top 1: query 0 -> 1/4; top 2: queries 0, 3 -> 2/4; top 3: all four -> 4/4.
    assert retrieval_recall(similarity, relevant, ks=(1, 2, 3), chunk=3) == pytest.approx({1: 0.25, 2: 0.5, 3: 1.0})


def test_paired_retrieval_scores_each_image_and_each_distinct_caption_once():
    """Three images; image 0 has captions A and B, image 1 caption A too (identical text: one caption), image 2
    caption C. Embeddings put image 1 nearest to C and image 2 nearest to A."""
    from lightning_modules.objectives.clip import PairedRetrieval

    e = torch.eye(3)
    A, B, C = e[0], e[1], e[2]  # caption embeddings
    im0, im1, im2 = F.normalize(A + B, dim=0), F.normalize(C + 0.5 * A, dim=0), F.normalize(A + 0.2 * C, dim=0)
    rows = [(im0, A, 0, 0), (im0, B, 0, 1), (im1, A, 1, 0), (im2, C, 2, 2)]  # one row per (image, caption) pair
    metric = PairedRetrieval(ks=(1, 2))
    for part in (rows[:3], rows[3:]):  # two batches
        images, texts, image_ids, caption_ids = zip(*part, strict=True)
        metric.update(torch.stack(images), torch.stack(texts), torch.tensor(image_ids), torch.tensor(caption_ids))
    out = {k: round(float(v), 4) for k, v in metric.compute().items()}
    # image->text: im0's best caption is A or B (both right); im1's best is C (wrong), then A (right); im2's best is
    # A (wrong), then C (right): R@1 = 1/3, R@2 = 3/3. text->image: A's best image is im2 (wrong: A belongs to im0
    # and im1), then im0 (right); B's best is im0 (right); C's best is im1 (wrong), then im2: R@1 = 1/3, R@2 = 3/3.
    assert out == {"i2t_recall@1": 0.3333, "i2t_recall@2": 1.0, "t2i_recall@1": 0.3333, "t2i_recall@2": 1.0}


# --- the pairs -------------------------------------------------------------------------------------------


def _pairs_module(**kwargs):
    from datamodules.sources.image_text import ImageTextDataModule
    from tests.text_helpers import text_backbone

    dm = ImageTextDataModule(**kwargs)
    dm.use_backbone(type("Dual", (), {"towers": lambda self: {"text": text_backbone(texts=dm.texts())}})())
    dm.setup("fit")
    return dm


def test_embedded_pairs_are_the_digits_split_with_a_caption_per_template():
    dm = _pairs_module(batch_size=16)
    train, val = dm.splits["train"], dm.splits["val"]
    assert (len(train["first"]), len(val["first"])) == (1257, 270)  # datamodule=digits' train and val images
    assert train["count"].eq(6).all() and len(val["owner"]) == 270 * 6
    assert len(set(val["caption_id"].tolist())) == 60  # 10 classes x 6 templates: repeated captions are one
    assert "a handwritten seven" in dm.texts() and "the digit 7" in dm.texts()


def test_one_caption_per_image_drawn_by_seed_and_epoch_the_same_on_every_rank():
    from datamodules.sources.image_text import PairLoader

    dm = _pairs_module(batch_size=8)
    split, epoch = dm.splits["train"], [0]

    def loader(batch_size: int, **shard) -> PairLoader:
        kwargs = {"seed": 3, "epoch_fn": lambda: epoch[0], "num_batches": 4, **shard}
        return PairLoader(split, batch_size, shuffle=True, drop_last=True, sample=True, **kwargs)

    def same(a: list, b) -> list[bool]:
        return [torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b, strict=True)]

    first = list(loader(16))
    assert same(first, loader(16)) == [True] * 4  # a resumed epoch draws what the uninterrupted one drew
    ranks = [list(loader(8, rank=r, world=2)) for r in (0, 1)]
    for step, whole in enumerate(first):  # the two ranks' slices are the single process's batch, captions and all
        for key in whole:
            assert torch.equal(torch.cat([ranks[0][step][key], ranks[1][step][key]]), whole[key]), key
    epoch[0] = 1
    assert not all(same(first, loader(16)))
    # Every caption drawn is one of its image's own; every one of an image's captions gets drawn over epochs.
    rows = []
    for e in range(12):
        epoch[0] = e
        batches = loader(16)
        list(batches)
        rows.append(batches.rows)
    rows = torch.stack(rows)
    owner = split["owner"][rows]
    assert torch.equal(owner, torch.arange(len(split["first"])).expand_as(owner))
    assert len(set(rows[:, 0].tolist())) > 3  # image 0's 6 captions, drawn over 12 epochs


def _write_pairs(root: Path, fmt: str = "csv", rows=None, caption_column: str = "caption") -> Path:
    from PIL import Image

    (root / "img").mkdir(parents=True, exist_ok=True)
    for i in range(6):
        Image.fromarray((torch.rand(12, 12, 3) * 255).byte().numpy()).save(root / "img" / f"{i}.png")
    rows = rows or [(f"img/{i}.png", f"a photo number {i}") for i in range(6)] + [("img/0.png", "the first photo")]
    path = root / f"pairs.{fmt}"
    if fmt == "csv":
        path.write_text(f"image,{caption_column}\n" + "".join(f"{a},{b}\n" for a, b in rows))
    else:
        path.write_text("".join(json.dumps({"image": a, caption_column: b}) + "\n" for a, b in rows))
    return path


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_pairs_from_a_file_group_captions_by_image_and_hold_out_images(tmp_path, fmt):
    path = _write_pairs(tmp_path, fmt)
    dm = _pairs_module(path=str(path), channels=3, image_size=8, batch_size=2, val_fraction=0.34)
    train, val = dm.splits["train"], dm.splits["val"]
    assert len(train["first"]) + len(val["first"]) == 6 and len(val["first"]) == 2  # images, not rows, held out
    assert train["image"].shape[1:] == (3, 8, 8)
    assert sorted(train["count"].tolist() + val["count"].tolist()) == [1, 1, 1, 1, 1, 2]  # img/0.png: 2 captions


def test_a_validation_file_is_used_as_it_is(tmp_path):
    train = _write_pairs(tmp_path / "train")
    val = _write_pairs(tmp_path / "val", rows=[("img/5.png", "five"), ("img/4.png", "four"), ("img/5.png", "5")])
    dm = _pairs_module(path=str(train), val_path=str(val), channels=3, image_size=8, batch_size=2)
    assert len(dm.splits["train"]["first"]) == 6 and dm.splits["val"]["count"].tolist() == [2, 1]


def test_jsonl_takes_a_list_of_captions(tmp_path):
    path = _write_pairs(tmp_path, "jsonl", rows=[(f"img/{i}.png", [f"photo {i}", f"picture {i}"]) for i in range(6)])
    dm = _pairs_module(path=str(path), channels=3, image_size=8, batch_size=2)
    assert dm.splits["train"]["count"].eq(2).all()


def test_image_text_shards_stream_the_pairs_with_the_image_sources_preprocessing(tmp_path):
    from datamodules.loading.prepare import prepare
    from datamodules.transforms.decode import decode
    from datamodules.transforms.images import eval_transform

    rows = [(f"img/{i % 6}.png", f"a photo number {i}") for i in range(12)]  # 6 images, 2 captions each
    pairs = str(_write_pairs(tmp_path, rows=rows))
    shards = prepare("image_text", out=str(tmp_path / "shards"), file=pairs, text_column="caption", workers=1)
    dm = _pairs_module(path=str(shards), channels=3, image_size=8, batch_size=2, num_workers=1)
    assert dm.describe() == {"loading": "stream"} and dm.spec.image_size == 8
    train_pairs = json.loads((shards / "pretune.json").read_text())["splits"]["train"]
    batches = list(dm.train_dataloader())
    assert len(batches) == train_pairs // 2 and batches[0]["image"].dtype == torch.uint8
    assert [b["input_ids"].tolist() for b in batches] == [b["input_ids"].tolist() for b in dm.train_dataloader()]
    dm.batches_trained = lambda: 1  # a resumed epoch skips what was trained
    assert [b["input_ids"].tolist() for b in dm.train_dataloader()] == [b["input_ids"].tolist() for b in batches[1:]]
    from litdata import StreamingDataset

    val = StreamingDataset(str(shards / "val"))
    (batch,) = list(dm.eval_loader("val", batch_size=64))
    for i in range(len(val)):  # each pair's image read as every image source reads a file; its ids
        expected = eval_transform(8, 1.0)(decode(tmp_path / val[i]["name"], 3))
        assert torch.equal(batch["image"][i], expected)
    names = [val[i]["name"] for i in range(len(val))]
    assert batch["image_id"].tolist() == [list(dict.fromkeys(names)).index(n) for n in names]
    assert dm.on_after_batch_transfer(batch, 0)["image"].dtype == torch.float32  # normalised on the device
    assert set(dm.export_files()["captions.json"]["captions"]) == {x for x in dm.texts()}


def test_clip_pre_trains_on_image_text_shards(tmp_path):
    from datamodules.loading.prepare import prepare

    rows = [(f"img/{i % 6}.png", f"photo {i % 6} seen {i // 6}") for i in range(60)]
    pairs = str(_write_pairs(tmp_path, rows=rows))
    shards = prepare("image_text", out=str(tmp_path / "shards"), file=pairs, text_column="caption", workers=1)
    options = [
        f"datamodule.path={shards}",
        "datamodule.channels=3",
        "datamodule.batch_size=8",
        "datamodule.num_workers=1",
    ]
    metrics = _pretrain(tmp_path / "run", *options)
    assert metrics["status"] == "ok" and 0 <= metrics["val/i2t_recall@1"] <= 1
    assert json.loads((tmp_path / "run" / "run.json").read_text())["data"] == {"loading": "stream"}
    kept = json.loads((tmp_path / "run" / "backbone" / "captions.json").read_text())["captions"]
    assert kept and all(c.startswith("photo ") for c in kept)


# --- per-tower freezing and learning rates ---------------------------------------------------------------


def test_each_tower_is_frozen_and_decayed_on_its_own():
    from lightning_modules.callbacks.freezing import FreezeLayers, GradualUnfreezing
    from lightning_modules.training.optim import param_groups

    backbone, objective = _tiny_clip(CAPTIONS)
    towers = backbone.tower_groups()
    assert [g.name for g in towers["image"]] == ["image/stem", "image/blocks.0", "image/blocks.1+norm"]
    assert [g.name for g in towers["text"]] == ["text/embeddings", "text/encoder.layer.0", "text/encoder.layer.1"]
    grouped = [id(p) for g in backbone.layer_groups() for p in g.params.values()]
    assert sorted(grouped) == sorted(id(p) for p in backbone.parameters())  # each parameter in exactly one group

    module = type("M", (), {"backbone": backbone})()
    FreezeLayers(layers=1, text="all").apply(module, 0)  # the strategy on the image tower, the text tower locked
    frozen = {g.name for gs in towers.values() for g in gs if not any(p.requires_grad for p in g.params.values())}
    assert frozen == {"image/stem"} | {g.name for g in towers["text"]}
    gradual = GradualUnfreezing(start=1, every=1, image=0)  # the image tower all trains; the text one unfreezes
    for epoch, expected in ((0, 2), (1, 1), (2, 0)):
        gradual.apply(module, epoch)
        assert sum(p.numel() for p in backbone.parameters() if not p.requires_grad) == sum(
            g.num_params for g in towers["text"][:expected]
        )
    with pytest.raises(ConfigError, match=r"freeze.text=4 is out of range: the text tower has 3 layer groups"):
        FreezeLayers(text=4).validate(backbone)

    scales = {g["name"]: g["lr_scale"] for g in param_groups(backbone, objective, {"layer_decay": 0.5})}
    assert [scales[g] for g in ("image/stem", "image/blocks.0", "image/blocks.1+norm")] == [0.125, 0.25, 0.5]
    assert [scales[g] for g in ("text/embeddings", "text/encoder.layer.0", "text/encoder.layer.1")] == [
        0.125,
        0.25,
        0.5,
    ]
    assert scales["head"] == 1.0  # the projections and the temperature


# --- runs: export, hand-off, a locked tower ----------------------------------------------------------------


def test_a_pretraining_run_exports_each_tower_and_both_load_back_bit_for_bit(pretrained):
    from safetensors.torch import load_file

    from lightning_modules.backbones.factory import build_backbone
    from lightning_modules.backbones.tokenizer import tokenizer_sha256

    metrics = json.loads((pretrained / "metrics.json").read_text())
    for key in ("val/loss", "val/i2t_recall@1", "val/i2t_recall@5", "val/i2t_recall@10", "val/t2i_recall@10"):
        assert 0 <= metrics[key] < 10, key
    assert 0 <= metrics["val/knn_acc"] <= 1  # the feature monitor on the image tower (the embedded digits' classes)
    assert "lr/text/embeddings" not in metrics  # logged per epoch, not a run metric
    backbone_dir = pretrained / "backbone"
    meta = yaml.safe_load((backbone_dir / "config.yaml").read_text())
    assert meta["type"] == "dual_encoder" and meta["towers"] == ["image", "text"]
    cfg = make_cfg("pretrain", TINY)
    from omegaconf import OmegaConf

    model = OmegaConf.to_container(cfg.model, resolve=True)
    dual = load_file(str(backbone_dir / "model.safetensors"))  # the trained weights, all of them
    for tower in ("image", "text"):
        loaded = build_backbone({**model[tower], "init": str(backbone_dir / tower)})
        state = loaded.model.state_dict()
        trained = {k.removeprefix(f"{tower}.model."): v for k, v in dual.items() if k.startswith(f"{tower}.model.")}
        assert state.keys() == trained.keys() and all(torch.equal(state[k], trained[k]) for k in state), tower
    text = build_backbone({**model["text"], "init": str(backbone_dir / "text")})
    assert tokenizer_sha256(text.processor) == meta["text"]["tokenizer"]["sha256"]  # its tokenizer came with it
    whole = build_backbone({**model, "init": str(pretrained)})  # the dual encoder, from the run dir
    assert all(torch.equal(v, dual[k]) for k, v in whole.model.state_dict().items())


def test_each_tower_fine_tunes_like_any_backbone(pretrained, tmp_path):
    from lightning_modules.runtime.run import run

    image = run(
        make_cfg("finetune", ["debug=limit", f"model.init={pretrained}/backbone/image", "freeze=lp_ft"], tmp_path / "i")
    )
    assert image["status"] == "ok" and 0 <= image["test/acc"] <= 1 and image["params/trainable_start"] == 650
    text_model = ["model=bert_micro", "model.layers=2", "model.intermediate=128", "model.max_positions=32"]
    text = run(
        make_cfg(
            "finetune",
            ["debug=limit", "datamodule=text_classification", *text_model, "model.vocab_size=1000"]
            + ["datamodule.max_length=32", f"model.init={pretrained}/backbone/text", "freeze.layers=1"],
            tmp_path / "t",
        )
    )
    assert text["status"] == "ok" and text["params/frozen"] > 0  # the embeddings: the tokenizer came with them
    source = json.loads((tmp_path / "t" / "run.json").read_text())["weights"]
    assert source["path"] == str((pretrained / "backbone" / "text").resolve())


def test_a_locked_tower_is_bit_for_bit_unchanged_after_training(pretrained, tmp_path):
    from safetensors.torch import load_file

    source = pretrained / "backbone" / "text"
    metrics = _pretrain(tmp_path / "lit", f"model.text.init={source}", "freeze.text=all", "optimizer.lr=3e-3")
    locked = load_file(str(tmp_path / "lit" / "backbone" / "text" / "model.safetensors"))
    before = load_file(str(source / "model.safetensors"))
    assert locked.keys() == before.keys() and all(torch.equal(locked[k], before[k]) for k in locked)
    image_after = load_file(str(tmp_path / "lit" / "backbone" / "image" / "model.safetensors"))
    image_before = load_file(str(pretrained / "backbone" / "image" / "model.safetensors"))
    assert not torch.equal(image_after["pos_embed"], image_before["pos_embed"])  # the other tower trained
    text_params = sum(v.numel() for v in before.values())
    assert metrics["params/frozen"] == text_params and metrics["params/trainable"] > 0
    record = json.loads((tmp_path / "lit" / "run.json").read_text())
    assert record["towers"]["text"]["path"] == str(source.resolve())  # recorded as model.init is


@pytest.mark.slow
def test_wandb_logs_each_tower_as_an_artifact_and_the_lr_and_frozen_flag_of_every_group(tmp_path, monkeypatch):
    from tests.wandb_log import read_offline_run

    monkeypatch.setenv("WANDB_MODE", "offline")
    _pretrain(tmp_path / "run", "logger=wandb", "freeze.text=1", "trainer.log_every_n_steps=1")
    logged = read_offline_run(tmp_path / "run")
    artifacts = {a["name"]: a for a in logged["artifacts"]}
    assert set(artifacts) == {"backbone-dual-clip", "backbone-vit_tiny_patch16_224-clip", "backbone-bert-clip"}
    assert {"tokenizer.json", "model.safetensors", "config.yaml"} <= set(artifacts["backbone-bert-clip"]["files"])
    assert {"image/model.safetensors", "text/tokenizer.json"} <= set(artifacts["backbone-dual-clip"]["files"])
    assert {"lr/image/stem", "lr/text/embeddings", "frozen/text/embeddings", "frozen/image/stem"} <= logged[
        "history_keys"
    ]
    last = [row for row in logged["history"] if "frozen/text/embeddings" in row][-1]
    assert (last["frozen/text/embeddings"], last["frozen/text/encoder.layer.0"], last["frozen/image/stem"]) == (1, 0, 0)


def test_evaluate_zero_shot_and_retrieval_through_the_script(pretrained, tmp_path):
    def evaluate(*args: str) -> dict:
        result = subprocess.run(
            [sys.executable, "scripts/evaluate.py", *args, f"model.init={pretrained}", "logger=csv"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            env=dict(os.environ, OMP_NUM_THREADS="1"),
        )
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads((tmp_path / args[-1].split("=", 1)[1] / "metrics.json").read_text())

    zero_shot = evaluate("zero_shot", "datamodule=digits", f"hydra.run.dir={tmp_path / 'zs'}")
    assert zero_shot["status"] == "ok" and zero_shot["zero_shot/images"] == 270 and zero_shot["zero_shot/classes"] == 10
    assert 0 <= zero_shot["zero_shot/acc"] <= 1 and 0 <= zero_shot["zero_shot/f1"] <= 1
    # The digits' own prompts, and the pre-training's 60 distinct captions kept for runs on other data.
    assert zero_shot["zero_shot/templates_from"] == "datamodule=digits"
    assert zero_shot["zero_shot/templates"][:2] == ["a handwritten {}", "the digit {}"]
    assert json.loads((pretrained / "backbone" / "captions.json").read_text())["distinct"] == 60
    assert (tmp_path / "zs" / "csv" / "metrics.csv").is_file()  # and to the logger
    retrieval = evaluate("task=retrieval", "datamodule=image_text", f"hydra.run.dir={tmp_path / 'rt'}")
    assert retrieval["retrieval/pairs"] == 1620 and 0 <= retrieval["retrieval/t2i_recall@5"] <= 1


def test_zero_shot_prompts_are_the_datas_own_else_the_pretraining_captions_else_generic(tmp_path):
    from types import SimpleNamespace

    from datamodules.sources.digits import DigitsDataModule
    from datamodules.sources.image_folder import ImageFolderDataModule
    from lightning_modules.objectives.clip import GENERIC_PROMPTS, templates_from_captions
    from lightning_modules.runtime.evaluate import prompt_templates

    names = ["cat", "dog", "golden_retriever"]
    captions = ["a photo of a cat", "a photo of a Dog", "a photo of a golden retriever", "a {cat} drawn", "dog"]
    captions += ["a cat asleep", "a dog asleep", "a dog asleep", "my neighbour's dog"]
    # Seen with 2 classes or more, most classes first; the rest (one class only) are descriptions, not templates.
    assert templates_from_captions(captions, names) == ["a photo of a {}", "a {} asleep"]
    (tmp_path / "captions.json").write_text(json.dumps({"captions": captions, "distinct": len(captions)}))
    unset, folder = SimpleNamespace(templates=None), ImageFolderDataModule(root=str(tmp_path))
    pairs_run, other = {"path": str(tmp_path)}, {"path": str(tmp_path / "elsewhere")}
    assert prompt_templates(unset, folder, pairs_run, names) == (
        ["a photo of a {}", "a {} asleep"],
        "the pre-training captions",
    )
    assert prompt_templates(unset, folder, other, names) == (list(GENERIC_PROMPTS), "CLIP's generic photo prompts")
    assert prompt_templates(unset, DigitsDataModule(), pairs_run, names)[1] == "datamodule=digits"
    given = SimpleNamespace(templates=["a sketch of a {}"])
    assert prompt_templates(given, DigitsDataModule(), pairs_run, names) == (
        ["a sketch of a {}"],
        "zero_shot.templates",
    )


# --- DDP -------------------------------------------------------------------------------------------------


def _clip_loss_rank(rank: int, world: int, port: int, image, text, out: str) -> None:
    """One rank of a gloo group: the CLIP loss of this rank's pairs, against the pairs of all ranks."""
    import torch.distributed as dist

    from lightning_modules.objectives.clip import clip_loss

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    lo = 4 * rank
    a = image[lo : lo + 4].clone().requires_grad_(True)
    b = text[lo : lo + 4].clone().requires_grad_(True)
    scale = torch.tensor(5.0, requires_grad=True)
    loss = clip_loss(a, b, scale)
    loss.backward()
    torch.save({"loss": loss.detach(), "gi": a.grad, "gt": b.grad, "gs": scale.grad}, f"{out}/{rank}.pt")
    dist.barrier()
    os._exit(0)  # as test_ddp's ranks: no gloo teardown race


def test_gathered_clip_loss_equals_the_global_batch_loss_and_gradients(tmp_path):
    gen = torch.Generator().manual_seed(0)
    image, text = (
        F.normalize(torch.randn(8, 5, generator=gen), dim=1),
        F.normalize(torch.randn(8, 5, generator=gen), dim=1),
    )
    torch.save({"image": image, "text": text}, tmp_path / "x.pt")
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT")}
    spawn = (
        "import sys, torch; from tests.test_ddp import _free_port; from tests.test_clip import _clip_loss_rank;"
        " x = torch.load(sys.argv[1]); torch.multiprocessing.spawn(_clip_loss_rank,"
        " args=(2, _free_port(), x['image'], x['text'], sys.argv[2]), nprocs=2)"
    )
    result = subprocess.run(
        [sys.executable, "-c", spawn, str(tmp_path / "x.pt"), str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    from lightning_modules.objectives.clip import clip_loss

    a, b = image.clone().requires_grad_(True), text.clone().requires_grad_(True)
    scale = torch.tensor(5.0, requires_grad=True)
    loss = clip_loss(a, b, scale)
    loss.backward()
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    # DDP averages over ranks: the mean loss is the global loss, each rank's feature gradient (which includes the
    # other rank's loss, through the gather) / 2 the global one, and the mean temperature gradient the global one.
    assert torch.stack([r["loss"] for r in ranks]).mean().item() == pytest.approx(loss.item(), rel=1e-6)
    torch.testing.assert_close(torch.cat([r["gi"] for r in ranks]) / 2, a.grad)
    torch.testing.assert_close(torch.cat([r["gt"] for r in ranks]) / 2, b.grad)
    torch.testing.assert_close(torch.stack([r["gs"] for r in ranks]).mean(), scale.grad)


@pytest.mark.slow
def test_clip_ddp_on_two_processes_matches_one_process(tmp_path):
    """Through the scripts, 1 process x 32 pairs vs 2 x 16, augmentations and caption draws on. SGD: AdamW's first
    steps are about lr * sign(gradient), which turns float noise in a near-zero gradient into a difference of up
    to lr (measured: 2.4e-4 on one element after one step); SGD's steps are proportional to the gradients."""
    from tests.test_ddp import _script, _weights

    common = [
        "debug=limit",
        "trainer.enable_progress_bar=false",
        "logger=none",
        "datamodule=image_text",
        "optimizer=sgd",
    ]
    _script(
        "pretrain",
        *common,
        "datamodule.batch_size=32",
        "datamodule.eval_batch_size=64",
        f"hydra.run.dir={tmp_path / 'one'}",
    )  # noqa: E501
    _script(
        "pretrain",
        *common,
        "datamodule.batch_size=16",
        "datamodule.eval_batch_size=32",  # per process: the same global evaluation batches (the loss depends on them)
        "trainer=ddp",
        f"hydra.run.dir={tmp_path / 'two'}",
    )
    one, two = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert one["status"] == two["status"] == "ok" and one["steps"] == two["steps"] == 6
    for key in (
        "train/loss",
        "val/loss",
        "val/i2t_recall@1",
        "val/i2t_recall@5",
        "val/t2i_recall@1",
        "val/t2i_recall@5",
    ):
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), key
    w1, w2 = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-6


# --- bad input: one line each ----------------------------------------------------------------------------


def _missing_image(root: Path) -> Path:
    return _write_pairs(root, rows=[("img/0.png", "a photo"), ("img/9.png", "a lost photo")])


def _unreadable_image(root: Path) -> Path:
    path = _write_pairs(root, rows=[("img/0.png", "a photo"), ("img/broken.png", "a broken photo")])
    (root / "img" / "broken.png").write_bytes(b"not a png")
    return path


def _empty_caption(root: Path) -> Path:
    return _write_pairs(root, rows=[("img/0.png", "a photo"), ("img/1.png", "  ")])


def _no_caption_column(root: Path) -> Path:
    return _write_pairs(root, caption_column="text")


def _tower_dir(root: Path) -> Path:
    """A text tower exported by a CLIP pre-training (no training: its weights only need to exist)."""
    from omegaconf import OmegaConf

    from datamodules.sources.image_text import ImageTextDataModule
    from lightning_modules.backbones.factory import build_backbone
    from lightning_modules.backbones.handoff import export_backbone

    cfg = make_cfg("pretrain", ["datamodule=image_text"])
    model = OmegaConf.to_container(cfg.model, resolve=True)
    return export_backbone(build_backbone(model["text"], data=ImageTextDataModule()), root / "text")


def _dual_dir(root: Path) -> Path:
    """A clip_micro dual encoder exported as a pre-training would (untrained), its text tower pooling CLS."""
    from omegaconf import OmegaConf

    from datamodules.sources.image_text import ImageTextDataModule
    from lightning_modules.backbones.factory import build_backbone
    from lightning_modules.backbones.handoff import export_backbone

    cfg = make_cfg("pretrain", ["datamodule=image_text"])
    model = OmegaConf.to_container(cfg.model, resolve=True)
    return export_backbone(build_backbone(model, data=ImageTextDataModule()), root / "dual" / "backbone")


PAIRS = ["datamodule=image_text", "datamodule.path={bad}", "datamodule.channels=3"]
BAD = [
    ("single-modality-data", "pretrain", ["objective=clip", "model=clip_micro"], None,
     "objective=clip takes image_text inputs, but datamodule=digits is image"),
    ("single-modality-model", "pretrain", ["datamodule=image_text", "model=vit_micro"], None,
     "objective=clip takes image_text inputs, but model=vit_micro is image"),
    ("image-text-data-on-an-image-model", "pretrain", ["datamodule=image_text", "model=vit_micro", "objective=simclr"],
     None, "objective=simclr takes image inputs, but datamodule=image_text is image_text"),
    ("no-caption-column", "pretrain", PAIRS, _no_caption_column,
     "datamodule.caption_column=caption: no such column in {bad} (columns: image, text)"),
    ("missing-image", "pretrain", PAIRS, _missing_image,
     "datamodule.path={bad}: line 3: image img/9.png: no such file"),
    ("unreadable-image", "pretrain", PAIRS, _unreadable_image,
     "datamodule.path={bad}: line 3: image img/broken.png: cannot read the image"),
    ("empty-caption", "pretrain", PAIRS, _empty_caption,
     "datamodule.path={bad}: line 3: empty caption for image img/1.png"),
    ("tower-init-mismatch", "pretrain", ["datamodule=image_text", "model.text.init={bad}", "model.text.layers=3"],
     _tower_dir, "model.text.init={bad}: the backbone's architecture does not match the model config (layers: 2 (saved)"
     " vs 3 (model))"),
    ("dual-init-other-pooling", "pretrain", ["datamodule=image_text", "model.init={bad}", "model.text.pooling=mean"],
     _dual_dir, "model.init={bad}: the backbone's architecture does not match the model config (text.pooling: cls"
     " (saved) vs mean (model))"),
    ("dual-and-tower-init", "pretrain", ["datamodule=image_text", "model.init={tmp}", "model.text.init=hf:{tmp}"],
     None, "model.text.init=hf:{tmp}: model.init={tmp} already loads every tower; allowed is model.text.init=none"),
    ("forgetting-of-one-tower", "finetune", ["model.init={bad}/image", "finetune.measure_forgetting=true"], _dual_dir,
     "model.init={bad}/image does not (it is the image tower of one: its pre-training loss needs every tower)"),
    ("tower-init-missing", "pretrain", ["datamodule=image_text", "model.image.init={tmp}/nothing"], None,
     "model.image.init={tmp}/nothing: no such path"),
    ("tower-of-the-wrong-kind", "pretrain", ["datamodule=image_text", "model@model.image=bert_micro"], None,
     "model.image._target_=lightning_modules.backbones.text.TransformersBackbone cannot be the image tower, which takes"
     " image inputs: allowed are model@model.image=efficientnet_lite0_imagenet, resnet_micro, timm, vit_micro"),
    ("tower-size", "pretrain", ["datamodule=image_text", "model.text.layers=0"], None,
     "model.text.layers=0 is out of range: allowed is an integer in [1, 1024]"),
    ("freeze-a-tower-of-a-plain-backbone", "finetune", ["freeze.text=all"], None,
     "freeze.text=all: model=vit_micro has no text tower"),
    ("freeze-a-tower-beyond-its-groups", "pretrain", ["datamodule=image_text", "freeze.text=7"], None,
     "freeze.text=7 is out of range: the text tower has 3 layer groups; allowed are 0..3 or 'all'"),
    ("clip-when-fine-tuning", "finetune", ["datamodule=image_text"], None,
     "objective=clip is a pre-training objective: run it with scripts/pretrain.py"),
    ("temperature-clamp", "pretrain", ["datamodule=image_text", "objective.max_logit_scale=0.5"], None,
     "objective.max_logit_scale=0.5 is out of range: allowed is a number >= 1"),
]  # fmt: skip


@pytest.mark.parametrize(("stage", "overrides", "builder", "needle"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_clip_input_gives_one_line_naming_key_and_value(stage, overrides, builder, needle, tmp_path, capsys):
    from tests.test_bad_inputs import _assert_one_line

    _assert_one_line(stage, ["debug=limit"], overrides, builder, needle, tmp_path, capsys)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["zero_shot", "model.init=none"], "model.init=none: task=zero_shot evaluates a pre-trained model"),
        (["zero_shot", "model=vit_micro", "model.init=none"], "task=zero_shot evaluates an image–text model"),
        (["retrieval", "model.init=none"], "task=retrieval takes image_text data (datamodule=image_text)"),
    ],
)
def test_evaluate_refuses_what_it_cannot_evaluate_in_one_line(args, needle, tmp_path):
    result = subprocess.run(
        [sys.executable, "scripts/evaluate.py", *args, f"hydra.run.dir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and needle in lines[0], result.stderr


def test_predict_classifies_new_images_zero_shot_over_given_class_names(pretrained, tmp_path):
    """scripts/predict.py with a CLIP run: its towers and projections rebuilt from the run alone (its config.yaml,
    backbone/ and the preprocessing recorded there), the class names through the templates; the same top labels
    as the towers built the way scripts/evaluate.py builds them, on the same inputs."""
    import csv

    import numpy as np
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf, open_dict
    from PIL import Image
    from sklearn.datasets import load_digits

    from datamodules.spec import ImageTextSpec
    from datamodules.transforms.images import preprocessing_transform, standardize
    from lightning_modules.backbones.factory import build_backbone
    from lightning_modules.backbones.handoff import read_backbone_config, resolve_init
    from lightning_modules.objectives.base import saved_objective
    from lightning_modules.runtime.predict import predict
    from tests.conftest import CONF

    digits = load_digits()
    for i in range(5):
        Image.fromarray((digits.images[i] * 255 / 16).round().astype(np.uint8)).save(tmp_path / f"{i}.png")
    names = ["zero", "one", "two", "three", "four"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("predict", [f"run_dir={pretrained}", f"input={tmp_path}", f"class_names=[{','.join(names)}]"])
        evaluate_cfg = compose("evaluate", [f"model.init={pretrained}"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "out")
    metrics = predict(cfg)
    rows = list(csv.DictReader(open(tmp_path / "out" / "predictions.csv")))
    assert metrics["predicted"] == 5 and [r["input"] for r in rows] == [f"{i}.png" for i in range(5)]

    pre = read_backbone_config(pretrained / "backbone")["preprocessing"]
    assert pre["crop_mode"] == "center" and pre["channels"] == 1 and pre["modality"] == "image_text"
    source = resolve_init(str(pretrained))
    backbone = build_backbone(OmegaConf.to_container(evaluate_cfg.model, resolve=True), source=source).eval()
    tok = backbone.towers()["text"].processor
    spec = ImageTextSpec(1, pre["image_size"], len(tok), backbone.towers()["text"].max_positions, tok.pad_token_id, tok)
    objective = saved_objective(source, backbone, spec).eval()
    images = [preprocessing_transform(pre)(Image.open(tmp_path / f"{i}.png").convert("L")) for i in range(5)]
    with torch.no_grad():
        classes = objective.class_embeddings(backbone, names, ["{}"])
        batch = {"image": standardize(torch.stack(images), pre["mean"], pre["std"])}
        expected = objective.zero_shot_logits(backbone, batch, classes).softmax(-1)
    assert [r["label_1"] for r in rows] == [names[i] for i in expected.argmax(-1).tolist()]
    assert [float(r["probability_1"]) for r in rows] == pytest.approx(expected.max(-1).values.tolist(), abs=1e-5)
