"""What the language-modelling objectives (``mlm``, ``clm``) share: the output layer tied to the backbone's
input embeddings, and per-token metrics summed over an epoch.

Tying the output layer to the input embeddings (as BERT and GPT-2 do) adds no vocabulary-sized matrix to the
objective, and with a pre-trained Hugging Face decoder it makes ``clm``'s logits exactly that model's own
language-model head from the first step.
"""

from __future__ import annotations

import torch
import torchmetrics
from torch import nn


def input_embeddings(backbone) -> nn.Embedding:
    """The backbone's token embedding table (its rows: the vocabulary)."""
    return backbone.model.get_input_embeddings()


class TokenMean(torchmetrics.Metric):
    """The mean of a per-token quantity over every token of the epoch (``exp=True``: its exponential, i.e.
    perplexity from summed negative log-likelihoods). States are sums, so under DDP they add up over ranks."""

    full_state_update = False

    def __init__(self, exp: bool = False):
        super().__init__()
        self.exp = exp
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, total: torch.Tensor, count: torch.Tensor) -> None:
        self.total += total.detach().double()
        self.count += count.detach().double()

    def compute(self) -> torch.Tensor:
        mean = self.total / self.count.clamp_min(1)
        return (mean.exp() if self.exp else mean).float()


def token_metrics(prefix: str, accuracy: bool) -> torchmetrics.MetricCollection:
    """``perplexity`` (and ``acc``: the share of predicted tokens that are right)."""
    metrics = {"perplexity": TokenMean(exp=True)}
    if accuracy:
        metrics["acc"] = TokenMean()
    return torchmetrics.MetricCollection(metrics, prefix=prefix, compute_groups=False)  # updated one by one


def update_token_metrics(metrics, output: dict) -> None:
    for name, metric in metrics.items(keep_base=True):
        metric.update(output["nll_sum"] if name == "perplexity" else output["correct"], output["tokens"])
