"""``scripts/predict.py``'s and ``scripts/export.py``'s own keys (``conf/predict.yaml``, ``conf/export.yaml``): the
trained model, the new inputs, and how to read them; the format to export to. ``device`` is ``evaluate``'s rule."""

from __future__ import annotations

import glob
from pathlib import Path

from lightning_modules.config.kinds import Choice, Custom, ExistingPath, ListOf, Rule, Text, invalid
from lightning_modules.core.errors import ConfigError

INPUT = "an image folder, an image file, a glob of images, or a .txt/.csv/.tsv/.jsonl file of texts"


def check_input(key: str, value):
    """An input that exists, or a glob that matches at least one file: an input that matches nothing is one line
    now, not after the model has loaded."""
    if value is None:
        return value
    if not isinstance(value, str) or not value.strip():
        raise invalid(key, value, INPUT)
    path = Path(value).expanduser()
    if path.exists():
        return value
    if glob.has_magic(value):
        if not glob.glob(str(path), recursive=True):
            raise ConfigError(f"{key}={value}: the pattern matches no file; allowed is {INPUT}")
        return value
    raise ConfigError(f"{key}={value}: no such file or folder; allowed is {INPUT}")


RULES: dict[str, object] = {
    "run_dir": ExistingPath("dir"),  # a fine-tune run (its model/), a model/ folder, or a CLIP pre-training run
    "input": Custom(check_input, INPUT + " (null: export.py checks on a synthetic batch)"),
    "text_column": Text(r"[^\n]+", "a column name"),
    "top_k": Rule(int, low=1),
    "batch_size": Rule(int, low=1),
    "num_workers": Rule(int, low=0, nullable=True),
    "on_bad_sample": Choice("error", "skip"),
    "class_names": ListOf(Text(), min_len=2, nullable=True),
    "templates": ListOf(Text(r".*\{\}.*", "a template with {} for the class name"), min_len=1),
    "format": Choice("onnx", "pt2"),
}
