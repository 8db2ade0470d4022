"""Forgetting: the pre-training objective's loss on held-out images, before and after fine-tuning.

The pre-training run saved its objective's heads next to the backbone; here they are rebuilt and
evaluated on the validation images (never used in pre-training), with the objective's randomness
(masks, views) fixed, so before and after differ only by what fine-tuning did to the backbone.
"""

from __future__ import annotations

import torch
from pytorch_lightning.callbacks import Callback

from lightning_modules.backbones.handoff import OBJECTIVE_WEIGHTS, read_backbone_config
from lightning_modules.config.errors import ConfigError
from lightning_modules.objectives.base import build_objective
from lightning_modules.runtime.distributed import alone


class ForgettingProbe(Callback):
    """Measures the pre-training loss on the validation split when fit starts (the pre-trained weights)
    and when testing ends (the weights fine-tuning selected); ``run_metrics()`` reports both."""

    def __init__(self, init: str, source: dict | None, backbone, datamodule, batch_size: int = 256):
        """``source``: where ``model.init`` resolved to (``handoff.resolve_init``); None for none/timm."""
        from pathlib import Path

        from safetensors.torch import load_file

        backbone_dir = Path(source["path"]) if source and "path" in source else None  # not hf:, a model of its own
        meta = read_backbone_config(backbone_dir) if backbone_dir else {}
        weights = backbone_dir / OBJECTIVE_WEIGHTS if backbone_dir else None
        if not meta.get("objective") or not weights.is_file():
            raise ConfigError(
                f"finetune.measure_forgetting=true needs model.init to be a pretune pre-training run whose"
                f" backbone/ holds {OBJECTIVE_WEIGHTS}; model.init={init} does not"
            )
        self.objective = build_objective(meta["objective"], backbone, datamodule.spec)
        self.objective.load_state_dict(load_file(str(weights)), strict=True)
        self.datamodule, self.batch_size = datamodule, batch_size
        self.before: float | None = None
        self.after: float | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        self.before = self.loss(pl_module.backbone)

    def on_test_end(self, trainer, pl_module) -> None:
        self.after = self.loss(pl_module.backbone)  # on the tested (best) weights

    def run_metrics(self) -> dict:
        if self.before is None or self.after is None:
            return {}
        return {
            "forgetting/pretrain_loss_before": self.before,
            "forgetting/pretrain_loss_after": self.after,
            "forgetting/increase": self.after - self.before,
        }

    @torch.no_grad()
    def loss(self, backbone) -> float:
        device = next(backbone.parameters()).device
        was_training = backbone.training
        backbone.eval()
        self.objective.to(device).eval()
        total, count = 0.0, 0
        # alone(): under DDP every rank probes all the images by itself, as before fine-tuning (no process
        # group yet); SimCLR would otherwise gather the other ranks' copies of the same images as negatives.
        with alone(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(0)  # the same masks and views before and after fine-tuning
            for batch in self.datamodule.eval_loader("val", self.batch_size, sharded=False):
                batch = {k: v.to(device) for k, v in batch.items()}
                n = len(next(iter(batch.values())))
                total += self.objective(backbone, batch)["loss"].item() * n
                count += n
        backbone.train(was_training)
        return total / count
