"""Texts to token ids, through the backbone's own tokenizer: right-padded to a fixed width for in-memory storage
(batches are cut to their longest text when they are taken, ``loading/text.py``)."""

from __future__ import annotations

import torch


def tokenize(tokenizer, texts: list[str], max_length: int) -> tuple[dict[str, torch.Tensor], torch.Tensor, int]:
    """``texts`` as right-padded ``input_ids``/``attention_mask`` of ``max_length`` columns (for
    ``PaddedBatchLoader``), their lengths, and how many were longer than ``max_length`` (truncated as the
    tokenizer truncates: its special tokens kept)."""
    full = tokenizer(texts, verbose=False)["input_ids"]  # no warning: the lengths are what is asked
    too_long = sum(len(ids) > max_length for ids in full)
    enc = tokenizer(texts, truncation=True, max_length=max_length, padding="max_length", return_tensors="pt")
    tensors = {"input_ids": enc["input_ids"].long(), "attention_mask": enc["attention_mask"].long()}
    return tensors, tensors["attention_mask"].sum(1), too_long
