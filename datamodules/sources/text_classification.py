"""Labeled text: a CSV, TSV or JSONL file of texts and labels, or the embedded standard-library task.

``datamodule.path`` is the training file (``.csv``, ``.tsv``, ``.jsonl``), with the texts in ``text_column`` and the
labels in ``label_column``, or prepared text shards with labels (``prepare_data.py text ... label_column=``; a
directory or URL: streamed, their splits and classes as prepared, ``loading/text.py``); ``val_path`` and
``test_path`` are used when given, else those splits are carved from the training file (``val_fraction``,
``test_fraction``; stratified, seeded by ``split_seed``), as ``image_folder`` does. With ``path: null`` the data is
the embedded task: standard-library docstrings labeled by package family (``stdlib_docs.labeled_task``; ``families``
classes; split by module, fixed).

Fine-tuning keeps ``label_fraction`` of the training labels (stratified, seeded by ``label_seed``); texts longer
than ``max_length`` tokens are truncated, and how many were is reported once. A backbone built from scratch trains
its tokenizer on all training texts (labeled or not, never validation or test), as the image sources normalise with
the statistics of all training images.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.model_selection import train_test_split

from datamodules.loading.in_memory import label_subset
from datamodules.loading.text import TextDataModule, read_text
from datamodules.loading.text_shards import LabeledTexts
from datamodules.sources.stdlib_docs import labeled_task
from lightning_modules.config.rules import check
from lightning_modules.config.rules.datamodule import check_split_fractions
from lightning_modules.core.errors import ConfigError

FORMATS = (".csv", ".tsv", ".jsonl")


class TextClassificationDataModule(TextDataModule):
    name = "text_classification"

    def __init__(
        self,
        path: str | None = None,
        val_path: str | None = None,
        test_path: str | None = None,
        text_column: str = "text",
        label_column: str = "label",
        families: int = 15,
        label_fraction: float = 1.0,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        split_seed: int = 0,
        label_seed: int = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        for key, value in (("path", path), ("val_path", val_path), ("test_path", test_path)):
            check(f"datamodule.{key}", value)
        self.path, self.val_path, self.test_path = path, val_path, test_path
        if self.is_shards(path):
            for key, value in (("val_path", val_path), ("test_path", test_path)):
                if value is not None:
                    raise ConfigError(
                        f"datamodule.{key}={value}: prepared shards bring their own splits; allowed is"
                        f" datamodule.{key}=null with datamodule.path={path}"
                    )
            self.read_shards(path)
        self.text_column = check("datamodule.text_column", text_column)
        self.label_column = check("datamodule.label_column", label_column)
        self.families = check("datamodule.families", families)
        self.label_fraction = float(check("datamodule.label_fraction", label_fraction))
        self.val_fraction, self.test_fraction = check_split_fractions(val_fraction, test_fraction)
        self.split_seed, self.label_seed, self.shuffle_seed = split_seed, label_seed, label_seed
        self._raw: tuple[dict, tuple[str, ...]] | None = None
        self.truncated = 0

    # --- reading -------------------------------------------------------------------------------------------
    def _rows(self, key: str, value: str) -> list[tuple[str, str]]:
        """(text, label) rows of one file, refused with one line naming ``key`` and the file."""
        columns = {"datamodule.text_column": self.text_column, "datamodule.label_column": self.label_column}
        rows = read_columns(Path(value).expanduser(), columns, f"datamodule.{key}={value}")
        return [("" if t is None else str(t), str(label)) for t, label in rows]

    def _read_files(self):
        train = self._rows("path", self.path)
        classes = _class_names(label for _, label in train)
        if len(classes) < 2:
            raise ConfigError(
                f"datamodule.label_column={self.label_column}: {self.path} has only one class ({classes[0]!r});"
                " allowed is at least 2"
            )
        index = {c: i for i, c in enumerate(classes)}
        splits = {"train": ([t for t, _ in train], np.array([index[label] for _, label in train]))}
        for split, key, value in (("val", "val_path", self.val_path), ("test", "test_path", self.test_path)):
            if value is None:
                continue
            rows = self._rows(key, value)
            unknown = sorted({label for _, label in rows} - set(index))
            if unknown:
                raise ConfigError(f"datamodule.{key}={value}: labels not in {self.path}: {unknown[:5]}")
            splits[split] = ([t for t, _ in rows], np.array([index[label] for _, label in rows]))
        n_total = len(train)
        for split, fraction in (("val", self.val_fraction), ("test", self.test_fraction)):
            if split in splits:
                continue
            texts, y = splits["train"]
            n_hold = max(len(classes), round(fraction * n_total))
            try:
                keep, hold = train_test_split(
                    np.arange(len(y)), test_size=n_hold, stratify=y, random_state=self.split_seed
                )
            except ValueError as err:
                raise ConfigError(
                    f"datamodule.path={self.path}: too few examples per class to split off {split}"
                    f" ({err}); give datamodule.{split}_path"
                ) from err
            keep, hold = np.sort(keep), np.sort(hold)
            splits["train"], splits[split] = ([texts[i] for i in keep], y[keep]), ([texts[i] for i in hold], y[hold])
        return splits, classes

    def _shard_texts(self):
        items = self.shard_items("train")
        return (items[i]["text"] for i in range(len(items)))

    def raw(self) -> tuple[dict, tuple[str, ...]]:
        """{"train"|"val"|"test": (texts, labels)} and the class names, read once."""
        if self._raw is None:
            if self.path is None:
                splits, classes = labeled_task(self.families, self.cache_dir)
                splits = {s: (texts, np.array(labels)) for s, (texts, labels) in splits.items()}
            else:
                splits, classes = self._read_files()
            self._raw = splits, tuple(classes)
        return self._raw

    def texts(self):
        """The training texts (streamed from shards: read as the tokenizer trains, not held)."""
        return self._shard_texts() if self.shard_meta is not None else list(self.raw()[0]["train"][0])

    # --- tensors -------------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.splits or self.streamed:
            return
        if self.shard_meta is not None:
            return self._setup_shards()
        splits, classes = self.raw()
        texts, y = splits["train"]
        if self.labeled and self.label_fraction < 1:
            keep = label_subset(y, self.label_fraction, self.label_seed)
            texts, y = [texts[i] for i in keep], y[keep]
        splits = {**splits, "train": (texts, y)}
        total, truncated = 0, 0
        for name, (split_texts, labels) in splits.items():
            tensors, lengths, too_long = self.encode(list(split_texts))
            if self.labeled or name != "train":
                tensors["label"] = torch.as_tensor(labels, dtype=torch.long)
            self.splits[name], self.lengths[name] = tensors, lengths
            total, truncated = total + len(split_texts), truncated + too_long
        self.truncated = truncated
        if truncated:
            from pytorch_lightning.utilities import rank_zero_info

            rank_zero_info(
                f"datamodule: {truncated} of {total} texts are longer than datamodule.max_length={self.max_length}"
                " tokens and were truncated"
            )
        self.check_batch_size(
            f"labeled training examples (label_fraction={self.label_fraction})" if self.labeled else "training texts"
        )
        self.spec = self.make_spec(classes)

    def _setup_shards(self) -> None:
        """Each split a dataset of tokenized texts read from the shards (``loading/text_shards.py``); a label
        fraction is drawn from the training labels (one pass over them), as in memory."""
        classes = self.shard_meta.get("classes") or []
        if self.labeled and not classes:
            raise ConfigError(
                f"datamodule.path={self.shard_path}: its text shards have no labels (prepared without label_column);"
                " datamodule=text_classification needs them: prepare_data.py text file=<table> out=<dir>"
                " label_column=<column>"
            )
        tokenizer, keep = self._require_tokenizer(), None
        if self.labeled and self.label_fraction < 1:
            keep = label_subset(
                np.asarray(self.shard_items("train").column("label")), self.label_fraction, self.label_seed
            )
        self.streamed = {
            split: LabeledTexts(
                self.shard_items(split),
                tokenizer,
                self.max_length,
                labeled=bool(classes) and (self.labeled or split != "train"),
                indices=keep if split == "train" else None,
            )
            for split in ("train", "val", "test")
        }
        self.check_batch_size(
            f"labeled training examples (label_fraction={self.label_fraction})" if self.labeled else "training texts"
        )
        self.spec = self.make_spec(tuple(classes))


def read_columns(path: Path, columns: dict[str, str], what: str) -> list[tuple]:
    """The rows of a .csv, .tsv or .jsonl file as tuples of ``columns`` (the key a user names each column with ->
    the column), in the file's order; a missing column or a malformed line is one line naming its key and the file
    (``what``: how the file was named, e.g. ``datamodule.path=reviews.csv``)."""
    if path.suffix.lower() not in FORMATS:
        raise ConfigError(f"{what}: unknown format {path.suffix or '(none)'}; allowed are {', '.join(FORMATS)}")
    if not path.is_file():
        raise ConfigError(f"{what}: no such file")
    text = read_text(path, what)
    if path.suffix.lower() == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{what}: line {number} is not JSON ({err.msg})") from err
            if not isinstance(record, dict):
                raise ConfigError(f"{what}: line {number} is not a JSON object")
            for key, column in columns.items():
                if column not in record:
                    raise ConfigError(f"{key}={column}: line {number} of {path} has no such key")
            rows.append(tuple(record[column] for column in columns.values()))
    else:
        reader = csv.DictReader(io.StringIO(text), delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        header = reader.fieldnames or []
        for key, column in columns.items():
            if column not in header:
                raise ConfigError(f"{key}={column}: no such column in {path} (columns: {', '.join(header)})")
        rows = [tuple(r[column] for column in columns.values()) for r in reader]
    if not rows:
        raise ConfigError(f"{what}: no rows")
    return rows


def _class_names(labels) -> tuple[str, ...]:
    """The distinct labels, in numeric order when they are all integers, else alphabetical."""
    names = set(labels)
    try:
        return tuple(sorted(names, key=int))
    except ValueError:
        return tuple(sorted(names))
