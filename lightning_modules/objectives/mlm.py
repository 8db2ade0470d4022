"""Masked language modelling (BERT, Devlin et al. 2019): select ``mlm_probability`` of the non-special tokens,
replace 80% of them by ``[MASK]``, 10% by a random token, keep 10%, and predict the originals; the loss is on
the selected tokens only.

The masking is transformers' own (``DataCollatorForLanguageModeling.torch_mask_tokens``), not a re-write. Its
draws come from the global torch RNG, which ``EpochSeed`` seeds from (seed, epoch): a resumed run masks as the
uninterrupted one. Under DDP the mask is drawn for the whole global batch and each rank keeps its slice
(``shard_draw``): the collator's draws depend only on the shape, so masking a global-batch-shaped tensor that
holds this rank's rows at this rank's place gives them exactly the masks the single process draws for them.
Masking runs on the CPU (the collator builds its probability tensors there), so it draws the same on any device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.config.rules import check
from lightning_modules.core.distributed import global_mean, shard_draw
from lightning_modules.core.errors import ConfigError
from lightning_modules.objectives.base import Objective
from lightning_modules.objectives.language import input_embeddings, token_metrics, update_token_metrics


class MLM(Objective):
    modalities = ("text",)
    text_kind = "encoder"

    def __init__(
        self,
        backbone,
        data,
        mlm_probability: float = 0.15,
        mask_replace_prob: float = 0.8,
        random_replace_prob: float = 0.1,
    ):
        super().__init__(backbone, data)
        from transformers import DataCollatorForLanguageModeling

        tokenizer = data.tokenizer
        if tokenizer is None or tokenizer.mask_token is None:
            raise ConfigError("objective=mlm needs a tokenizer with a mask token ([MASK]); this backbone's has none")
        check("objective.mlm_probability", mlm_probability)
        check("objective.mask_replace_prob", mask_replace_prob)
        check("objective.random_replace_prob", random_replace_prob)
        if mask_replace_prob + random_replace_prob > 1:
            raise ConfigError(
                f"objective.mask_replace_prob={mask_replace_prob} + objective.random_replace_prob="
                f"{random_replace_prob} is more than 1: allowed is a sum of at most 1 (the rest is kept as it was)"
            )
        self.collator = DataCollatorForLanguageModeling(
            tokenizer,
            mlm=True,
            mlm_probability=mlm_probability,
            mask_replace_prob=mask_replace_prob,
            random_replace_prob=random_replace_prob,
        )
        self.special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)))
        width = backbone.num_features
        # BERT's prediction head: a transform, then the (tied) embedding matrix with its own bias.
        self.transform = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.LayerNorm(width))
        self.bias = nn.Parameter(torch.zeros(input_embeddings(backbone).num_embeddings))

    def mask(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(masked inputs, labels: the original id where a token was selected, -100 elsewhere)."""
        ids = input_ids.cpu()
        n = len(ids)

        def draw(m: int) -> torch.Tensor:
            tiled = ids.repeat(m // n, 1)  # rows rank*n .. (rank+1)*n are this rank's, where shard_draw keeps them
            special = torch.isin(tiled, self.special_ids)  # [CLS], [SEP], [PAD] ... are never selected
            return torch.stack(self.collator.torch_mask_tokens(tiled.clone(), special_tokens_mask=special), 1)

        both = shard_draw(draw, n).to(input_ids.device)
        return both[:, 0], both[:, 1]

    def forward(self, backbone, batch):
        inputs, labels = self.mask(batch["input_ids"])
        hidden = backbone.tokens({**batch, "input_ids": inputs})
        selected = labels != -100
        target = labels[selected]
        logits = self.transform(hidden[selected]) @ input_embeddings(backbone).weight.T + self.bias
        nll_sum = F.cross_entropy(logits.float(), target, reduction="sum")
        count = selected.sum()
        return {
            "loss": global_mean(nll_sum, count),
            "nll_sum": nll_sum.detach(),
            "correct": (logits.argmax(-1) == target).sum(),
            "tokens": count,
        }

    def make_metrics(self, prefix: str):
        return token_metrics(prefix, accuracy=True)

    def update_metrics(self, metrics, output: dict) -> None:
        update_token_metrics(metrics, output)
