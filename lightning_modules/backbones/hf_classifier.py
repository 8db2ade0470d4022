"""pretune's text classifier as a transformers model: a base model (BERT-, GPT-style, any ``AutoModel``), its last
hidden states pooled as pretune pools them, then dropout and a linear layer, exactly pretune's classification head.

This file is copied as it is into every text fine-tune's ``model/`` (as ``modeling_pretune.py``, named by the
config's ``auto_map``), so ``AutoModelForSequenceClassification.from_pretrained(model_dir, trust_remote_code=True)``
and ``pipeline("text-classification", model=model_dir, trust_remote_code=True)`` load it where pretune is not
installed: it imports torch and transformers only.

Why not ``BertForSequenceClassification`` / ``GPT2ForSequenceClassification``: neither computes what pretune trained.
BERT's class classifies its pooler's output (a dense layer and tanh on ``[CLS]``, trained by next-sentence
prediction, which pretune drops), not the ``[CLS]`` hidden state itself; GPT-2's has no bias in its classifier; and
neither pools by the mean. The model type is ``pretune_classifier``, not ``bert``: loaded without
``trust_remote_code=True`` it is refused, instead of being silently built as a BERT classifier with a fresh pooler.

Pooling (``config.pooling``): ``cls`` the first token, ``mean`` the mean over the real tokens (``attention_mask``),
``last`` the last real token (the rightmost position the mask keeps: right or left padding alike). Only
``input_ids`` and ``attention_mask`` reach the base model, as in pretune (a tokenizer's ``token_type_ids`` would
add GPT-2's token embeddings a second time).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

POOLINGS = ("cls", "mean", "last")


class PretuneClassifierConfig(PretrainedConfig):
    """``encoder``: the base model's own config (a dict, as its ``config.json`` holds it); ``pooling``; the
    classifier's dropout (a no-op at inference); ``id2label``/``label2id`` as every classifier's config has them."""

    model_type = "pretune_classifier"

    def __init__(self, encoder: dict | None = None, pooling: str = "cls", classifier_dropout: float = 0.0, **kwargs):
        self.encoder = encoder.to_dict() if isinstance(encoder, PretrainedConfig) else dict(encoder or {})
        self.pooling = pooling
        self.classifier_dropout = classifier_dropout
        super().__init__(**kwargs)


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pooled features ``(B, D)`` of the last hidden states ``(B, T, D)`` under ``mask`` ``(B, T)``."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "mean":
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
    if pooling == "last":
        positions = torch.arange(mask.shape[1], device=mask.device)
        last = (mask.to(positions.dtype) * positions).argmax(-1)  # the rightmost real token
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ValueError(f"pooling={pooling!r}: allowed are {', '.join(POOLINGS)}")


class PretuneForSequenceClassification(PreTrainedModel):
    config_class = PretuneClassifierConfig
    base_model_prefix = "backbone"

    def __init__(self, config: PretuneClassifierConfig):
        super().__init__(config)
        encoder = dict(config.encoder)
        self.backbone = AutoModel.from_config(AutoConfig.for_model(encoder.pop("model_type"), **encoder))
        if getattr(self.backbone, "pooler", None) is not None:
            self.backbone.pooler = None  # BERT's pooler: pretune does not use it, and it is not in the weights
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(self.backbone.config.hidden_size, config.num_labels)
        self.post_init()

    def _init_weights(self, module):
        if module is self.classifier:  # the base model initialises its own modules; the weights replace all
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs) -> SequenceClassifierOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        logits = self.classifier(self.dropout(pool(hidden, attention_mask, self.config.pooling)))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)
