"""Causal language modelling (GPT): predict every next token from the ones before it; the loss is the mean over
real target tokens (a target that is padding is ignored). Logs perplexity (``exp`` of the per-token loss over
the epoch). The output layer is tied to the input embeddings, so a pre-trained Hugging Face decoder
(``model.init=hf:...``) starts from its own language-model head: ``objective=clm`` adapts it to new text.

Nothing here is random (dropout aside), so DDP equals one process once the loss is normalised by the global
token count (``global_mean``): ranks hold different numbers of real tokens.
"""

from __future__ import annotations

import torch.nn.functional as F

from lightning_modules.core.distributed import global_mean
from lightning_modules.objectives.base import Objective
from lightning_modules.objectives.language import input_embeddings, token_metrics, update_token_metrics


def next_token_targets(input_ids, attention_mask):
    """The targets of positions 0..T-2: the next token, or -100 where it is padding."""
    return input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)


class CLM(Objective):
    modalities = ("text",)
    text_kind = "decoder"

    def forward(self, backbone, batch):
        hidden = backbone.tokens(batch)[:, :-1]
        target = next_token_targets(batch["input_ids"], batch["attention_mask"])
        logits = hidden @ input_embeddings(backbone).weight.T
        nll_sum = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=-100, reduction="sum")
        count = (target != -100).sum()
        return {"loss": global_mean(nll_sum, count), "nll_sum": nll_sum.detach(), "tokens": count}

    def make_metrics(self, prefix: str):
        return token_metrics(prefix, accuracy=False)

    def update_metrics(self, metrics, output: dict) -> None:
        update_token_metrics(metrics, output)
