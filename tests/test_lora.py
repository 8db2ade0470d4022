"""freeze=lora: peft's adapters on a frozen backbone. The base stays bit-for-bit the pre-trained one, the loss falls,
the optimizer holds the adapters and the head only, LP-FT probes before the adapters train, freeze.layers keeps the
adapters above its groups; model/ is the merged network and model/adapter/ peft's own folder, both giving pretune's
logits (1e-5); every bad input is one line. (Kill-and-resume: tests/test_resume.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lightning_modules.backbones.adapters import adapter_ids, load_adapter
from lightning_modules.callbacks.freezing import Adapters
from lightning_modules.core.errors import ConfigError
from tests.helpers import fit_tiny, resnet, vit
from tests.test_model_export import (
    PARITY,
    TEXT_MODEL,
    TINY_TRAIN,
    _run,
    in_a_clean_process,
    write_image_folder,
    write_texts,
)


def _base(backbone) -> dict[str, torch.Tensor]:
    """The backbone's own tensors (parameters and buffers) by their names before adapters (``.base_layer`` gone)."""
    return {
        k.replace(".base_layer", ""): v.clone()
        for k, v in backbone.model.state_dict().items()
        if "lora_" not in k and "ia3_" not in k
    }


class Losses:
    """A Lightning callback keeping each epoch's mean training loss and the adapters' values at each epoch end."""

    def __new__(cls):
        from pytorch_lightning.callbacks import Callback

        class _Losses(Callback):
            def __init__(self):
                self.losses, self.adapters = [], []

            def on_train_epoch_end(self, trainer, pl_module):
                self.losses.append(float(pl_module._loss_sum / pl_module._loss_steps))  # (before it is logged)
                ids = adapter_ids(pl_module.backbone)
                self.adapters.append([p.detach().clone() for p in pl_module.backbone.parameters() if id(p) in ids])

        return _Losses()


@pytest.mark.parametrize(
    ("make", "method"),
    [(resnet, "lora"), (vit, "dora"), (resnet, "ia3")],  # (vit with lora: the LP-FT test below)
    ids=["resnet-lora", "vit-dora", "resnet-ia3"],
)
def test_the_base_stays_bit_for_bit_and_only_adapters_and_head_train(make, method):
    backbone = make()
    original = _base(backbone)
    freezer = Adapters(method=method, rank=None if method == "ia3" else 4)
    freezer.validate(backbone)
    freezer.prepare(backbone)
    assert _base(backbone).keys() == original.keys()  # the adapters wrap the modules, names and all
    losses = Losses()
    module, _ = fit_tiny(backbone, [freezer, losses], epochs=3, optimizer={"name": "adamw", "lr": 3e-2})
    after = _base(module.backbone)
    for key, value in original.items():  # weights and BatchNorm statistics alike
        assert torch.equal(after[key], value), key
    assert losses.losses[-1] < losses.losses[0], losses.losses
    assert any(not torch.equal(a, b) for a, b in zip(losses.adapters[0], losses.adapters[-1], strict=True))
    optimizer = module.trainer.optimizers[0]
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    trained = adapter_ids(module.backbone) | {id(p) for p in module.objective.parameters()}
    assert held == trained  # the frozen base is not in the optimizer at all
    assert {id(p) for p in optimizer.state} == trained
    assert sum(p.numel() for p in module.parameters() if p.requires_grad) < 0.2 * sum(
        p.numel() for p in module.parameters()
    )


def test_lp_ft_probes_the_head_first_and_layers_keep_adapters_above_them():
    backbone = vit()
    freezer = Adapters(rank=2, layers=2, probe_epochs=1)
    freezer.validate(backbone)
    freezer.prepare(backbone)
    groups = backbone.layer_groups()
    ids = adapter_ids(backbone)
    assert not any(id(p) in ids for g in groups[:2] for p in g.params.values())  # none in the first two groups
    assert all(any(id(p) in ids for p in g.params.values()) for g in groups[2:])
    start = [p.detach().clone() for p in backbone.parameters() if id(p) in ids]
    losses = Losses()
    fit_tiny(backbone, [freezer, losses], epochs=2)
    # the probe's epoch left the adapters where they started; the next one trained them
    probed, tuned = losses.adapters
    assert all(torch.equal(a, b) for a, b in zip(start, probed, strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(probed, tuned, strict=True))


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        (["freeze.rank=0"], "freeze.rank=0 is out of range"),
        (["freeze.method=ia3", "freeze.rank=4"], "freeze.rank=4 with freeze.method=ia3"),
        (["+freeze.method=lora", "freeze=gradual"], "nothing to unfreeze gradually"),
        (["freeze.targets='abc('"], "freeze.targets='abc(' is not a regex"),
    ],
)
def test_bad_keys_are_one_line_before_anything_runs(overrides, says):
    from lightning_modules.config.check import check_config
    from tests.conftest import make_cfg

    with pytest.raises(ConfigError) as err:
        check_config(make_cfg("finetune", ["freeze=lora", *overrides]))
    assert says in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("make", "options", "says"),
    [
        (resnet, {"targets": "attention"}, "freeze.targets=attention matches no module of the backbone; modules"),
        (vit, {"targets": ["nope"]}, "blocks.*.attn.qkv"),
        (vit, {"rank": 64}, "freeze.rank=64 is above the width of the backbone's module"),
        (vit, {"targets": "blocks.0.*", "layers": 2}, "in the layer groups above the first 2"),
    ],
)
def test_bad_targets_and_ranks_are_one_line_naming_what_exists(make, options, says):
    freezer = Adapters(**options)
    with pytest.raises(ConfigError) as err:
        freezer.prepare(make())
    assert says in str(err.value) and "\n" not in str(err.value)


def test_a_backbone_peft_cannot_wrap_is_one_line():
    from lightning_modules.backbones.base import Backbone

    class Norms(Backbone):
        modality, type = "image", "norms"

        def grouped_parameter_names(self):
            return [("all", [n for n, _ in self.model.named_parameters()])]

    with pytest.raises(ConfigError, match=r"^freeze=lora: the backbone \(Norms, LayerNorm\) has no module peft"):
        Adapters().prepare(Norms(torch.nn.LayerNorm(4), 4))


# --- export: model/ merged, model/adapter/ in peft's format ------------------------------------------------------
def _module(run_dir: Path):
    """The run's network as pretune tests it (its config, adapters added as the run added them, its best
    checkpoint), its datamodule, and the checkpoint's weights."""
    from lightning_modules.backbones.factory import build_backbone
    from lightning_modules.config.library import build
    from lightning_modules.objectives.base import build_objective
    from lightning_modules.training.module import PretuneModule

    cfg = OmegaConf.load(run_dir / "config.yaml")
    datamodule = build(cfg.datamodule, "datamodule", labeled=True)
    backbone = build_backbone(OmegaConf.to_container(cfg.model, resolve=True), data=datamodule)
    datamodule.use_backbone(backbone)
    datamodule.setup("fit")
    build(cfg.freeze, "freeze").prepare(backbone)
    module = PretuneModule(backbone, build_objective(cfg.objective, backbone, datamodule.spec), {}, {})
    state = torch.load(run_dir / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    module.load_state_dict(state)
    return module.eval(), datamodule, state


def _parities(run_dir: Path) -> tuple[float, float]:
    """max |logit difference| from pretune's, on the test split: of model/ (merged, read back without peft's
    layers) and of peft's PeftModel.from_pretrained(the same classifier holding the pre-trained weights and a
    random head, model/adapter)."""
    from lightning_modules.backbones.model_dir import read_model

    module, datamodule, state = _module(run_dir)
    merged, _ = read_model(run_dir / "model")
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    base, _ = read_model(run_dir / "model")  # the family's classifier; its body gets the pre-trained weights back
    body = {
        k.removeprefix("backbone.model.").replace(".base_layer", ""): v
        for k, v in state.items()
        if k.startswith("backbone.model.") and "lora_" not in k
    }
    prefix = _prefix_in(base.model, body)
    missing = base.model.load_state_dict({prefix + k: v for k, v in body.items()}, strict=False).missing_keys
    assert len(missing) == 2, missing  # only the head's weight and bias are not the backbone's
    torch.nn.init.normal_(base.model.get_submodule(missing[0].rsplit(".", 1)[0]).weight)  # the adapter brings it
    base.model = load_adapter(base.model, run_dir / "model" / "adapter")
    worst = [0.0, 0.0]
    with torch.no_grad():
        for batch in datamodule.eval_loader("test", sharded=False):
            expected = module(batch)["logits"]
            for i, model in enumerate((merged, base)):
                worst[i] = max(worst[i], float((model(batch) - expected).abs().max()))
    return worst[0], worst[1]


def _prefix_in(classifier: torch.nn.Module, body: dict) -> str:
    names = set(classifier.state_dict())
    return "" if all(k in names for k in body) else "backbone."


def test_image_and_text_exports_give_pretune_logits(tmp_path):
    root = write_image_folder(tmp_path / "photos", {"train": 8, "val": 3, "test": 4})
    image = ["model=resnet_micro", "datamodule=image_folder", f"datamodule.root={root}", "datamodule.image_size=16"]
    lora = ["freeze=lora", "freeze.rank=4", "optimizer.lr=3e-2"]
    metrics = _run("finetune", [*image, "datamodule.batch_size=8", *lora, *TINY_TRAIN], tmp_path / "image")
    assert metrics["model/adapter"] == "model/adapter", metrics
    texts = [f"datamodule.path={write_texts(tmp_path / 'train.csv', 20, 0)}", "datamodule.val_fraction=0.2"]
    texts.append(f"datamodule.test_path={write_texts(tmp_path / 'test.csv', 4, 1)}")
    metrics = _run("finetune", [*TEXT_MODEL, *texts, *lora, *TINY_TRAIN], tmp_path / "text")
    assert metrics["model/adapter"] == "model/adapter", metrics
    for run in ("image", "text"):
        merged, adapter = _parities(tmp_path / run)
        assert merged <= PARITY and adapter <= PARITY, (run, merged, adapter)
    # model/ is plain timm: loaded by timm alone, peft never imported
    model_dir = tmp_path / "image" / "model"
    loaded = in_a_clean_process(f"""
        import json, sys, timm
        model = timm.create_model("local-dir:{model_dir}", pretrained=True)
        print("RESULT", json.dumps({{"peft": "peft" in sys.modules, "classes": model.num_classes}}))
    """)
    assert loaded == {"peft": False, "classes": 3}
    # the adapter on another base (the text classifier's): one line
    from lightning_modules.backbones.model_dir import read_model

    other, _ = read_model(tmp_path / "text" / "model")
    with pytest.raises(ConfigError) as err:
        load_adapter(other.model, tmp_path / "image" / "model" / "adapter")
    assert "the adapter does not fit this base model" in str(err.value) and "\n" not in str(err.value)


def test_a_dual_encoder_gets_adapters_per_tower_and_merges_to_the_same_features():
    from lightning_modules.backbones.adapters import merged, peft_models, unadapted
    from tests.helpers import batch
    from tests.test_clip import CAPTIONS, _tiny_clip

    backbone, _ = _tiny_clip(CAPTIONS)
    freezer = Adapters(rank=2, text="all")  # LiT with adapters: the text tower locked, none there
    freezer.validate(backbone)
    freezer.prepare(backbone)
    assert list(peft_models(backbone)) == ["image"]
    ids = adapter_ids(backbone)
    assert ids and not any(id(p) in ids for p in backbone.text.parameters())
    for name, p in backbone.image.model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)  # a trained adapter: the merge has something to fold in
    tok = backbone.text.processor(CAPTIONS[:4], padding=True, return_tensors="pt")
    inputs = {"image": batch(4)["image"], "input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"]}
    plain = merged(backbone)
    assert not any("lora_" in n or "base_layer" in n for n in plain.state_dict())
    with torch.no_grad():
        adapted, folded = backbone.eval()(inputs), plain.eval()(inputs)
        before = unadapted(backbone).eval()(inputs)
    for tower in ("image", "text"):
        assert torch.allclose(adapted[tower], folded[tower], atol=1e-5), tower
    assert not torch.allclose(adapted["image"], before["image"], atol=1e-3)  # (the adapters did change something)
