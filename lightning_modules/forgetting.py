"""Forgetting: the pre-training objective's loss on held-out images, before and after fine-tuning.

The pre-training run saved its objective's heads next to the backbone; here they are rebuilt and
evaluated on the validation images (never used in pre-training), with the objective's randomness
(masks, views) fixed, so before and after differ only by what fine-tuning did to the backbone.
"""

from __future__ import annotations

import torch
from hydra.utils import instantiate

from datamodules.errors import ConfigError
from lightning_modules.distributed import alone
from lightning_modules.handoff import OBJECTIVE_WEIGHTS, read_backbone_config


class ForgettingProbe:
    def __init__(self, init: str, source: dict | None, backbone, datamodule, batch_size: int = 256):
        """``source``: where ``model.init`` resolved to (``handoff.resolve_init``); None for none/timm."""
        from pathlib import Path

        from safetensors.torch import load_file

        backbone_dir = Path(source["path"]) if source else None
        meta = read_backbone_config(backbone_dir) if backbone_dir else {}
        weights = backbone_dir / OBJECTIVE_WEIGHTS if backbone_dir else None
        if not meta.get("objective") or not weights.is_file():
            raise ConfigError(
                f"finetune.measure_forgetting=true needs model.init to be a pretune pre-training run whose"
                f" backbone/ holds {OBJECTIVE_WEIGHTS}; model.init={init} does not"
            )
        self.objective = instantiate(meta["objective"], backbone=backbone, data=datamodule.spec)
        self.objective.load_state_dict(load_file(str(weights)), strict=True)
        self.images = datamodule.splits["val"]["image"]
        self.batch_size = batch_size

    @torch.no_grad()
    def loss(self, backbone) -> float:
        device = next(backbone.parameters()).device
        was_training = backbone.training
        backbone.eval()
        self.objective.to(device).eval()
        total = 0.0
        # alone(): under DDP every rank probes all the images by itself, as before fine-tuning (no process
        # group yet); SimCLR would otherwise gather the other ranks' copies of the same images as negatives.
        with alone(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(0)  # the same masks and views before and after fine-tuning
            for start in range(0, len(self.images), self.batch_size):
                x = self.images[start : start + self.batch_size].to(device)
                total += self.objective(backbone, {"image": x})["loss"].item() * len(x)
        backbone.train(was_training)
        return total / len(self.images)
