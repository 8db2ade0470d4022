"""Which inputs each shipped component takes, readable before torch is imported: a mismatch
(``objective=mae datamodule=<text>``, ``objective=<text objective> model=resnet_micro``) is one line at once.

The classes declare the same (``Backbone.modality``, ``Objective.modalities``, ``PretuneDataModule.modality``)
and refuse a mismatch when built from Python; ``tests/test_config.py`` checks that these tables agree with
them. A component of a user's own (a ``_target_`` not listed here) is checked by its class alone.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from lightning_modules.config.errors import ConfigError

# model.type -> (the Backbone class that builds it, its modality)
BACKBONE_TYPES = {
    "timm": ("lightning_modules.backbones.image.TimmBackbone", "image"),
}
# datamodule _target_ -> the modality of its batches
DATAMODULES = {
    "datamodules.digits.DigitsDataModule": "image",
    "datamodules.mnist5k.MNIST5kDataModule": "image",
    "datamodules.image_folder.ImageFolderDataModule": "image",
    "datamodules.shards.ShardsDataModule": "image",
}
# objective _target_ -> the modalities it takes
OBJECTIVES = {
    "lightning_modules.objectives.classification.Classification": ("image", "text"),
    "lightning_modules.objectives.mae.MAE": ("image",),
    "lightning_modules.objectives.simclr.SimCLR": ("image",),
}


def model_modality(model: DictConfig) -> str:
    type_ = model.get("type", "timm")
    if type_ not in BACKBONE_TYPES:
        raise ConfigError(f"model.type={type_} is unknown: allowed are {sorted(BACKBONE_TYPES)}")
    return BACKBONE_TYPES[type_][1]


def _choice(cfg: DictConfig, group: str) -> str:
    """How the user named a component: ``datamodule=digits`` (Hydra's choice), else its class."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        choice = HydraConfig.get().runtime.choices.get(group)
        if choice:
            return f"{group}={choice}"
    target = OmegaConf.select(cfg, f"{group}._target_", default=None) or OmegaConf.select(cfg, f"{group}.name")
    return f"{group} {str(target).rsplit('.', 1)[-1]}"


def check_modalities(cfg: DictConfig) -> None:
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
