"""Every kind of bad input the issue lists, through the entry point's own error path (cli.main):
one line on stderr naming the key and the value, a non-zero exit, and no result passed off as one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lightning_modules.backbones.factory import build_backbone
from lightning_modules.backbones.handoff import export_backbone
from lightning_modules.core.locations import WEIGHTS
from lightning_modules.runtime.cli import main
from tests.conftest import make_cfg
from tests.helpers import RESNET, TIMM

TINY = ["debug=limit", "model=resnet_micro"]


def _vit_backbone_dir(root: Path) -> Path:
    """An exported vit_micro backbone (no training: its weights only need to exist)."""
    from hydra.utils import instantiate  # noqa: F401  (keeps the import cost out of collection)

    cfg = make_cfg("finetune", ["model=vit_micro"])
    return export_backbone(build_backbone(dict(cfg.model)), root / "vit" / "backbone")


def _truncated(root: Path) -> Path:
    model = {"_target_": TIMM, "name": RESNET[0], "kwargs": RESNET[1], "init": "none"}
    target = export_backbone(build_backbone(model), root / "cut")
    data = (target / WEIGHTS).read_bytes()
    (target / WEIGHTS).write_bytes(data[: len(data) // 3])
    return target


def _foreign_checkpoint(root: Path) -> Path:
    path = root / "other.ckpt"
    torch.save({"state_dict": {"backbone.model.fc.weight": torch.zeros(2, 2)}, "epoch": 0}, path)
    return path


def _image_folder(root: Path, unreadable: bool) -> Path:
    from tests.test_datamodules import _write_images

    if unreadable:
        _write_images(root, "train", ["a", "b"], n=6)
        (root / "train" / "a" / "broken.png").write_bytes(b"not a png")
    else:
        (root / "train").mkdir(parents=True)
    return root


# (id, stage, overrides (may use {tmp}), builder of a bad file for {bad}, the key=value the line names)
CASES = [
    ("lr-zero", "finetune", ["optimizer.lr=0"], None, "optimizer.lr=0 is out of range: allowed is a number > 0"),
    ("lr-negative", "finetune", ["optimizer.lr=-1e-3"], None, "optimizer.lr=-0.001 is out of range"),
    ("lr-wrong-type", "finetune", ["optimizer.lr=fast"], None, "optimizer.lr='fast' is invalid: allowed is a number"),
    ("epochs-wrong-type", "finetune", ["trainer.max_epochs=2.5"], None, "trainer.max_epochs=2.5 is invalid"),
    ("batch-size-zero", "finetune", ["datamodule.batch_size=0"], None, "datamodule.batch_size=0 is out of range"),
    ("label-fraction-zero", "finetune", ["datamodule.label_fraction=0"], None, "datamodule.label_fraction=0 is out"),
    ("label-fraction-big", "finetune", ["datamodule.label_fraction=1.5"], None, "datamodule.label_fraction=1.5 is out"),
    ("freeze-negative", "finetune", ["freeze.layers=-1"], None, "freeze.layers=-1 is out of range"),
    ("freeze-word", "finetune", ["freeze.layers=most"], None, "freeze.layers='most' is invalid"),
    ("freeze-beyond", "finetune", ["freeze.layers=9"], None, "freeze.layers=9 is out of range: the backbone has 5"),
    (
        "mask-ratio-one",
        "pretrain",
        ["objective=mae", "model=vit_micro", "objective.mask_ratio=1.0"],
        None,
        "objective.mask_ratio=1.0 is out of range: allowed is a number in (0, 1)",
    ),
    (
        "mask-ratio-zero",
        "pretrain",
        ["objective=mae", "model=vit_micro", "objective.mask_ratio=0"],
        None,
        "objective.mask_ratio=0 is out of range",
    ),
    ("mae-on-cnn", "pretrain", ["objective=mae"], None, "objective=mae needs a ViT backbone, but model.name=resnet18"),
    ("init-nothing", "finetune", ["model.init={tmp}/nothing"], None, "model.init={tmp}/nothing: no such path"),
    ("init-truncated", "finetune", ["model.init={bad}"], _truncated, f"model.init={{bad}}: {WEIGHTS} is corrupt"),
    (
        "init-other-architecture",
        "finetune",
        ["model.init={bad}"],
        _vit_backbone_dir,
        "model.init={bad}: the backbone's architecture does not match the model config (name: vit_tiny_patch16_224",
    ),
    (
        "checkpoint-other-config",
        "finetune",
        ["ckpt_path={bad}"],
        _foreign_checkpoint,
        "ckpt_path={bad}: the checkpoint is from another model config",
    ),
    (
        "folder-empty",
        "finetune",
        ["datamodule=image_folder", "datamodule.root={bad}"],
        lambda root: _image_folder(root / "empty", unreadable=False),
        "datamodule.root={bad}: train/ holds no class folder with images",
    ),
    (
        "folder-unreadable",
        "finetune",
        ["datamodule=image_folder", "datamodule.root={bad}"],
        lambda root: _image_folder(root / "broken", unreadable=True),
        "datamodule.root={bad}: cannot read image",
    ),
    # issue 16's table: what used to be a traceback or Hydra's multi-line wrapper
    ("seed-negative", "pretrain", ["seed=-1"], None, "seed=-1 is out of range: allowed is an integer in [0, 42"),
    ("rotate-negative", "finetune", ["datamodule.augment.rotate=-5"], None, "datamodule.augment.rotate=-5 is out"),
    (
        "devices-zero",
        "finetune",
        ["trainer.devices=0"],
        None,
        "trainer.devices=0: `Trainer(devices=0)` value is not a valid input using cpu accelerator",
    ),
    ("precision-fp8", "finetune", ["trainer.precision=fp8"], None, "trainer.precision='fp8' is invalid: Trainer takes"),
    ("optimizer-unknown", "finetune", ["optimizer.name=foo"], None, "optimizer.name='foo' is invalid: allowed are"),
    ("warmup-two", "finetune", ["scheduler.warmup_fraction=2"], None, "scheduler.warmup_fraction=2 is out of range"),
    ("model-unknown", "finetune", ["model.name=no_such_model"], None, "model.name=no_such_model is not a timm model"),
    ("freeze-fraction", "finetune", ["freeze.layers=2.5"], None, "freeze.layers=2.5 is invalid"),
    ("weight-decay-negative", "finetune", ["optimizer.weight_decay=-1"], None, "optimizer.weight_decay=-1 is out"),
    ("image-size-zero", "finetune", ["datamodule.image_size=0"], None, "datamodule.image_size=0 is out of range"),
    (
        "fractions-sum",
        "finetune",
        ["datamodule.val_fraction=0.5", "datamodule.test_fraction=0.5"],
        None,
        "datamodule.val_fraction=0.5, datamodule.test_fraction=0.5: val_fraction + test_fraction must be below 1",
    ),
    ("smoothing-big", "finetune", ["objective.label_smoothing=1.5"], None, "objective.label_smoothing=1.5 is out"),
    ("checkpoint-not", "finetune", ["ckpt_path=/etc/passwd"], None, "ckpt_path=/etc/passwd: refused, not a plain"),
    # what the fuzzing found (tests/test_config_fuzz.py)
    ("max-steps-word", "finetune", ["trainer.max_steps=abc"], None, "trainer.max_steps='abc' is invalid: Trainer"),
    (
        "in-chans-not-the-data",
        "finetune",
        ["model.kwargs.in_chans=3"],
        None,
        "model.kwargs.in_chans=3, datamodule.channels=1: the model's input channels must be the data's",
    ),
    ("metric-not-logged", "finetune", ["optimized_metric=val/nope"], None, "optimized_metric=val/nope is not logged"),
    (
        "nesterov-without-momentum",
        "finetune",
        ["optimizer=sgd", "optimizer.momentum=0"],
        None,
        "optimizer.nesterov=true, optimizer.momentum=0: nesterov=true needs a momentum > 0",
    ),
    ("mae-patch", "pretrain", ["objective=mae", "model=vit_micro", "model.kwargs.patch_size=3"], None, "patch_size=3"),
    (
        "mae-one-pixel-patches",
        "pretrain",
        ["objective=mae", "model=vit_micro", "model.kwargs.patch_size=1"],
        None,
        "objective.norm_pix_loss=true needs patches of two values or more",
    ),
    ("model-kwargs-refused", "finetune", ["model.kwargs.layers=[a,b]"], None, "model.kwargs for resnet18: unsupported"),
    ("model-not-for-data", "finetune", ["model.kwargs.channels=[8,8]"], None, "the model does not take this data"),
    (
        "forgetting-from-scratch",
        "finetune",
        ["finetune.measure_forgetting=true"],
        None,
        "finetune.measure_forgetting=true, model.init='none': measuring forgetting needs",
    ),
    ("devices-without-ddp", "finetune", ["trainer.devices=2"], None, "trainer.devices=2, trainer.num_nodes=1: 2 proc"),
    ("unknown-key", "finetune", ["+optimizer.momentun=0.5"], None, "optimizer.momentun is unknown: optimizer takes"),
    ("unknown-argument", "finetune", ["+objective.foo=1"], None, "objective.foo=1: Classification.__init__() got an"),
    ("nodes-nobody-starts", "finetune", ["trainer.num_nodes=2"], None, "trainer.num_nodes=2: nothing starts the other"),
    ("val-every-zero", "finetune", ["trainer.check_val_every_n_epoch=0"], None, "check_val_every_n_epoch=0 is out"),
    ("accumulate-zero", "finetune", ["trainer.accumulate_grad_batches=0"], None, "accumulate_grad_batches=0 is out"),
    (
        "epochs-unlimited",
        "finetune",
        ["trainer.max_epochs=-1"],
        None,
        "trainer.max_epochs=-1, trainer.max_steps=-1: no limit on epochs needs a limit on steps",
    ),
    ("split-too-small", "finetune", ["datamodule.test_fraction=1e-12"], None, "needs an image of every class"),
    (
        "early-stopping-never-validated",
        "finetune",
        ["callbacks=early_stopping", "trainer.max_steps=1"],
        None,
        "callbacks.early_stopping.monitor='val/acc': Early stopping conditioned on metric `val/acc` which is not",
    ),
    # through pretune's own LastCheckpoint to Lightning's ModelCheckpoint: its signature and its own message
    ("last-filename-number", "finetune", ["callbacks.last_checkpoint.filename=inf"], None, "filename=inf is invalid"),
    (
        "last-top-k",
        "finetune",
        ["callbacks.last_checkpoint.save_top_k=3"],
        None,
        "callbacks.last_checkpoint.save_top_k=3: ModelCheckpoint(save_top_k=3, monitor=None) is not a valid",
    ),
    ("callback-not-a-component", "finetune", ["callbacks.model_checkpoint=5"], None, "callbacks.model_checkpoint=5"),
    (
        "probe-longer-than-the-run",
        "finetune",
        ["freeze=lp_ft", "freeze.probe_epochs=100", "trainer.max_epochs=10"],
        None,
        "freeze.probe_epochs=100, trainer.max_epochs=10: the linear probe would take the whole run and nothing would"
        " be fine-tuned; allowed is freeze.probe_epochs below trainer.max_epochs",
    ),
    (
        "batch-larger-than-data",
        "finetune",
        ["datamodule.label_fraction=0.01", "datamodule.batch_size=64"],
        None,
        "datamodule.batch_size=64 is larger than the",
    ),
]


@pytest.mark.parametrize(("stage", "overrides", "builder", "needle"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_gives_one_line_naming_key_and_value(stage, overrides, builder, needle, tmp_path, capsys):
    _assert_one_line(stage, TINY, overrides, builder, needle, tmp_path, capsys)


def _text_file(name: str, content: bytes):
    def build(root: Path) -> Path:
        path = root / name
        path.write_bytes(content)
        return path

    return build


def _not_a_model(root: Path) -> Path:
    (root / "weights").mkdir()
    (root / "weights" / "model.safetensors").write_bytes(b"")
    return root / "weights"


def _foreign_tokenizer(root: Path) -> Path:
    """A bert_micro backbone/ whose tokenizer.json was swapped for one trained on other texts."""
    from tests.text_helpers import BERT, sample_texts, text_backbone

    micro = {**BERT, **{k: v for k, v in make_cfg("finetune", ["model=bert_micro"]).model.items() if k in BERT}}
    target = export_backbone(text_backbone(micro), root / "pre" / "backbone")
    text_backbone(micro, texts=[t[::-1] for t in sample_texts()]).processor.save_pretrained(str(target))
    return target.parent


CSV_TWO_COLUMNS = b"sentence,label\nfine,a\nbad,b\n"
# (id, stage, overrides, builder of a bad file for {bad}, the key=value the line names): datamodule=text_* picks
# model=bert_micro (and, for text_corpus, objective=mlm) unless the overrides name others.
TEXT_CASES = [
    (
        "corpus-matches-nothing",
        "pretrain",
        ["datamodule=text_corpus", "datamodule.paths=[{tmp}/none/*.txt]"],
        None,
        "datamodule.paths: {tmp}/none/*.txt matches no file",
    ),
    (
        "corpus-empty-file",
        "pretrain",
        ["datamodule=text_corpus", "datamodule.paths=[{bad}]"],
        _text_file("empty.txt", b"  \n\n"),
        "datamodule.paths: {bad} is empty",
    ),
    (
        "corpus-not-utf8",
        "pretrain",
        ["datamodule=text_corpus", "datamodule.paths=[{bad}]"],
        _text_file("latin1.txt", "caf\u00e9 cr\u00e8me".encode("latin-1")),
        "datamodule.paths: {bad} is not UTF-8 text (byte 0xe9 at position 3)",
    ),
    (
        "missing-text-column",
        "finetune",
        ["datamodule=text_classification", "datamodule.path={bad}"],
        _text_file("two.csv", CSV_TWO_COLUMNS),
        "datamodule.text_column=text: no such column in {bad} (columns: sentence, label)",
    ),
    (
        "missing-label-column",
        "finetune",
        ["datamodule=text_classification", "datamodule.path={bad}"],
        _text_file("rows.jsonl", b'{"text": "fine", "label": "a"}\n{"text": "bad"}\n'),
        "datamodule.label_column=label: line 2 of {bad} has no such key",
    ),
    (
        "one-class",
        "finetune",
        ["datamodule=text_classification", "datamodule.path={bad}"],
        _text_file("one.tsv", b"text\tlabel\nfine\tpos\ngreat\tpos\n"),
        "datamodule.label_column=label: {bad} has only one class ('pos'); allowed is at least 2",
    ),
    (
        "hf-dir-not-a-model",
        "finetune",
        ["datamodule=text_classification", "model.init=hf:{bad}"],
        _not_a_model,
        "model.init=hf:{bad}: not a Hugging Face model directory (no config.json in it)",
    ),
    (
        "hf-name-offline",
        "finetune",
        ["datamodule=text_classification", "model.init=hf:pretune-tests/no-such-model"],
        None,
        "model.init=hf:pretune-tests/no-such-model: a Hugging Face Hub name, but the hub is offline",
    ),
    (
        "tokenizer-not-the-backbones",
        "finetune",
        ["datamodule=text_classification", "model.init={bad}"],
        _foreign_tokenizer,
        "model.init={bad}: the tokenizer does not match its backbone (tokenizer.json is not the tokenizer",
    ),
    (
        "mlm-on-gpt",
        "pretrain",
        ["datamodule=text_corpus", "model=gpt_micro"],
        None,
        "objective=mlm needs a BERT-style encoder, but model=gpt_micro is a GPT-style decoder; use objective=clm",
    ),
    (
        "clm-on-bert",
        "pretrain",
        ["datamodule=text_corpus", "objective=clm"],
        None,
        "objective=clm needs a GPT-style decoder, but model=bert_micro is a BERT-style encoder; use objective=mlm",
    ),
    (
        "mae-on-text",
        "pretrain",
        ["datamodule=text_corpus", "objective=mae"],
        None,
        "objective=mae takes image inputs, but model=bert_micro is text",
    ),
    (
        "text-model-on-images",
        "finetune",
        ["datamodule=digits", "model=bert_micro"],
        None,
        "model=bert_micro takes text inputs, but datamodule=digits gives image",
    ),
    (
        "image-model-on-text",
        "finetune",
        ["datamodule=text_classification", "model=resnet_micro"],
        None,
        "model=resnet_micro takes image inputs, but datamodule=text_classification gives text",
    ),
    (
        "max-length-beyond-the-presets-positions",
        "finetune",
        ["datamodule=text_classification", "datamodule.max_length=100000"],
        None,
        "datamodule.max_length=100000 is longer than the backbone's 128 positions; allowed is at most 128",
    ),
    (
        "pooling-word",
        "finetune",
        ["datamodule=text_classification", "model.pooling=max"],
        None,
        "model.pooling='max' is invalid: allowed are 'cls', 'mean', 'last'",
    ),
    (
        "max-length-beyond-positions",
        "pretrain",
        ["datamodule=text_corpus", "datamodule.paths=[{bad}]", "datamodule.max_length=256"],
        _text_file("notes.txt", b"some notes\nmore notes\n"),
        "datamodule.max_length=256 is longer than the backbone's 128 positions; allowed is at most 128",
    ),
]


@pytest.mark.parametrize(
    ("stage", "overrides", "builder", "needle"), [c[1:] for c in TEXT_CASES], ids=[c[0] for c in TEXT_CASES]
)
def test_bad_text_input_gives_one_line_naming_key_and_value(stage, overrides, builder, needle, tmp_path, capsys):
    _assert_one_line(stage, ["debug=limit"], overrides, builder, needle, tmp_path, capsys)


def _assert_one_line(stage, tiny, overrides, builder, needle, tmp_path, capsys):
    bad = builder(tmp_path) if builder else None
    fill = lambda text: text.format(tmp=tmp_path, bad=bad)  # noqa: E731
    out_dir = tmp_path / "run"
    cfg = make_cfg(stage, [*tiny, *map(fill, overrides)], out_dir, return_hydra=True)
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    HydraConfig.instance().set_config(cfg)  # as a script's job sees it: the line names model=..., not its class
    with open_dict(cfg):
        del cfg["hydra"]
    try:
        with pytest.raises(SystemExit) as exit_:
            main(cfg)
    finally:
        HydraConfig.instance().cfg = None
    assert exit_.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and fill(needle) in errors[0], errors
    # Recorded as failed, with nothing that looks like a result.
    assert json.loads((out_dir / "metrics.json").read_text())["status"] == "failed"
    assert not (out_dir / "backbone").exists() and not list(out_dir.glob("checkpoints/*.ckpt"))
