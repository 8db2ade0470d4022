"""Forgetting: the pre-training objective's loss on held-out images, before and after fine-tuning.

The pre-training run saved its objective's heads next to the backbone; here they are rebuilt and
evaluated on the validation images (never used in pre-training), with the objective's randomness
(masks, views) fixed, so before and after differ only by what fine-tuning did to the backbone.

Weights from a file (``model.init=file:``, e.g. ImageNet's) come with their classifier, not with their data:
the loss is then the classifier's cross-entropy against its own predictions before fine-tuning on the same
held-out images (``ClassifierDrift``): their entropy before, and the increase is KL(before || after).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback
from torch import nn

from lightning_modules.backbones.handoff import OBJECTIVE_WEIGHTS, read_backbone_config
from lightning_modules.core.distributed import alone
from lightning_modules.core.errors import ConfigError
from lightning_modules.objectives.base import saved_objective


class ForgettingProbe(Callback):
    """Measures the pre-training loss on the validation split when fit starts (the pre-trained weights)
    and when testing ends (the weights fine-tuning selected); ``run_metrics()`` reports both."""

    def __init__(self, init: str, source: dict | None, backbone, datamodule, batch_size: int = 256):
        """``source``: where ``model.init`` resolved to (``handoff.resolve_init``); None for none/timm."""
        self.datamodule, self.batch_size = datamodule, batch_size
        self.before: float | None = None
        self.after: float | None = None
        if source and source.get("file"):
            head = getattr(backbone, "pretrained_head", None)
            if head is None:
                raise ConfigError(
                    f"finetune.measure_forgetting=true with model.init={init} needs the file's classifier"
                    " (a linear layer on the pooled features); this file holds none"
                )
            self.objective = ClassifierDrift(*head)
            return
        self.objective = saved_objective(source, backbone, datamodule.spec)
        if self.objective is None:
            tower = _tower_of(source)
            raise ConfigError(
                f"finetune.measure_forgetting=true needs model.init to be a pretune pre-training run whose"
                f" backbone/ holds {OBJECTIVE_WEIGHTS}; model.init={init} does not"
                + (f" (it is the {tower} tower of one: its pre-training loss needs every tower)" if tower else "")
            )

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
        if isinstance(self.objective, ClassifierDrift):
            self.objective.rewind()
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


class ClassifierDrift(nn.Module):
    """The pre-trained classifier's cross-entropy against its own predictions on the same images before
    fine-tuning (kept from the first pass over them, in order)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        super().__init__()
        self.head = nn.Linear(weight.shape[1], weight.shape[0])
        self.head.load_state_dict({"weight": weight, "bias": bias})
        self.targets: list[torch.Tensor] = []
        self._next = 0

    def rewind(self) -> None:
        self._next = 0

    def forward(self, backbone, batch) -> dict:
        log_p = F.log_softmax(self.head(backbone(batch).float()), dim=-1)
        if self._next == len(self.targets):
            self.targets.append(log_p.exp())
        target = self.targets[self._next].to(log_p.device)
        self._next += 1
        return {"loss": -(target * log_p).sum(-1).mean()}


def _tower_of(source: dict | None) -> str | None:
    """The tower name, when ``source`` is one tower exported by a pre-training of a backbone made of towers."""
    if not source or "path" not in source:
        return None
    return (read_backbone_config(Path(source["path"])).get("provenance") or {}).get("tower")
