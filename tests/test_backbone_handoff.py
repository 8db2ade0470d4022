"""Layer groups, export -> import round trip, and the refusals of a backbone that does not fit."""

from __future__ import annotations

import pytest
import torch
import yaml

from lightning_modules.backbones.factory import build_backbone
from lightning_modules.backbones.handoff import export_backbone
from lightning_modules.core.errors import ConfigError
from lightning_modules.core.locations import CONFIG, WEIGHTS
from tests.helpers import RESNET, TIMM, VIT, resnet, vit


def test_layer_groups_are_ordered_and_cover_every_parameter():
    for backbone, names in (
        (vit(), ["stem", "blocks.0", "blocks.1+norm"]),
        (resnet(), ["stem", "layer1", "layer2", "layer3", "layer4"]),
    ):
        groups = backbone.layer_groups()
        assert [g.name for g in groups] == names
        grouped = [id(p) for g in groups for p in g.params.values()]
        assert sorted(grouped) == sorted(id(p) for p in backbone.parameters())  # each param exactly once


def test_vit_micro_and_resnet_micro_are_micro(cfg_factory):
    from omegaconf import OmegaConf

    from lightning_modules.backbones.image import TimmBackbone

    for model in ("vit_micro", "resnet_micro"):
        cfg = cfg_factory("finetune", f"model={model}")
        m = OmegaConf.to_container(cfg.model, resolve=True)
        backbone = TimmBackbone(m["name"], m["kwargs"])
        assert sum(p.numel() for p in backbone.parameters()) < 1_000_000
        assert backbone({"image": torch.randn(2, 1, 32, 32)}).shape == (2, backbone.num_features)


def _model_cfg(spec, init):
    return {"_target_": TIMM, "name": spec[0], "kwargs": dict(spec[1]), "init": str(init)}


@pytest.mark.parametrize("spec", [VIT, RESNET], ids=["vit", "resnet"])
def test_export_import_round_trip_reproduces_features(spec, tmp_path):
    torch.manual_seed(0)
    source = build_backbone(_model_cfg(spec, "none"))
    target = export_backbone(source, tmp_path / "run" / "backbone", provenance={"objective": "test"})
    assert (target / WEIGHTS).is_file() and (target / CONFIG).is_file()
    meta = yaml.safe_load((target / CONFIG).read_text())
    assert meta["name"] == spec[0] and meta["kwargs"] == spec[1]
    x = {"image": torch.randn(3, 1, 16, 16)}
    source.eval()
    for init in (target, tmp_path / "run"):  # the backbone dir and the run dir both work
        torch.manual_seed(1)  # a different random init, overwritten by the load
        loaded = build_backbone(_model_cfg(spec, init)).eval()
        assert torch.equal(loaded(x), source(x))
        for (k, a), (_, b) in zip(loaded.model.state_dict().items(), source.model.state_dict().items(), strict=True):
            assert torch.equal(a, b), k


def test_mismatched_architecture_is_refused(tmp_path):
    export_backbone(build_backbone(_model_cfg(VIT, "none")), tmp_path / "backbone")
    deeper = dict(VIT[1], depth=3)
    with pytest.raises(ConfigError, match=r"does not match.*kwargs.depth: 2 \(saved\) vs 3 \(model\)"):
        build_backbone({"_target_": TIMM, "name": VIT[0], "kwargs": deeper, "init": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"name: vit_tiny_patch16_224 \(saved\) vs resnet18 \(model\)"):
        build_backbone(_model_cfg(RESNET, tmp_path))


def test_corrupt_or_truncated_weights_are_refused(tmp_path):
    target = export_backbone(build_backbone(_model_cfg(VIT, "none")), tmp_path / "backbone")
    data = (target / WEIGHTS).read_bytes()
    (target / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match=f"model.init={target}: {WEIGHTS} is corrupt or truncated"):
        build_backbone(_model_cfg(VIT, target))


def test_weights_of_another_shape_are_refused(tmp_path):
    """A config.yaml that claims the right architecture over weights that are not: keys and shapes checked."""
    target = export_backbone(
        build_backbone({"_target_": TIMM, "name": VIT[0], "kwargs": dict(VIT[1], embed_dim=16), "init": "none"}),
        tmp_path / "backbone",
    )
    meta = yaml.safe_load((target / CONFIG).read_text())
    meta["kwargs"]["embed_dim"] = VIT[1]["embed_dim"]
    (target / CONFIG).write_text(yaml.safe_dump(meta))
    with pytest.raises(ConfigError, match="weights do not fit the model.*shape: "):
        build_backbone(_model_cfg(VIT, target))


def test_missing_init_path_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="no such path"):
        build_backbone(_model_cfg(VIT, tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="found no backbone/"):
        build_backbone(_model_cfg(VIT, tmp_path / "empty"))


def test_timm_pretrained_fails_clearly_offline(monkeypatch):
    import huggingface_hub.constants

    # The hub's offline mode (HF_HUB_OFFLINE=1): refused at once, where a machine without a network waits ~45 s on
    # connection retries before the same error reaches the same line.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConfigError, match="model.init=timm: could not load timm's pretrained weights"):
        build_backbone({"_target_": TIMM, "name": "resnet18", "kwargs": {}, "init": "timm"})


def test_export_is_atomic_on_failure(tmp_path, monkeypatch):
    import safetensors.torch

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_model", boom)
    with pytest.raises(OSError):
        export_backbone(build_backbone(_model_cfg(VIT, "none")), tmp_path / "backbone")
    assert list(tmp_path.iterdir()) == []  # no half-written backbone/, no temp dir left
