"""Features of a frozen backbone, computed once instead of at every step.

A linear probe (``freeze.layers=all``) trains only the head on features that never change: every group is
frozen for the whole run and in eval mode, and when no augmentation reaches the backbone (the training batches
are not augmented, the objective does not mix images) each image's pooled features are a fixed function of the
image. Computing them at every step and every validation is then pure waste; for a large backbone (an ImageNet
EfficientNet) it is nearly all of the run's time.

``FeatureCache.reason_not(...)`` says why a run cannot use the cache (None when it can); the run adds the callback
when it can and ``finetune.cache_features`` is true. When fit starts (the freezing callback has frozen every
group), the datamodule stores each example's features next to it (``cache_features``) and its batches carry
them; the backbone answers such a batch from them (``Backbone.__call__``). Features are also kept for the rest
of the process, keyed by the hash of the backbone's weights and of the images, so the runs of a study that probe
the same backbone on the same images (other learning rates, seeds) compute them once.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch
from pytorch_lightning.callbacks import Callback

_MEMO: OrderedDict[tuple, torch.Tensor] = OrderedDict()
_MEMO_SIZE = 16  # splits kept for later runs of this process (a few MB each)


def _digest(tensors) -> str:
    digest = hashlib.sha1()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        digest.update(str((t.dtype, tuple(t.shape))).encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class FeatureCache(Callback):
    @staticmethod
    def reason_not(freezer, backbone, datamodule, objective, epochs: int) -> str | None:
        """Why the features of this run cannot be computed once (None: they can)."""
        if not hasattr(freezer, "frozen_throughout") or not freezer.frozen_throughout(
            len(backbone.layer_groups()), epochs
        ):
            return "the backbone is not frozen (in eval mode) for the whole run"
        if not getattr(objective, "pooled_only", False):
            return "the objective does more with the backbone than take pooled features of the batch"
        if not datamodule.can_cache_features():
            return "the datamodule cannot (training batches are augmented, or the data streams)"
        return None

    def __init__(self):
        self.computed = self.reused = 0

    @torch.no_grad()
    def on_fit_start(self, trainer, pl_module) -> None:
        backbone = pl_module.backbone
        device = next(backbone.parameters()).device
        was_training = backbone.training
        backbone.eval()
        weights = _digest(backbone.state_dict().values())

        def encode(name: str, identity: list[torch.Tensor], batches) -> torch.Tensor:
            key = (weights, name, _digest(identity))
            if key in _MEMO:
                _MEMO.move_to_end(key)
                self.reused += 1
                return _MEMO[key]
            features = torch.cat([backbone({k: v.to(device) for k, v in b.items()}).float().cpu() for b in batches])
            self.computed += 1
            _MEMO[key] = features
            while len(_MEMO) > _MEMO_SIZE:
                _MEMO.popitem(last=False)
            return features

        trainer.datamodule.cache_features(encode)
        backbone.train(was_training)

    def run_metrics(self) -> dict:
        return {"features_cached": True, "features_cached/splits_computed": self.computed}
