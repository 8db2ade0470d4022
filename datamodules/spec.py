"""What objectives and backbones need to know about the data, per modality, whatever its source.

Each spec names its ``modality`` (the batch entries it fills): ``image`` batches hold ``image`` (and
``label``), ``text`` batches ``input_ids`` and ``attention_mask`` (and ``label``), ``image_text`` batches
both (an image and one of its captions).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar


@dataclass(frozen=True)
class ImageSpec:
    modality: ClassVar[str] = "image"

    channels: int
    image_size: int
    num_classes: int = 0  # 0 when unlabeled (pre-training)
    class_names: tuple[str, ...] = ()
    # What the batches were normalised with (per channel, or one value for all); None: not known. Augmentations
    # that act on pixels (colour, solarization: datamodules/transforms/photo.py) undo it and redo it.
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None


@dataclass(frozen=True)
class TextSpec:
    """Text data as the backbone's tokenizer turned it into ids: batches hold ``input_ids`` and
    ``attention_mask`` (right-padded with ``pad_id``, at most ``max_length`` long) and, when labeled, ``label``.
    ``tokenizer`` is the backbone's (``backbone.processor``): the objectives read its special tokens (MLM's
    ``[MASK]``) from it."""

    modality: ClassVar[str] = "text"

    vocab_size: int  # len(tokenizer): ids are below it
    max_length: int
    pad_id: int
    num_classes: int = 0  # 0 when unlabeled (pre-training)
    class_names: tuple[str, ...] = ()
    tokenizer: Any = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class ImageTextSpec:
    """Image–caption pairs: batches hold ``image`` (channels x image_size²) and the caption's ``input_ids`` and
    ``attention_mask`` (the text tower's tokenizer, right-padded with ``pad_id``, at most ``max_length`` long);
    evaluation batches also ``image_id`` and ``caption_id`` (which image, which distinct caption), for retrieval."""

    modality: ClassVar[str] = "image_text"

    channels: int
    image_size: int
    vocab_size: int
    max_length: int
    pad_id: int
    tokenizer: Any = field(default=None, compare=False, repr=False)
