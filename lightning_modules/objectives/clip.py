"""Contrastive image–text pre-training (CLIP, Radford et al. 2021) on a dual encoder (``backbones/dual.py``).

- Each tower's pooled features go through a linear projection of its own (no bias, as in CLIP) into a shared
  space of ``embed_dim``, and are L2-normalised there.
- The loss is the symmetric InfoNCE of a batch of pairs: cross-entropy of each image against every caption (its
  own caption is the right answer) and of each caption against every image, averaged. The logits are the cosine
  similarities times a learned scale ``exp(logit_scale)``, initialised at ``1 / temperature`` (1/0.07) and
  clamped at ``max_logit_scale`` (100): clamped in place after every optimizer step, as OpenCLIP does, so the
  parameter never sits above it (``learn_temperature=false`` keeps it fixed).
- Under DDP each rank's features are contrasted with the features of *all* ranks, gathered with gradients
  (``gather_with_grad``, as SimCLR's ``nt_xent``): the negatives span the global batch and the loss and gradients
  are those of the global batch on one process.
- Validation: the loss, and retrieval recall@1/5/10 image→text and text→image over all validation pairs
  (``val/i2t_recall@1`` ...): recall@K as CLIP and COCO report it, the share of queries with a right answer among
  their top K, computed by torchmetrics' ``RetrievalHitRate``. A caption is a right answer for every image it was
  written for, and identical captions count as one (the embedded digits' captions repeat across a class).
- Zero-shot classification (``zero_shot_logits``): each class name is put through prompt templates, the prompts'
  embeddings are averaged per class (and normalised again), and an image gets the class whose embedding is
  nearest; ``scripts/evaluate.py zero_shot`` (``runtime/evaluate.py``) runs it on any labeled image datamodule.
  Its prompts: the data's own (the digit datamodules' ``prompt_templates``), else those the pre-training captions
  were written with (``templates_from_captions``: the captions a run records, ``captions.json``, with a class
  name in the place of ``{}``), else ``GENERIC_PROMPTS``, a photo ensemble from CLIP's ImageNet prompts.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict

import torch
import torch.nn.functional as F
import torchmetrics
from torch import nn

from datamodules.transforms.text import tokenize
from lightning_modules.config.rules import check
from lightning_modules.core.distributed import gather_with_grad
from lightning_modules.core.errors import ConfigError
from lightning_modules.objectives.base import Objective

RECALL_AT = (1, 5, 10)
# Zero-shot prompts for data that bring none of their own: photo prompts from CLIP's ImageNet ensemble (Radford et
# al. 2021, its notebook's 80), the ones that describe any photo.
GENERIC_PROMPTS = (
    "a photo of a {}.",
    "a bad photo of a {}.",
    "a low resolution photo of a {}.",
    "a cropped photo of a {}.",
    "a close-up photo of a {}.",
    "a bright photo of a {}.",
    "a dark photo of a {}.",
    "a blurry photo of a {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
)


def templates_from_captions(captions: list[str], class_names: list[str], most: int = 16) -> list[str]:
    """The templates ``captions`` were written with, as far as they name the classes: each caption that names a
    class (as a whole word, case aside; ``_`` in a folder's name read as a space) with ``{}`` in its place, kept
    when it was seen with at least two classes, most classes first. None: ``[]``."""
    names = sorted({*class_names, *(n.replace("_", " ") for n in class_names)}, key=len, reverse=True)
    patterns = [(name, re.compile(rf"(?<!\w){re.escape(name)}(?!\w)", re.IGNORECASE)) for name in names]
    seen: dict[str, set[str]] = defaultdict(set)
    for caption in captions:
        escaped = caption.replace("{", "{{").replace("}", "}}")
        for name, pattern in patterns:
            if pattern.search(escaped):
                seen[pattern.sub("{}", escaped, count=1)].add(name.replace(" ", "_").lower())
                break
    kept = [t for t, classes in seen.items() if len(classes) >= 2]
    return sorted(kept, key=lambda t: (-len(seen[t]), t))[:most]


def clip_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of normalised ``image``/``text`` embeddings, pair i = (image[i], text[i]).

    Under DDP each rank holds N/W pairs: its images are scored against the captions of all ranks (gathered with
    gradients) and its captions against all images. The mean over ranks of this loss is the loss of the global
    batch on one process, and DDP's gradient averaging gives its gradient exactly (as ``nt_xent``)."""
    (all_image, offset), (all_text, _) = gather_with_grad(image), gather_with_grad(text)
    own = offset + torch.arange(len(image), device=image.device)  # this rank's pairs, as global indices
    image_to_text = scale * image @ all_text.T
    text_to_image = scale * text @ all_image.T
    return (F.cross_entropy(image_to_text, own) + F.cross_entropy(text_to_image, own)) / 2


def retrieval_recall(similarity: torch.Tensor, relevant: torch.Tensor, ks=RECALL_AT, chunk: int = 1024) -> dict:
    """Recall@k per query (a row of ``similarity``; ``relevant`` marks its right answers): whether a right answer is
    among its k most similar items, averaged over the queries (torchmetrics' ``RetrievalHitRate``). Queries are
    scored a chunk at a time, so the similarity matrix is never flattened whole."""
    from torchmetrics.retrieval import RetrievalHitRate

    totals = dict.fromkeys(ks, 0.0)
    n_queries, n_items = similarity.shape
    for start in range(0, n_queries, chunk):
        sim, rel = similarity[start : start + chunk], relevant[start : start + chunk]
        indexes = torch.arange(len(sim), device=sim.device).repeat_interleave(n_items)
        for k in ks:
            metric = RetrievalHitRate(top_k=k).to(sim.device)
            totals[k] += float(metric(sim.flatten(), rel.flatten(), indexes=indexes)) * len(sim)
    return {k: totals[k] / n_queries for k in ks}


class PairedRetrieval(torchmetrics.Metric):
    """Image→text and text→image recall@k over every pair of an epoch. States are the embeddings and ids (gathered
    over ranks at ``compute``); each image and each distinct caption is scored once."""

    full_state_update = False

    def __init__(self, ks=RECALL_AT):
        super().__init__()
        self.ks = tuple(ks)
        for name in ("image", "text", "image_id", "caption_id"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, image, text, image_id, caption_id) -> None:
        self.image.append(image.detach().float())
        self.text.append(text.detach().float())
        self.image_id.append(image_id.detach())
        self.caption_id.append(caption_id.detach())

    def compute(self) -> dict:
        from torchmetrics.utilities import dim_zero_cat

        image, text = dim_zero_cat(self.image), dim_zero_cat(self.text)
        image_id, caption_id = dim_zero_cat(self.image_id), dim_zero_cat(self.caption_id)
        images, image_row = _first_of_each(image_id)
        captions, caption_row = _first_of_each(caption_id)
        relevant = torch.zeros(len(captions), len(images), dtype=torch.bool, device=image.device)
        relevant[torch.searchsorted(captions, caption_id), torch.searchsorted(images, image_id)] = True
        similarity = text[caption_row] @ image[image_row].T  # (distinct captions, images)
        i2t = retrieval_recall(similarity.T, relevant.T, self.ks)
        t2i = retrieval_recall(similarity, relevant, self.ks)
        out = {f"i2t_recall@{k}": torch.tensor(v) for k, v in i2t.items()}
        return out | {f"t2i_recall@{k}": torch.tensor(v) for k, v in t2i.items()}


def _first_of_each(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The sorted distinct ``ids`` and the row where each first occurs."""
    distinct, inverse = torch.unique(ids, return_inverse=True)
    rows = torch.arange(len(ids), device=ids.device)
    first = torch.full((len(distinct),), len(ids), dtype=torch.long, device=ids.device).scatter_reduce(
        0, inverse, rows, reduce="amin"
    )
    return distinct, first


class CLIP(Objective):
    modalities = ("image_text",)
    pretrain_only = True  # fine-tune one tower instead (model.init=<run>/backbone/image)

    def __init__(
        self,
        backbone,
        data,
        embed_dim: int = 64,
        temperature: float = 0.07,
        learn_temperature: bool = True,
        max_logit_scale: float = 100.0,
    ):
        super().__init__(backbone, data)
        towers = backbone.towers()
        if set(towers) != {"image", "text"}:  # the modality check lets only dual encoders through; say which towers
            raise ConfigError(f"objective=clip needs image and text towers, the backbone has {sorted(towers)}")
        self.embed_dim = check("objective.embed_dim", embed_dim)
        temperature = float(check("objective.temperature", temperature))
        self.max_logit_scale = float(check("objective.max_logit_scale", max_logit_scale))
        if 1 / temperature > self.max_logit_scale:
            raise ConfigError(
                f"objective.temperature={temperature} starts the logit scale at {1 / temperature:.4g}, above"
                f" objective.max_logit_scale={self.max_logit_scale:g}; allowed is at least {1 / self.max_logit_scale:g}"
            )
        self.image_proj = nn.Linear(towers["image"].num_features, self.embed_dim, bias=False)
        self.text_proj = nn.Linear(towers["text"].num_features, self.embed_dim, bias=False)
        learn = check("objective.learn_temperature", learn_temperature)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / temperature)), requires_grad=learn)

    # --- embeddings ----------------------------------------------------------------------------------------
    def embed_images(self, backbone, batch: dict) -> torch.Tensor:
        return F.normalize(self.image_proj(backbone.towers()["image"](batch)), dim=-1)

    def embed_texts(self, backbone, batch: dict) -> torch.Tensor:
        return F.normalize(self.text_proj(backbone.towers()["text"](batch)), dim=-1)

    def scale(self) -> torch.Tensor:
        """``exp(logit_scale)``, at most ``max_logit_scale``."""
        return self.logit_scale.exp().clamp(max=self.max_logit_scale)

    def after_step(self, backbone) -> None:
        with torch.no_grad():  # as OpenCLIP: the parameter itself never rises above log(max_logit_scale)
            self.logit_scale.clamp_(0, math.log(self.max_logit_scale))

    # --- the contract --------------------------------------------------------------------------------------
    def forward(self, backbone, batch):
        features = backbone(batch)  # {"image": ..., "text": ...}: one pass through each tower
        image = F.normalize(self.image_proj(features["image"]), dim=-1)
        text = F.normalize(self.text_proj(features["text"]), dim=-1)
        out = {"loss": clip_loss(image, text, self.scale())}
        if "image_id" in batch:  # evaluation pairs: what retrieval recall needs
            out |= {"image": image, "text": text, "image_id": batch["image_id"], "caption_id": batch["caption_id"]}
        return out

    def make_metrics(self, prefix: str):
        return torchmetrics.MetricCollection({"retrieval": PairedRetrieval()}, prefix=prefix)

    def update_metrics(self, metrics, output: dict) -> None:
        if "image_id" in output:
            metrics.update(output["image"], output["text"], output["image_id"], output["caption_id"])

    # --- zero-shot classification --------------------------------------------------------------------------
    @torch.no_grad()
    def class_embeddings(self, backbone, class_names, templates, max_length: int = 64) -> torch.Tensor:
        """One normalised embedding per class: its name through every template (``"a photo of a {}"``), the
        prompts' embeddings averaged and normalised again, as CLIP's zero-shot classifiers are built."""
        text = backbone.towers()["text"]
        prompts = [template.format(name) for name in class_names for template in templates]
        length = min(max_length, getattr(text, "max_positions", max_length))
        tensors, _, _ = tokenize(text.processor, prompts, length)
        device = self.text_proj.weight.device
        embedded = self.embed_texts(backbone, {k: v.to(device) for k, v in tensors.items()})
        per_class = embedded.view(len(class_names), len(templates), -1).mean(1)
        return F.normalize(per_class, dim=-1)

    def zero_shot_logits(self, backbone, batch: dict, classes: torch.Tensor) -> torch.Tensor:
        """Each image's scaled cosine similarity with every class embedding (``class_embeddings``)."""
        return self.scale() * self.embed_images(backbone, batch) @ classes.T
