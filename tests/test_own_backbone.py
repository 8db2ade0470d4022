"""A backbone of the user's own, plugged in by naming its class (``model._target_=mypkg.MyBackbone``): a module
outside pretune, composed through Hydra with keys of its own, fine-tuned end to end, its first layer group frozen
bit for bit by ``freeze.layers=1`` like any shipped backbone's."""

from __future__ import annotations

import json

import torch

import lightning_modules.runtime.run as run_module
from lightning_modules.backbones import factory
from lightning_modules.runtime.cli import main
from tests.conftest import make_cfg

MODULE = "pretune_user_mlp"  # a name no other test uses: the config check caches what it read of a class
SOURCE = '''
"""A two-layer MLP on small images: what a user writes to bring a backbone of their own."""

from torch import nn

from lightning_modules.backbones.base import Backbone


class DigitsMLP(Backbone):
    modality = "image"  # reads batch["image"]; the config check reads this line to match it with the data
    type = "digits_mlp"  # a spec's type, saved with exported weights

    def __init__(self, side: int, in_channels: int, width: int):
        layers = [nn.Flatten(), nn.Linear(in_channels * side * side, width), nn.ReLU(), nn.Linear(width, width)]
        super().__init__(nn.Sequential(*layers, nn.ReLU()), num_features=width)
        self.side, self.in_channels, self.width = side, in_channels, width

    @classmethod
    def from_config(cls, model_cfg: dict, data=None, directory=None):
        return cls(model_cfg["side"], model_cfg["in_channels"], model_cfg["width"])

    @staticmethod
    def spec_of(model_cfg: dict, saved=None) -> dict:
        keys = ("side", "in_channels", "width")
        return {"type": DigitsMLP.type, "name": "mlp", **{k: model_cfg[k] for k in keys}}

    @property
    def spec(self) -> dict:
        return DigitsMLP.spec_of({"side": self.side, "in_channels": self.in_channels, "width": self.width})

    def forward(self, batch):
        return self.model(batch["image"])

    def grouped_parameter_names(self):
        return [("hidden1", ["1.weight", "1.bias"]), ("hidden2", ["3.weight", "3.bias"])]
'''


def _install(tmp_path, monkeypatch) -> None:
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / f"{MODULE}.py").write_text(SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path / "code"))


def test_a_users_backbone_fine_tunes_with_its_first_group_frozen(tmp_path, monkeypatch):
    _install(tmp_path, monkeypatch)
    cfg = make_cfg(
        "finetune",
        [
            "datamodule=digits",
            "datamodule.image_size=8",
            "logger=none",
            "trainer.max_epochs=1",
            f"model._target_={MODULE}.DigitsMLP",
            "+model.side=${datamodule.image_size}",  # its own keys: no pretune rule, passed to its from_config
            "+model.in_channels=${datamodule.channels}",
            "+model.width=64",
            "optimizer.lr=1e-2",
            "freeze.layers=1",
        ],
        tmp_path / "run",
    )

    built = {}

    # the run's own, keeping the backbone and its initial weights
    def build_backbone(model_cfg, data=None, source=None):
        backbone = factory.build_backbone(model_cfg, data, source)
        built["backbone"], built["before"] = backbone, {k: v.clone() for k, v in backbone.state_dict().items()}
        return backbone

    monkeypatch.setattr(run_module, "build_backbone", build_backbone)
    main(cfg)

    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["test/acc"] > 0.5, metrics  # it learned (10 classes)
    backbone = built["backbone"]
    assert type(backbone).__module__ == MODULE
    groups = backbone.layer_groups()
    assert [g.name for g in groups] == ["hidden1", "hidden2"]
    after = backbone.state_dict()
    frozen, trained = (set(g.params) for g in groups)
    assert all(torch.equal(built["before"][f"model.{k}"], after[f"model.{k}"]) for k in frozen)
    assert not any(torch.equal(built["before"][f"model.{k}"], after[f"model.{k}"]) for k in trained)
    assert metrics["params/frozen"] == sum(p.numel() for p in groups[0].params.values())


def test_a_users_backbone_is_matched_with_the_data_by_what_its_class_declares(tmp_path, monkeypatch, capsys):
    """Read from its source before torch is imported, as for pretune's own: the line names the class."""
    from tests.test_bad_inputs import _assert_one_line

    _install(tmp_path, monkeypatch)
    overrides = ["datamodule=text_classification", f"model._target_={MODULE}.DigitsMLP"]
    needle = f"model._target_={MODULE}.DigitsMLP takes image inputs, but datamodule=text_classification gives text"
    _assert_one_line("finetune", ["debug=limit"], overrides, None, needle, tmp_path, capsys)
