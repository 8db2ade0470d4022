"""One image file decoded to the channels a run asks for, with PIL and numpy only: the in-memory and streaming
paths and ``scripts/prepare_data.py`` (which imports nothing heavier) decode every file with it, so they agree on
the pixels."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def decode(source: bytes | memoryview | str | Path, channels: int) -> Image.Image:
    """The image in ``source`` (file bytes or a path), fully decoded, as ``L`` (1 channel) or ``RGB`` (3)."""
    fh = io.BytesIO(source) if isinstance(source, (bytes, memoryview)) else source
    with Image.open(fh) as im:
        im.load()  # decode now: a truncated or corrupt file fails here, with the file still known
        return to_channels(im, channels)


def to_channels(im: Image.Image, channels: int) -> Image.Image:
    target = "L" if channels == 1 else "RGB"
    if im.mode == target:
        return im
    if im.mode.startswith("I") or im.mode == "F":  # 16-bit (I;16*) and 32-bit grayscale: scale to 8 bits
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        im = Image.fromarray(np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8), "L")
    elif im.mode == "P":  # palette: through RGBA, so a transparent palette converts without PIL's warning
        im = im.convert("RGBA")
    return im.convert(target)
