"""How well the features being pre-trained classify, watched during pre-training: a k-NN classifier and an online
linear probe on the backbone's frozen features, logged at every validation as ``val/knn_acc`` and ``val/probe_acc``
(loggers, the progress bar, ``metrics.json``). A loss says little about transfer; these say it in the metric that
matters, as solo-learn and lightly do.

- **k-NN** (as DINO evaluates): the features of a labeled subset of the training images (the bank,
  ``bank_size`` of them, stratified, the same for every run of a data set) and of the validation images, L2-normalised;
  each validation image's ``k`` nearest bank images by cosine similarity vote for their class with weight
  ``exp(similarity / temperature)``; top-1 accuracy.
- **Online linear probe**: a linear classifier that follows the features through pre-training, trained at every
  validation for ``probe_epochs`` passes of Adam (batches of ``probe_batch_size``, a seeded order) on the bank's
  detached features, the very ones the k-NN just computed, starting from where the last validation left it; its
  accuracy on the validation images. Pre-training batches carry no labels here (it sees its images unlabeled), so
  the probe learns from the bank, as the datamodule stores it, not augmented. solo-learn's probe takes a step after
  every optimizer step on that step's batch instead; here that meant a forward pass of the bank's images per step,
  a third of an MLM pre-training's time (2026-12-06), where this costs a linear layer's steps on cached features.

The labels come from the datamodule (``labeled_examples``): an in-memory image source keeps its training labels
for this while serving the images unlabeled; a text corpus lends its labeled task's (the embedded corpus: the
docstring families); CLIP's embedded pairs their digits' classes (the image tower). Data without labels turns the
monitor off with a note. A supervised objective (a fine-tune: its own ``val/acc`` says it) leaves it off.

Nothing here changes training: features come from the backbone in eval mode under ``no_grad`` (BatchNorm's
statistics untouched, each module's mode put back after), the probe's order from its own generator (the global
RNG, which draws the augmentations, is not touched), and the probe is not in the optimizer. Under DDP every rank
computes all of it on all of the bank and validation images (no collective; what one process computes), and its
state (probe, optimizer, position) is in the checkpoint, so a resumed run logs what the uninterrupted run logs.
``time/monitor_s`` in ``metrics.json``: the seconds it took, so its cost per epoch is on record.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_info

from lightning_modules.config.rules import check

KNN_CHUNK = 1024  # query rows scored against the bank at once


def knn_predict(
    queries: torch.Tensor, bank: torch.Tensor, bank_labels: torch.Tensor, classes: int, k: int, temperature: float
) -> torch.Tensor:
    """The class DINO's weighted k-NN gives each query: its ``k`` nearest bank rows by cosine similarity vote for
    their labels with weight ``exp(similarity / temperature)``. Features need not be normalised (done here)."""
    queries, bank = F.normalize(queries.float(), dim=1), F.normalize(bank.float(), dim=1)
    k = min(k, len(bank))
    predicted = []
    for chunk in queries.split(KNN_CHUNK):
        similarity, nearest = (chunk @ bank.T).topk(k, dim=1)
        votes = torch.zeros(len(chunk), classes, device=chunk.device)
        votes.scatter_add_(1, bank_labels[nearest], (similarity / temperature).exp())
        predicted.append(votes.argmax(1))
    return torch.cat(predicted)


@contextmanager
def evaluating(module: torch.nn.Module):
    """``module`` in eval mode under ``no_grad``, each submodule's own mode put back after (a freezing strategy
    keeps some in eval mode while the rest train)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in modes:
            m.training = mode


class Rescaled(torch.nn.Module):
    """Features scaled to length sqrt(width) (entries of about 1): their scale is whatever pre-training made it, and
    one learning rate then fits every backbone. No running statistics (a BatchNorm's would lag the drifting
    features early in a run and make the first validations' probe a constant guess)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) * x.shape[1] ** 0.5


class FeatureMonitor(Callback):
    def __init__(
        self,
        k: int = 20,
        temperature: float = 0.07,
        bank_size: int | None = 1000,
        probe: bool = True,
        probe_epochs: int = 10,
        probe_batch_size: int = 64,
        probe_lr: float = 1e-2,
        batch_size: int = 512,
    ):
        self.k = check("callbacks.feature_monitor.k", k)
        self.temperature = float(check("callbacks.feature_monitor.temperature", temperature))
        self.bank_size = check("callbacks.feature_monitor.bank_size", bank_size)
        self.use_probe = check("callbacks.feature_monitor.probe", probe)
        self.probe_epochs = check("callbacks.feature_monitor.probe_epochs", probe_epochs)
        self.probe_batch_size = check("callbacks.feature_monitor.probe_batch_size", probe_batch_size)
        self.probe_lr = float(check("callbacks.feature_monitor.probe_lr", probe_lr))
        self.batch_size = check("callbacks.feature_monitor.batch_size", batch_size)
        self.active = False
        self.seconds = 0.0
        self.probe = self.optimizer = None
        self.probe_passes = 0
        self._restored: dict | None = None

    # --- what it watches -----------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        if getattr(pl_module.objective, "supervised", False):
            return  # a fine-tune: its own val/acc says how it classifies
        reason = self._reason_off(trainer)
        if reason:
            rank_zero_info(f"feature monitor: off ({reason}; callbacks.feature_monitor=null turns it off outright)")
            return
        self.bank, self.bank_decode = self.labeled["train"]
        self.queries, self.query_decode = self.labeled["val"]
        self.classes = int(max(self.bank["label"].max(), self.queries["label"].max())) + 1
        self.active = True
        rank_zero_info(
            f"feature monitor: k-NN (k={self.k}) on {len(self.bank['label'])} labeled training images, scored on"
            f" {len(self.queries['label'])} validation images{', and an online linear probe' if self.use_probe else ''}"
        )

    def _reason_off(self, trainer) -> str | None:
        if "FSDP" in type(trainer.strategy).__name__:
            return "FSDP shards the backbone's weights, which the monitor reads whole"
        find = getattr(trainer.datamodule, "labeled_examples", None)
        self.labeled = {s: find(s, self.bank_size if s == "train" else None) for s in ("train", "val")} if find else {}
        if not self.labeled or any(found is None for found in self.labeled.values()):
            return "the data has no labeled training and validation examples to classify"
        return None

    @staticmethod
    def _batch(tensors: dict, rows, decode, device) -> dict:
        """Stored examples ``rows`` (a slice or indices) as the model reads them, on ``device`` (decoded there: the
        datamodule's statistics sit where its batches go)."""
        return decode(
            {k: v[rows.to(v.device) if torch.is_tensor(rows) else rows].to(device) for k, v in tensors.items()}
        )

    def _features(self, pl_module, batch: dict) -> torch.Tensor:
        batch = {k: v for k, v in batch.items() if k != "label"}
        backbone = pl_module.backbone
        towers = backbone.towers()  # a dual encoder (CLIP): the tower that reads these examples
        if towers:
            backbone = towers["image" if "image" in batch else "text"]
        return backbone(batch)

    def _encode(self, pl_module, tensors: dict, decode) -> torch.Tensor:
        n = len(tensors["label"])
        parts = []
        with evaluating(pl_module.backbone):
            for start in range(0, n, self.batch_size):
                batch = self._batch(tensors, slice(start, start + self.batch_size), decode, pl_module.device)
                parts.append(self._features(pl_module, batch).float())
        return torch.cat(parts)

    # --- the online probe ----------------------------------------------------------------------------------
    def _train_probe(self, bank: torch.Tensor, labels: torch.Tensor) -> None:
        """``probe_epochs`` passes over the bank's features, each in a seeded order (the global RNG, which draws the
        augmentations, is untouched), from where the last validation left the probe. Validation runs under inference
        mode, whose tensors autograd cannot use: the probe and a copy of the features are made outside it."""
        with torch.inference_mode(False), torch.enable_grad():
            if self.probe is None:
                self._make_probe(bank.shape[1], bank.device)
            bank, labels = bank.clone(), labels.clone()
            size = min(self.probe_batch_size, len(labels))
            for _ in range(self.probe_epochs):
                order = torch.randperm(
                    len(labels), generator=torch.Generator().manual_seed(1_000_003 + self.probe_passes)
                )
                for rows in order.split(size):
                    rows = rows.to(bank.device)
                    loss = F.cross_entropy(self.probe(bank[rows]), labels[rows])
                    self.optimizer.zero_grad()
                    loss.backward()
                    self.optimizer.step()
                self.probe_passes += 1

    def _make_probe(self, width: int, device) -> None:
        # The same probe every run, drawn from its own generator: the global RNG (the augmentations') is untouched.
        generator = torch.Generator().manual_seed(0)
        linear = torch.nn.Linear(width, self.classes, device="meta").to_empty(device="cpu")
        bound = 1 / width**0.5
        with torch.no_grad():
            linear.weight.uniform_(-bound, bound, generator=generator)
            linear.bias.uniform_(-bound, bound, generator=generator)
        self.probe = torch.nn.Sequential(Rescaled(), linear).to(device)
        self.optimizer = torch.optim.Adam(self.probe.parameters(), lr=self.probe_lr)
        if self._restored is not None:
            self.probe.load_state_dict(self._restored["probe"])
            self.optimizer.load_state_dict(self._restored["optimizer"])
            self._restored = None

    # --- at every validation -------------------------------------------------------------------------------
    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not self.active or trainer.sanity_checking:
            return
        started = time.perf_counter()
        bank = self._encode(pl_module, self.bank, self.bank_decode)
        queries = self._encode(pl_module, self.queries, self.query_decode)
        bank_labels = self.bank["label"].to(bank.device)
        labels = self.queries["label"].to(queries.device)
        predicted = knn_predict(queries, bank, bank_labels, self.classes, self.k, self.temperature)
        values = {"val/knn_acc": (predicted == labels).float().mean()}
        if self.use_probe:
            self._train_probe(bank, bank_labels)
            with torch.no_grad():
                values["val/probe_acc"] = (self.probe(queries).argmax(1) == labels).float().mean()
        # The same on every rank (each computed all of it): sync_dist averages equal values.
        pl_module.log_dict(values, prog_bar=True, sync_dist=True)
        self.seconds += time.perf_counter() - started

    # --- checkpoints and metrics.json ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        if self.probe is None:
            return {"probe_passes": self.probe_passes}
        return {
            "probe_passes": self.probe_passes,
            "probe": self.probe.state_dict(),
            "optimizer": self.optimizer.state_dict(),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.probe_passes = int(state_dict.get("probe_passes", 0))
        self._restored = state_dict if "probe" in state_dict else None

    def run_metrics(self) -> dict:
        return {"time/monitor_s": round(self.seconds, 2)} if self.active else {}
