"""The objective contract, shared by pre-training and fine-tuning."""

from __future__ import annotations

from torch import nn


class Objective(nn.Module):
    """One training signal. Holds its heads (not the backbone) and computes the loss.

    ``forward(backbone, batch)`` returns a dict with ``loss`` and whatever the metrics need.
    Batches are dicts (``image``, ``label``, later ``input_ids`` ...), never tuples.
    """

    def __init__(self, backbone, data):
        super().__init__()
        self.data = data

    def make_metrics(self, prefix: str):
        """A torchmetrics collection fed by ``update_metrics``; ``None`` when the loss is the metric."""
        return None

    def update_metrics(self, metrics, output: dict) -> None:
        raise NotImplementedError
