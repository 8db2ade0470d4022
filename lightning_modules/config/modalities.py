"""Which inputs each shipped component takes, readable before torch is imported: a mismatch
(``objective=mae datamodule=<text>``, ``objective=<text objective> model=resnet_micro``) is one line at once.

The classes declare the same (``Backbone.modality``, ``Objective.modalities``, ``PretuneDataModule.modality``)
and refuse a mismatch when built from Python; ``tests/test_config.py`` checks that these tables agree with
them. A component of a user's own (a ``_target_`` not listed here) is checked by its class alone.
"""

from __future__ import annotations

import re
from contextlib import contextmanager

from omegaconf import DictConfig, OmegaConf

from lightning_modules.core.errors import ConfigError

# model.type -> (the Backbone class that builds it, its modality)
BACKBONE_TYPES = {
    "timm": ("lightning_modules.backbones.image.TimmBackbone", "image"),
    "transformers": ("lightning_modules.backbones.text.TransformersBackbone", "text"),
    "dual_encoder": ("lightning_modules.backbones.dual.DualEncoder", "image_text"),
}
# model.type of a backbone made of towers -> {tower name (its key under model): the modality it must have}
TOWERS = {"dual_encoder": {"image": "image", "text": "text"}}
# model.name of a text backbone built from scratch -> its kind: a BERT-style encoder or a GPT-style decoder
TEXT_ARCH_KINDS = {"bert": "encoder", "gpt2": "decoder"}
# datamodule _target_ -> the modality of its batches
DATAMODULES = {
    "datamodules.sources.digits.DigitsDataModule": "image",
    "datamodules.sources.mnist5k.MNIST5kDataModule": "image",
    "datamodules.sources.image_folder.ImageFolderDataModule": "image",
    "datamodules.sources.shards.ShardsDataModule": "image",
    "datamodules.sources.text_corpus.TextCorpusDataModule": "text",
    "datamodules.sources.text_classification.TextClassificationDataModule": "text",
    "datamodules.sources.image_text.ImageTextDataModule": "image_text",
}
# objective _target_ -> the modalities it takes
OBJECTIVES = {
    "lightning_modules.objectives.classification.Classification": ("image", "text"),
    "lightning_modules.objectives.mae.MAE": ("image",),
    "lightning_modules.objectives.simclr.SimCLR": ("image",),
    "lightning_modules.objectives.byol.BYOL": ("image",),
    "lightning_modules.objectives.dino.DINO": ("image",),
    "lightning_modules.objectives.vicreg.VICReg": ("image",),
    "lightning_modules.objectives.mlm.MLM": ("text",),
    "lightning_modules.objectives.clm.CLM": ("text",),
    "lightning_modules.objectives.clip.CLIP": ("image_text",),
}
# objectives that only pre-train (a fine-tune's default metrics and test step are a classifier's)
PRETRAIN_ONLY = {"lightning_modules.objectives.clip.CLIP": "objective=clip"}
# objective _target_ -> the kind of text backbone it needs (the class says the same: ``Objective.text_kind``)
OBJECTIVE_TEXT_KINDS = {
    "lightning_modules.objectives.mlm.MLM": "encoder",
    "lightning_modules.objectives.clm.CLM": "decoder",
}
KIND_WORDS = {"encoder": "a BERT-style encoder", "decoder": "a GPT-style decoder"}
KIND_OBJECTIVES = {"encoder": "objective=mlm", "decoder": "objective=clm"}


def backbone_type(model) -> str:
    """The model.type that builds the backbone: ``model.init=hf:...`` is always a transformers model,
    whatever the preset, so ``model=`` can be left out for a Hugging Face model."""
    if str(model.get("init", "none")).startswith("hf:"):
        return "transformers"
    return model.get("type", "timm")


def towers_of(model) -> dict:
    """The tower configs of a backbone made of towers (``model.image``, ``model.text`` of a dual encoder), by
    name; empty for a backbone of one piece."""
    names = TOWERS.get(backbone_type(model), {})
    return {name: model[name] for name in names if model.get(name) is not None}


@contextmanager
def tower_errors(name: str, tower_cfg):
    """A tower is built and checked by code that names its keys ``model.<key>``; a mistake in it names
    ``model.<tower>.<key>``. Only the tower config's own keys are rewritten (``model.safetensors`` in a message
    is a file, not a key)."""
    keys = "|".join(re.escape(str(k)) for k in sorted(tower_cfg, key=len, reverse=True))
    try:
        yield
    except ConfigError as err:
        if not keys:
            raise
        message = re.sub(rf"(?<![\w/.])model\.(?=(?:{keys})\b)", f"model.{name}.", str(err))
        raise ConfigError(message) from err


def model_modality(model: DictConfig) -> str:
    type_ = backbone_type(model)
    if type_ not in BACKBONE_TYPES:
        raise ConfigError(f"model.type={type_} is unknown: allowed are {sorted(BACKBONE_TYPES)}")
    return BACKBONE_TYPES[type_][1]


def _choice(cfg: DictConfig, group: str) -> str:
    """How the user named a component: ``datamodule=digits`` (Hydra's choice), else its class."""
    from hydra.core.hydra_config import HydraConfig

    init = str(OmegaConf.select(cfg, "model.init", default=None))
    if group == "model" and init.startswith("hf:"):
        return f"model.init={init}"
    if HydraConfig.initialized():
        choice = HydraConfig.get().runtime.choices.get(group)
        if choice:
            return f"{group}={choice}"
    target = OmegaConf.select(cfg, f"{group}._target_", default=None) or OmegaConf.select(cfg, f"{group}.name")
    return f"{group} {str(target).rsplit('.', 1)[-1]}"


# scripts/evaluate.py task -> (the model's modality, the datamodule's modality) it takes
EVALUATIONS = {"zero_shot": ("image_text", "image"), "retrieval": ("image_text", "image_text")}


def check_modalities(cfg: DictConfig) -> None:
    if OmegaConf.select(cfg, "stage") == "evaluate":
        return _check_evaluation(cfg)
    model = model_modality(cfg.model)
    data = DATAMODULES.get(OmegaConf.select(cfg, "datamodule._target_", default=None))
    objective = OBJECTIVES.get(OmegaConf.select(cfg, "objective._target_", default=None))
    if objective is not None:
        for group, modality in (("model", model), ("datamodule", data)):
            if modality is not None and modality not in objective:
                raise ConfigError(
                    f"{_choice(cfg, 'objective')} takes {' or '.join(objective)} inputs, but"
                    f" {_choice(cfg, group)} is {modality}; pick a {'/'.join(objective)} {group}"
                )
    if data is not None and model != data:
        raise ConfigError(
            f"{_choice(cfg, 'model')} takes {model} inputs, but {_choice(cfg, 'datamodule')} gives {data}"
        )
    _check_text_kind(cfg)
    target = OmegaConf.select(cfg, "objective._target_", default=None)
    if target in PRETRAIN_ONLY and OmegaConf.select(cfg, "stage") == "finetune":
        raise ConfigError(
            f"{PRETRAIN_ONLY[target]} is a pre-training objective: run it with scripts/pretrain.py (lock a tower"
            " there with freeze.image=all or freeze.text=all); fine-tune one tower with scripts/finetune.py"
            " model.init=<run>/backbone/image (or backbone/text)"
        )


def _check_evaluation(cfg: DictConfig) -> None:
    task = OmegaConf.select(cfg, "task")
    if task not in EVALUATIONS:
        raise ConfigError(f"task={task!r} is invalid: allowed are {', '.join(repr(t) for t in EVALUATIONS)}")
    need_model, need_data = EVALUATIONS[task]
    model = model_modality(cfg.model)
    if model != need_model:
        raise ConfigError(
            f"task={task} evaluates an image–text model (a CLIP pre-training run, model=clip_micro), but"
            f" {_choice(cfg, 'model')} is {model}"
        )
    data = DATAMODULES.get(OmegaConf.select(cfg, "datamodule._target_", default=None))
    if data is not None and data != need_data:
        example = "datamodule=digits, mnist5k or image_folder" if need_data == "image" else "datamodule=image_text"
        raise ConfigError(
            f"task={task} takes {need_data} data ({example}), but {_choice(cfg, 'datamodule')} gives {data}"
        )
    if str(cfg.model.get("init", "none")) in ("none", "timm"):
        raise ConfigError(
            f"model.init={cfg.model.get('init')}: task={task} evaluates a pre-trained model; allowed is a CLIP"
            " pre-training run dir (or its backbone/ dir)"
        )


def check_towers(model) -> None:
    """Each tower of a dual encoder is a backbone of the modality its place asks for; freeze.<tower> needs the tower."""
    towers = TOWERS.get(backbone_type(model), {})
    for name, modality in towers.items():
        tower = model.get(name)
        if tower is None or not hasattr(tower, "get"):
            raise ConfigError(f"model.{name} is required for model.type={backbone_type(model)}: a {modality} backbone")
        type_ = backbone_type(tower)
        if type_ in TOWERS or BACKBONE_TYPES.get(type_, (None, None))[1] != modality:
            allowed = sorted(t for t, (_, m) in BACKBONE_TYPES.items() if m == modality)
            raise ConfigError(
                f"model.{name}.type={type_} cannot be the {name} tower, which takes {modality} inputs: allowed"
                f" {'is' if len(allowed) == 1 else 'are'} {', '.join(allowed)}"
            )
    if towers and str(model.get("init", "none")) != "none":
        for name in towers:
            if str(model[name].get("init", "none")) != "none":
                raise ConfigError(
                    f"model.{name}.init={model[name].get('init')}: model.init={model.get('init')} already loads every"
                    f" tower; allowed is model.{name}.init=none with it"
                )


def _check_text_kind(cfg: DictConfig) -> None:
    """MLM on a GPT-style decoder, CLM on a BERT-style encoder: refused here for the presets; a Hugging Face
    model's kind is known once it is loaded, where the objective refuses it with the same line."""
    need = OBJECTIVE_TEXT_KINDS.get(OmegaConf.select(cfg, "objective._target_", default=None))
    model = cfg.model
    if need is None or backbone_type(model) != "transformers" or str(model.get("init")).startswith("hf:"):
        return
    kind = TEXT_ARCH_KINDS.get(model.get("name"))
    if kind is not None and kind != need:
        raise ConfigError(kind_mismatch(_choice(cfg, "objective"), need, _choice(cfg, "model"), kind))


def kind_mismatch(objective: str, need: str, model: str, kind: str) -> str:
    return f"{objective} needs {KIND_WORDS[need]}, but {model} is {KIND_WORDS[kind]}; use {KIND_OBJECTIVES[kind]}"
