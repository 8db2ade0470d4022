"""What objectives and backbones need to know about the data, per modality, whatever its source.

Each spec names its ``modality`` (the batch entries it fills): ``image`` batches hold ``image`` (and
``label``), ``text`` batches ``input_ids`` and ``attention_mask`` (and ``label``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True)
class ImageSpec:
    modality: ClassVar[str] = "image"

    channels: int
    image_size: int
    num_classes: int = 0  # 0 when unlabeled (pre-training)
    class_names: tuple[str, ...] = ()
