"""Image backbones from timm: any ``timm.create_model`` name, pooled features, layer groups from timm's own
``group_matcher`` (stem first, then blocks/stages), so ``freeze.layers=N`` means the same for a ViT and a ResNet.

Weights trained elsewhere (``model.init=timm``, ``model.init=file:<path>``) expect their images as they were
trained on: ``preprocessing`` carries timm's pretrained config for the model (mean, std, input size), which the
datamodule takes in ``use_backbone``.

Leaving pretune, in timm's own Hugging Face Hub layout (``config.json``: ``architecture``, ``num_classes``,
``label_names``, ``model_args``, ``pretrained_cfg`` with the data's input size, mean, std, crop and interpolation;
``model.safetensors``), written by timm's own ``save_for_hf``: ``timm.create_model("local-dir:<dir>",
pretrained=True)`` builds the model and loads the weights, and ``timm.data.resolve_data_config`` +
``create_transform`` give the evaluation preprocessing. A pre-training's ``backbone/`` gets that ``config.json``
with ``num_classes: 0`` (the pooled features); a fine-tune's ``model/`` is the model with its classifier, timm's own
head for the architecture (``get_classifier()``) holding pretune's head."""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path

import timm
import torch
from timm.models import group_parameters
from torch import nn

from lightning_modules.backbones.base import Backbone, evaluating
from lightning_modules.backbones.weight_files import load_weight_file
from lightning_modules.config.library import library_error
from lightning_modules.core.errors import ConfigError
from lightning_modules.core.locations import is_file_init

PREPROCESS_KEYS = ("mean", "std", "input_size")  # model.<key> overrides the weights' pretrained config
# What timm's config of an architecture says about the weights it ships, not about these (dropped on export).
WEIGHTS_PROVENANCE = (
    "tag", "license", "hf_hub_id", "hf_hub_filename", "url", "file", "source", "state_dict",
    "paper_ids", "paper_name", "origin_url", "notes", "test_input_size", "test_crop_pct",
)  # fmt: skip


class TimmBackbone(Backbone):
    """Wraps ``timm.create_model(name, num_classes=0, **kwargs)``; reads ``batch["image"]``."""

    modality = "image"
    type = "timm"

    def __init__(self, name: str, kwargs: dict | None = None, pretrained: bool = False):
        self.name, self.kwargs = name, dict(kwargs or {})
        super().__init__(timm.create_model(name, pretrained=pretrained, num_classes=0, **self.kwargs), 0)
        self.num_features = self.model.num_features
        self.preprocessing: dict = {}

    @classmethod
    def from_config(cls, model_cfg: dict, data=None, directory=None) -> TimmBackbone:
        """The backbone ``model`` describes (``name``, ``kwargs``): with timm's pretrained weights for
        ``model.init=timm`` (downloaded), else randomly initialised; ``directory`` (a ``backbone/`` whose weights
        the caller loads next) holds nothing else an image backbone needs. Its ``preprocessing`` follows the
        weights' pretrained config when they come from elsewhere (``timm``, ``file:``)."""
        name, kwargs = model_cfg["name"], dict(model_cfg.get("kwargs") or {})
        init = str(model_cfg.get("init", "none"))
        try:
            backbone = cls(name, kwargs, pretrained=init == "timm")
        except Exception as err:
            if isinstance(err, RuntimeError) and "Unknown model" in str(err):
                raise ConfigError(f"model.name={name} is not a timm model (see timm.list_models())") from err
            if init == "timm" and not isinstance(err, TypeError):
                raise  # fetching the pretrained weights: handoff.build_backbone says what failed
            # timm (or torch) refusing a keyword argument: its message, naming the key
            raise library_error("model", {"name": name, "kwargs": kwargs}, err, f"model.kwargs for {name}") from err
        overrides = {k: model_cfg.get(k) for k in PREPROCESS_KEYS if model_cfg.get(k) is not None}
        backbone.set_preprocessing(overrides, from_weights=init == "timm" or is_file_init(init))
        return backbone

    def set_preprocessing(self, overrides: dict | None = None, from_weights: bool = False) -> None:
        """What images this backbone takes: with ``from_weights`` (weights trained elsewhere), timm's pretrained
        config for ``model.name`` (mean, std, input size); ``overrides`` (``model.mean/std/input_size``) win.
        A model with one input channel (its first conv summed over RGB, see weight_files) gets the mean of the
        RGB means and stds. Empty: the datamodule keeps its own image size and statistics, as for weights
        pretune trained on that data."""
        pre = {}
        if from_weights:
            cfg = self.model.pretrained_cfg or {}
            pre = {"mean": cfg.get("mean"), "std": cfg.get("std"), "input_size": (cfg.get("input_size") or [None])[-1]}
        pre.update(overrides or {})
        channels = self.kwargs.get("in_chans", 3)
        for key in ("mean", "std"):
            values = pre.get(key)
            if values is not None and len(values) != channels:
                if len(values) == 3 and channels == 1:
                    values = [sum(values) / 3]
                else:
                    raise ConfigError(
                        f"model.{key}={list(values)} has {len(values)} values for {channels} input channels"
                    )
            if values is not None:
                pre[key] = [float(v) for v in values]
        self.preprocessing = {k: v for k, v in pre.items() if v is not None}

    def load_weight_file(self, path, init_map, init: str) -> list[str]:
        """``model.init=file:<path>``: the file's tensors into ``self.model`` (see weight_files)."""
        return load_weight_file(self, path, init_map, init)

    @staticmethod
    def spec_of(model_cfg: dict, saved: dict | None = None) -> dict:
        """The spec a model config asks for, to compare with a saved backbone's (``saved``, unused here)."""
        return {"type": "timm", "name": model_cfg["name"], "kwargs": dict(model_cfg.get("kwargs") or {})}

    @property
    def spec(self) -> dict:
        return {"type": self.type, "name": self.name, "kwargs": self.kwargs}

    def forward(self, batch: dict) -> torch.Tensor:
        return self.model(batch["image"])

    # --- leaving pretune -------------------------------------------------------------------------------------
    def save_processor(self, directory: Path, preprocessing: dict | None = None) -> None:
        """timm's ``config.json`` for the feature extractor (``num_classes: 0``), with the data's preprocessing."""
        from timm.models._hub import save_config_for_hf  # (not re-exported by timm.models)

        with _own_config(self.model):
            save_config_for_hf(self.model, str(Path(directory) / "config.json"), data_config=timm_data(preprocessing))

    def save_classifier(self, head: nn.Linear, directory: Path, labels: list[str], preprocessing: dict) -> None:
        """timm's model for the architecture with ``head`` as its classifier, through timm's ``save_for_hf``;
        checked to give this backbone's features through ``head`` before it is written."""
        from timm.models import save_for_hf

        classifier = self.classifier(head, preprocessing)
        with _own_config(classifier):
            save_for_hf(
                classifier,
                str(directory),
                model_config={"label_names": list(labels)},
                data_config=timm_data(preprocessing),
                safe_serialization=True,
            )

    def classifier(self, head: nn.Linear, preprocessing: dict) -> nn.Module:
        """``timm.create_model(name, num_classes=<classes>)`` holding this backbone's weights and ``head``'s, checked
        on an input of the size ``preprocessing`` gives to give what ``head`` on this backbone's features gives."""
        model = timm.create_model(self.name, num_classes=head.out_features, **self.kwargs)
        missing, unexpected = model.load_state_dict(self.model.state_dict(), strict=False)
        fc = model.get_classifier()
        linear = isinstance(fc, nn.Linear) and fc.in_features == head.in_features
        fc_names = {n for n, p in model.named_parameters() if linear and any(p is q for q in fc.parameters())}
        if not linear or unexpected or set(missing) != fc_names:  # the backbone's weights, and only fc is new
            raise ConfigError(
                f"model.name={self.name}: timm's classifier for it is not one linear layer on the features pretune"
                f" pools ({type(fc).__name__}), so model/ is not written; the weights are in checkpoints/best.ckpt"
            )
        fc.load_state_dict(head.state_dict())
        model.eval()
        size, device = preprocessing["image_size"], next(self.model.parameters()).device
        image = torch.randn(1, preprocessing["channels"], size, size, generator=torch.Generator().manual_seed(0))
        # The body (forward_features) is the same weights in both, and timm builds it the same whatever num_classes:
        # run it once (it is the cost); the heads (pooling and what follows) are what may differ.
        with torch.no_grad(), evaluating(self), evaluating(head):  # the run's own random streams left alone
            features = self.model.forward_features(image.to(device))
            expected, got = head(self.model.forward_head(features)).cpu(), model.forward_head(features.cpu())
        if not torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
            raise ConfigError(
                f"model.name={self.name}: timm's model with its classifier does not reproduce pretune's logits"
                f" (max |difference| {float((got - expected).abs().max()):.2e}), so model/ is not written"
            )
        return model

    @classmethod
    def load_classifier(cls, directory: Path) -> nn.Module:
        return ImageClassifier(timm.create_model(f"local-dir:{directory}", pretrained=True).eval())

    def tokens(self, batch: dict) -> torch.Tensor:
        return self.model.forward_features(batch["image"])

    def grouped_parameter_names(self) -> list[tuple[str | None, list[str]]]:
        grouped = list(group_parameters(self.model, self.model.group_matcher(coarse=True)).values())
        return [("stem" if i == 0 else None, names) for i, names in enumerate(grouped)]


class ImageClassifier(nn.Module):
    """A timm classifier read back from ``model/``: ``batch["image"]`` to logits."""

    processor = None

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict) -> torch.Tensor:
        return self.model(batch["image"])


def timm_crop_pct(size: int, crop_pct: float) -> float:
    """The ``crop_pct`` for which timm resizes an image where pretune does: pretune's evaluation transform resizes
    the shorter side to ``round(size / crop_pct)``, timm's to ``floor(size / crop_pct)`` (32 px at 0.875: 37 vs 36)."""
    scaled = round(size / crop_pct)
    pct = size / scaled
    while math.floor(size / pct) < scaled:  # size / (size / scaled) may fall a hair below scaled
        pct = math.nextafter(pct, 0.0)
    return pct


def timm_data(pre: dict | None) -> dict | None:
    """A recorded image preprocessing (``datamodules/transforms/images.py: image_preprocessing``) as timm's data
    config, which ``resolve_data_config`` + ``create_transform`` turn back into the same transform."""
    if not pre or "image_size" not in pre:
        return None
    size = pre["image_size"]
    return {
        "input_size": (pre["channels"], size, size),
        "interpolation": pre["interpolation"],
        "crop_pct": timm_crop_pct(size, pre["crop_pct"]),
        "crop_mode": pre.get("crop_mode", "center"),
        "mean": tuple(pre["mean"]),
        "std": tuple(pre["std"]),
    }


@contextmanager
def _own_config(model: nn.Module):
    """Inside, ``model.pretrained_cfg`` without what it says about the weights timm ships for the architecture
    (their tag, license, where they download from): the weights written are not those."""
    saved = model.pretrained_cfg
    model.pretrained_cfg = {k: v for k, v in saved.items() if k not in WEIGHTS_PROVENANCE}
    try:
        yield
    finally:
        model.pretrained_cfg = saved
