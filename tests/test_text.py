"""Text backbones, tokenizers and the language-modelling objectives: layer groups, pooling, the hand-off of a
tokenizer with its weights, MLM's masking statistics, CLM's loss by hand, and a real pre-trained model
(all-MiniLM-L6-v2, offline) fine-tuned with frozen embeddings."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import yaml

from lightning_modules.backbones.factory import build_backbone
from lightning_modules.backbones.handoff import export_backbone
from lightning_modules.core.errors import ConfigError
from tests.conftest import ROOT
from tests.helpers import TIMM
from tests.text_helpers import BERT, GPT, hf_dir, minilm_dir, sample_texts, text_backbone, text_spec, token_batch

TOKENIZER_HASHES = """
import hashlib, sys
sys.path.insert(0, {root!r})
from lightning_modules.backbones.tokenizer import train_tokens
from datamodules.sources.stdlib_docs import topics
texts = topics()[:40]
for kind in ("wordpiece", "bpe"):
    print(hashlib.sha256(train_tokens(kind, texts, 600).to_str().encode()).hexdigest())
"""


def test_tokenizer_training_gives_the_same_tokenizer_in_every_process():
    """Each DDP rank and a resumed run train their own tokenizer: it must be the same one (WordPiece's
    trainer numbers its vocabulary in hash-map order, which changes between processes; it is renumbered)."""
    import hashlib

    from lightning_modules.backbones.tokenizer import train_tokens

    here = [
        hashlib.sha256(train_tokens(k, sample_texts(), 600).to_str().encode()).hexdigest() for k in ("wordpiece", "bpe")
    ]
    for _ in range(2):
        out = subprocess.run(
            [sys.executable, "-c", TOKENIZER_HASHES.format(root=str(ROOT))], capture_output=True, text=True, check=True
        )
        assert out.stdout.split() == here


@pytest.mark.parametrize("preset", ["bert_micro", "gpt_micro"])
def test_micro_presets_are_micro_and_grouped_embeddings_then_layers(preset, cfg_factory):
    from omegaconf import OmegaConf

    model = OmegaConf.to_container(cfg_factory("finetune", f"model={preset}").model, resolve=True)
    backbone = text_backbone(model)
    embedding_params = sum(p.numel() for n, p in backbone.model.named_parameters() if "embed" in n or n.startswith("w"))
    assert sum(p.numel() for p in backbone.parameters()) - embedding_params < 1_000_000
    groups = backbone.layer_groups()
    names = [g.name for g in groups]
    if preset == "bert_micro":
        assert names == ["embeddings", "encoder.layer.0", "encoder.layer.1", "encoder.layer.2", "encoder.layer.3"]
        assert backbone.kind == "encoder"
    else:  # the final norm goes with the last layer: a linear probe freezes it, freeze.layers=N<all trains it
        assert names == ["embeddings", "h.0", "h.1", "h.2", "h.3+ln_f"]
        assert backbone.kind == "decoder"
    grouped = [id(p) for g in groups for p in g.params.values()]
    assert sorted(grouped) == sorted(id(p) for p in backbone.parameters())  # every parameter exactly once
    batch = token_batch(backbone, sample_texts()[:3])
    assert backbone(batch).shape == (3, 64)
    assert backbone.tokens(batch).shape == (3, batch["input_ids"].shape[1], 64)


def test_freeze_layers_out_of_range_names_the_count():
    from lightning_modules.callbacks.freezing import FreezeLayers

    with pytest.raises(ConfigError, match=r"freeze.layers=4 is out of range: the backbone has 3 layer groups"):
        FreezeLayers(4).validate(text_backbone(BERT))


@pytest.mark.parametrize("pooling", ["cls", "mean", "last"])
@pytest.mark.parametrize("model", [BERT, GPT], ids=["bert", "gpt"])
def test_pooled_features_ignore_padding(model, pooling):
    """A text's features do not depend on how much padding its batch adds."""
    torch.manual_seed(0)
    backbone = text_backbone(model, pooling=pooling).eval()
    short, long = "Return the sum of a and b.", sample_texts()[0]
    alone = backbone(token_batch(backbone, [short]))
    padded = token_batch(backbone, [short, long])
    assert padded["attention_mask"][0].sum() < padded["attention_mask"].shape[1]  # it really is padded
    with torch.no_grad():
        assert torch.allclose(backbone(padded)[0], alone[0], atol=1e-5)


def _mlm(backbone, **kwargs):
    from lightning_modules.objectives.mlm import MLM

    return MLM(backbone, text_spec(backbone), **kwargs)


def test_mlm_masking_statistics_on_a_large_batch():
    """15% of the non-special tokens selected; of those 80% [MASK], 10% a random token, 10% unchanged; special
    and padding tokens never selected; the labels are the original ids, -100 elsewhere."""
    backbone = text_backbone(BERT)
    objective = _mlm(backbone)
    texts = [t[i : i + 300] for t in sample_texts() for i in range(0, 20_000, 250) if t[i:]]  # of many lengths
    batch = token_batch(backbone, texts, max_length=64)
    ids, real = batch["input_ids"], batch["attention_mask"].bool()
    torch.manual_seed(0)
    inputs, labels = objective.mask(ids)
    selected = labels != -100
    special = torch.isin(ids, torch.tensor(backbone.processor.all_special_ids))
    assert (~real).any() and special.any()
    assert not (selected & special).any() and not (selected & ~real).any()
    assert torch.equal(labels[selected], ids[selected]) and torch.equal(inputs[~selected], ids[~selected])
    candidates = int((~special).sum())
    assert candidates > 20_000
    rate = selected.sum().item() / candidates
    assert abs(rate - 0.15) < 0.01, rate  # ~4 standard deviations
    masked = (inputs[selected] == backbone.processor.mask_token_id).float().mean().item()
    kept = (inputs[selected] == ids[selected]).float().mean().item()
    random = 1 - masked - kept
    assert abs(masked - 0.8) < 0.03 and abs(kept - 0.1) < 0.025 and abs(random - 0.1) < 0.025, (masked, kept)


def test_mlm_draws_under_ddp_are_the_single_process_draws(monkeypatch):
    """Rank r of 2, masking its half of a global batch, gets exactly the masks one process draws for those rows."""
    from lightning_modules.core import distributed

    backbone = text_backbone(BERT)
    objective = _mlm(backbone)
    ids = token_batch(backbone, sample_texts()[:8])["input_ids"]
    torch.manual_seed(3)
    single = objective.mask(ids)
    for rank in (0, 1):
        monkeypatch.setattr(distributed, "rank_world", lambda r=rank: (r, 2))
        torch.manual_seed(3)
        inputs, labels = objective.mask(ids[rank * 4 : (rank + 1) * 4])
        assert torch.equal(inputs, single[0][rank * 4 : (rank + 1) * 4])
        assert torch.equal(labels, single[1][rank * 4 : (rank + 1) * 4])


def test_mlm_loss_is_on_the_selected_tokens_only_and_learns():
    torch.manual_seed(0)
    backbone = text_backbone(BERT)
    objective = _mlm(backbone)
    batch = token_batch(backbone, sample_texts()[:8])
    params = list(backbone.parameters()) + list(objective.parameters())
    opt = torch.optim.AdamW(params, lr=3e-3)
    losses = []
    for _ in range(30):
        torch.manual_seed(1)  # the same masks every step: the loss must fall on them
        out = objective(backbone, batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.6 * losses[0]
    torch.manual_seed(1)
    assert out["tokens"] == int((objective.mask(batch["input_ids"])[1] != -100).sum())  # the loss's tokens


def test_clm_loss_equals_a_hand_computation_with_padding():
    from lightning_modules.objectives.clm import CLM

    torch.manual_seed(0)
    backbone = text_backbone(GPT).eval()
    objective = CLM(backbone, text_spec(backbone))
    batch = token_batch(backbone, ["a b c d e f g", "x y", "one two three"])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert (mask == 0).any()
    with torch.no_grad():
        out = objective(backbone, batch)
        logits = backbone.tokens(batch) @ backbone.model.get_input_embeddings().weight.T
        terms = [
            -F.log_softmax(logits[b, t], -1)[ids[b, t + 1]]
            for b in range(len(ids))
            for t in range(ids.shape[1] - 1)
            if mask[b, t + 1]
        ]
        assert torch.allclose(out["loss"], torch.stack(terms).mean(), atol=1e-6)
        assert out["tokens"] == len(terms)
        # what stands in the padding does not matter
        noisy = {**batch, "input_ids": ids.masked_fill(mask == 0, 7)}
        assert torch.allclose(objective(backbone, noisy)["loss"], out["loss"], atol=1e-6)
    metrics = objective.make_metrics("val/")
    objective.update_metrics(metrics, out)
    assert torch.allclose(metrics.compute()["val/perplexity"], out["loss"].exp(), rtol=1e-5)


def test_mlm_on_a_decoder_and_clm_on_an_encoder_are_refused():
    from lightning_modules.objectives.clm import CLM

    gpt, bert = text_backbone(GPT), text_backbone(BERT)
    with pytest.raises(ConfigError, match="objective=mlm needs a BERT-style encoder, but model.name=gpt2 is a GPT"):
        _mlm(gpt)
    with pytest.raises(ConfigError, match="objective=clm needs a GPT-style decoder, but model.name=bert is a BERT"):
        CLM(bert, text_spec(bert))


@pytest.mark.parametrize("model", [BERT, GPT], ids=["bert", "gpt"])
def test_tokenizer_travels_with_the_weights_through_backbone_dir(model, tmp_path):
    """Export, then a fine-tune's build loads exactly that tokenizer (same ids) and those weights."""
    from datamodules.sources.text_classification import TextClassificationDataModule

    torch.manual_seed(0)
    source = text_backbone(model)
    target = export_backbone(source, tmp_path / "backbone")
    meta = yaml.safe_load((target / "config.yaml").read_text())
    assert meta["tokenizer"]["vocab_size"] == len(source.processor) and meta["tokenizer"]["sha256"]
    assert (target / "tokenizer.json").is_file() and (target / "config.json").is_file()
    torch.manual_seed(1)
    loaded = build_backbone({**model, "init": str(tmp_path)}, data=None)  # no texts needed: nothing is trained
    texts = [t[:300] for t in sample_texts()[:5]]
    assert loaded.processor(texts)["input_ids"] == source.processor(texts)["input_ids"]
    for (k, a), (_, b) in zip(loaded.model.state_dict().items(), source.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    data = TextClassificationDataModule()
    data.use_backbone(loaded)
    encoded, _, _ = data.encode(texts)
    assert encoded["input_ids"][:, :5].tolist() == [ids[:5] for ids in source.processor(texts)["input_ids"]]


def test_a_scratch_backbone_can_share_another_backbones_tokenizer(tmp_path, cfg_factory):
    """model.tokenizer=<run>: random weights on the pre-trained vocabulary (a scratch baseline that differs from the
    pre-trained backbone by its weights alone); nothing is trained, so no texts are needed."""
    from lightning_modules.backbones.tokenizer import tokenizer_sha256
    from lightning_modules.config.check import check_config

    torch.manual_seed(0)
    source = text_backbone(BERT)
    export_backbone(source, tmp_path / "run" / "backbone")
    torch.manual_seed(1)
    shared = build_backbone({**BERT, "tokenizer": str(tmp_path / "run")}, data=None)
    assert tokenizer_sha256(shared.processor) == tokenizer_sha256(source.processor)
    assert shared.spec == source.spec  # same sizes and tokenizer record
    assert not torch.equal(
        shared.model.embeddings.word_embeddings.weight, source.model.embeddings.word_embeddings.weight
    )
    minilm = build_backbone({**BERT, "vocab_size": 40_000, "tokenizer": f"hf:{minilm_dir()}"}, data=None)
    assert len(minilm.processor) == 30_522 and minilm.model.config.num_hidden_layers == BERT["layers"]
    with pytest.raises(ConfigError, match=r"model.vocab_size=2000 is too small for hf:.*: its tokenizer needs 30522"):
        build_backbone({**BERT, "vocab_size": 2000, "tokenizer": f"hf:{minilm_dir()}"}, data=None)
    # Refused before anything loads: nothing there, or a backbone that brings its own tokenizer.
    text = ["datamodule=text_classification", "model=bert_micro"]
    with pytest.raises(ConfigError, match=r"^model.tokenizer=.*nowhere: no such path"):
        check_config(cfg_factory("finetune", *text, f"model.tokenizer={tmp_path / 'nowhere'}"))
    with pytest.raises(
        ConfigError, match=r"^model.tokenizer=.* is for a backbone built from scratch \(model.init=none\)"
    ):
        check_config(
            cfg_factory("finetune", *text, f"model.tokenizer={tmp_path / 'run'}", f"model.init={tmp_path / 'run'}")
        )


def test_a_tokenizer_that_is_not_the_backbones_is_refused(tmp_path):
    target = export_backbone(text_backbone(BERT), tmp_path / "backbone")
    other = text_backbone(BERT, texts=[t[::-1] for t in sample_texts()])  # another vocabulary
    other.processor.save_pretrained(str(target))
    with pytest.raises(
        ConfigError, match=r"the tokenizer does not match its backbone \(tokenizer.json is not the tokenizer"
    ):
        build_backbone({**BERT, "init": str(tmp_path)})


def test_a_bert_micro_backbone_is_refused_for_a_gpt_micro_config(tmp_path):
    export_backbone(text_backbone(BERT), tmp_path / "backbone")
    with pytest.raises(ConfigError, match=r"does not match the model config \(name: bert \(saved\) vs gpt2 \(model\)"):
        build_backbone({**GPT, "init": str(tmp_path)})


def test_hugging_face_dirs_load_without_a_preset_and_carry_their_architecture(tmp_path):
    """hf:<dir> builds a transformers backbone whatever the preset's _target_ says; exported after pre-training, its
    architecture travels with it (config.json), so a fine-tune from that run needs no matching preset."""
    from transformers import AutoModel

    for model, kind, groups in ((BERT, "encoder", 3), (GPT, "decoder", 3)):
        where = hf_dir(tmp_path / model["name"], model)
        vit_preset = {"_target_": TIMM, "name": "vit_tiny_patch16_224", "init": f"hf:{where}", "pooling": "mean"}
        backbone = build_backbone(vit_preset)
        assert (backbone.kind, len(backbone.layer_groups()), backbone.pooling) == (kind, groups, "mean")
        reference = AutoModel.from_pretrained(str(where))
        assert all(torch.equal(a, reference.state_dict()[k]) for k, a in backbone.model.state_dict().items())
        exported = export_backbone(backbone, tmp_path / f"{model['name']}-run" / "backbone")
        assert yaml.safe_load((exported / "config.yaml").read_text())["name"] == "hf"
        other_sizes = {**BERT, "layers": 5, "hidden": 48, "init": str(exported.parent)}
        again = build_backbone(other_sizes)
        assert (again.kind, again.spec["name"]) == (kind, "hf")
        assert all(torch.equal(a, reference.state_dict()[k]) for k, a in again.model.state_dict().items())


def test_a_hugging_face_tokenizer_larger_than_its_model_is_refused(tmp_path):
    where = hf_dir(tmp_path / "m", BERT)
    bigger = text_backbone(BERT, vocab_size=1200)
    assert len(bigger.processor) > BERT["vocab_size"]
    bigger.processor.save_pretrained(str(where))
    with pytest.raises(ConfigError, match=r"model.init=hf:.*the tokenizer does not match its backbone \(vocabulary of"):
        build_backbone({"init": f"hf:{where}"})


def test_minilm_has_embeddings_plus_six_layer_groups():
    backbone = build_backbone({"init": f"hf:{minilm_dir()}"})
    assert [g.name for g in backbone.layer_groups()] == ["embeddings"] + [f"encoder.layer.{i}" for i in range(6)]
    assert backbone.kind == "encoder" and backbone.model.pooler is None
    assert 22_000_000 < sum(p.numel() for p in backbone.parameters()) < 23_000_000


def test_minilm_fine_tunes_with_frozen_embeddings_bit_for_bit_unchanged():
    """A few steps of classification on short texts with freeze.layers=1: the embeddings stay exactly as
    loaded, the layers above them move."""
    import pytorch_lightning as pl

    from datamodules.loading.text import PaddedBatchLoader
    from lightning_modules.callbacks.freezing import FreezeLayers
    from lightning_modules.objectives.classification import Classification
    from lightning_modules.training.module import PretuneModule

    backbone = build_backbone({"init": f"hf:{minilm_dir()}", "pooling": "mean"})
    texts = [t[:120] for t in sample_texts()[:16]]
    batch = token_batch(backbone, texts, max_length=16)
    tensors = {**batch, "label": torch.arange(16) % 2}
    lengths = batch["attention_mask"].sum(1)

    class Data(pl.LightningDataModule):
        def train_dataloader(self):
            return PaddedBatchLoader(tensors, lengths, 8, shuffle=True, drop_last=True)

    torch.manual_seed(0)
    module = PretuneModule(
        backbone, Classification(backbone, text_spec(backbone, 2)), {"name": "adamw", "lr": 1e-3}, {"name": "none"}
    )
    before = {k: v.clone() for k, v in backbone.model.state_dict().items()}
    trainer = pl.Trainer(
        max_steps=3,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[FreezeLayers(1)],
    )
    trainer.fit(module, datamodule=Data())
    after = backbone.model.state_dict()
    embeddings = [k for k in before if k.startswith("embeddings.")]
    assert embeddings and all(torch.equal(before[k], after[k]) for k in embeddings)
    assert not torch.equal(
        before["encoder.layer.0.attention.self.query.weight"], after["encoder.layer.0.attention.self.query.weight"]
    )


def test_batches_are_padded_to_the_longest_text_of_the_global_batch():
    from datamodules.loading.text import PaddedBatchLoader

    ids = torch.zeros(8, 10, dtype=torch.long)
    lengths = torch.tensor([2, 3, 9, 2, 4, 4, 5, 3])
    mask = (torch.arange(10) < lengths[:, None]).long()
    tensors = {"input_ids": ids + mask, "attention_mask": mask}
    one = list(PaddedBatchLoader(tensors, lengths, 4, shuffle=False, drop_last=False))
    assert [b["input_ids"].shape[1] for b in one] == [9, 5]
    ranks = [list(PaddedBatchLoader(tensors, lengths, 2, False, False, rank=r, world=2)) for r in (0, 1)]
    for step, batch in enumerate(one):
        for key in batch:
            assert torch.equal(torch.cat([ranks[0][step][key], ranks[1][step][key]]), batch[key])
