"""Prepared shards: an image folder, a CSV/JSONL of text, or image-text pairs turned, once, into chunked binary
shards with litdata's ``optimize``, which ``datamodule=shards`` streams from a local path or an object store.

Layout of a prepared directory (format ``pretune-shards``, version ``VERSION``)::

    <out>/pretune.json          what was prepared: kind, splits and their sizes, class names, image statistics,
                                the seed of the training items' order (shuffle_seed)
    <out>/{train,val,test}/     one litdata dataset per split (index.json + chunk-*.bin)

**Order.** Training items are written in a random order seeded by ``shuffle_seed`` (recorded in ``pretune.json``),
not in the folder's: a folder is grouped by class, and a reader that streams a chunk at a time (litdata gives each
worker its own chunks) would see a few classes per batch. Shuffled, every chunk and every run of items within one is
a random sample of the split. Validation and test items keep the split's order (each is read once, in order).

Items hold raw data; decoding and tokenizing stay with the datamodule that reads them:
``image_folder``: {"image": the file's bytes, "label": class index, "name": its path under the root};
``text``: {"text": str, "label": class index (when the file has labels)};
``image_text``: {"image": bytes, "text": str, "name": path}.

**Atomic.** Everything is written under ``.<out>.partial-<pid>`` next to ``<out>`` and renamed to ``<out>``
when complete, ``pretune.json`` last: a preparation killed half-way leaves a ``.partial`` directory and no
``<out>``, and nothing that reads as prepared. **Bad images** are found before writing (every image is decoded
once, by a pool of threads): by default the first one stops the preparation with one line naming it;
``on_bad_sample=skip`` leaves them out and records them in ``pretune.json``.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from datamodules.loading.decision import default_workers
from datamodules.sources.folders import folder_splits
from datamodules.transforms.decode import decode
from lightning_modules.config.kinds import SEED
from lightning_modules.config.rules.datamodule import check_split_fractions
from lightning_modules.core.errors import ConfigError
from lightning_modules.core.extras import require

# Version 2: training items are written in a seeded random order (version 1 wrote them in the folder's or table's
# order: a class-sorted folder made chunks of a few classes each).
FORMAT, VERSION, META = "pretune-shards", 2, "pretune.json"
KINDS = ("image_folder", "text", "image_text")
SPLITS = ("train", "val", "test")
STATS_SAMPLE = 256


# --- what one item is (module level: litdata's workers import them) -------------------------------------
def _image_item(entry: tuple) -> dict:
    path, label, name = entry
    return {"image": Path(path).read_bytes(), "label": int(label), "name": name}


def _text_item(entry: tuple) -> dict:
    text, label = entry
    return {"text": text} if label is None else {"text": text, "label": int(label)}


def _pair_item(entry: tuple) -> dict:
    path, text, name = entry
    return {"image": Path(path).read_bytes(), "text": text, "name": name}


# --- images: checked once, before anything is written ---------------------------------------------------
def check_images(paths: list[str], names: list[str], on_bad_sample: str, where: str, sample: set[int]):
    """Decode every image once: returns (the indices that read, the skipped names, RGB mean/std over the
    images at the indices in ``sample``). A bad image raises a ConfigError unless ``on_bad_sample=skip``."""
    stats = {"sum": np.zeros(3), "squares": np.zeros(3), "count": 0}
    lock = threading.Lock()

    def read(i):
        try:
            image = decode(paths[i], 3)
        except Exception as err:
            return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        if i in sample:
            x = np.asarray(image, dtype=np.float64).reshape(-1, 3) / 255
            with lock:
                stats["sum"] += x.sum(0)
                stats["squares"] += (x * x).sum(0)
                stats["count"] += len(x)
        return ""

    with ThreadPoolExecutor(max_workers=default_workers()) as pool:
        errors = list(pool.map(read, range(len(paths))))
    good, skipped = [], []
    for i, error in enumerate(errors):
        if not error:
            good.append(i)
            continue
        if on_bad_sample != "skip":
            raise ConfigError(
                f"{where}: cannot read image {names[i]} ({error}); on_bad_sample=skip leaves unreadable images out"
            )
        print(f"warning: {where}: left out unreadable image {names[i]} ({error})", file=sys.stderr)
        skipped.append(names[i])
    if stats["count"]:
        mean = stats["sum"] / stats["count"]
        std = np.sqrt(np.maximum(stats["squares"] / stats["count"] - mean * mean, 1e-12))
        moments = (mean.tolist(), np.maximum(std, 1e-3).tolist())
    else:
        moments = ([0.5] * 3, [0.25] * 3)
    return good, skipped, moments


# --- tables (CSV / JSONL) -------------------------------------------------------------------------------
def read_table(file: str) -> list[dict]:
    path = Path(file).expanduser()
    if not path.is_file():
        raise ConfigError(f"file={file}: no such file (a .csv, .tsv or .jsonl of one row per example)")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        rows = []
        with path.open(encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise ConfigError(f"file={file}: line {number} is not JSON ({err.msg})") from err
        return rows
    if suffix in (".csv", ".tsv"):
        with path.open(encoding="utf-8", newline="") as fh:
            return list(csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ","))
    raise ConfigError(f"file={file}: unknown format {suffix!r}: allowed are .csv, .tsv, .jsonl")


def _column(rows: list[dict], name: str, file: str, required: bool = True) -> list | None:
    if rows and name not in rows[0]:
        if not required:
            return None
        raise ConfigError(f"file={file}: no column {name!r}; the columns are {sorted(rows[0])}")
    values = [row.get(name) for row in rows]
    missing = [i for i, v in enumerate(values) if v is None or (isinstance(v, str) and not v.strip())]
    if missing and required:
        raise ConfigError(f"file={file}: row {missing[0] + 1} has no {name!r}")
    return values


def _encode_labels(values: list) -> tuple[np.ndarray, list[str]]:
    """Class indices, and the class names in order: numerically when every label is an integer."""
    names = {str(v) for v in values}
    numeric = all(n.lstrip("-").isdigit() for n in names)
    classes = sorted(names, key=int) if numeric else sorted(names)
    index = {c: i for i, c in enumerate(classes)}
    return np.asarray([index[str(v)] for v in values], dtype=np.int64), classes


def table_splits(n: int, labels, split_values, val_fraction: float, test_fraction: float, split_seed: int):
    """Row indices per split: a ``split`` column's values when the table has one, else a seeded split
    (stratified when labeled) with the given fractions."""
    idx = np.arange(n)
    if split_values is not None:
        named = {s: idx[[str(v) == s for v in split_values]] for s in SPLITS}
        unknown = sorted({str(v) for v in split_values} - set(SPLITS) - {"valid", "validation", "dev"})
        if unknown:
            raise ConfigError(f"split column holds {unknown}: allowed are 'train', 'val' (or 'validation'), 'test'")
        named["val"] = idx[[str(v) in ("val", "valid", "validation", "dev") for v in split_values]]
        return named
    stratify = labels if labels is not None and len(np.unique(labels)) > 1 else None
    held = val_fraction + test_fraction
    train, rest = train_test_split(idx, test_size=held, stratify=stratify, random_state=split_seed)
    val, test = train_test_split(
        rest,
        test_size=test_fraction / held,
        stratify=None if stratify is None else labels[rest],
        random_state=split_seed,
    )
    return {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


# --- the command ------------------------------------------------------------------------------------------
def prepare(
    kind: str,
    out: str | None = None,
    root: str | None = None,
    file: str | None = None,
    text_column: str = "text",
    label_column: str | None = None,
    image_column: str = "image",
    split_column: str = "split",
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    split_seed: int = 0,
    shuffle_seed: int = 0,
    chunk_mb: float = 64,
    workers: int | None = None,
    on_bad_sample: str = "error",
    overwrite: bool = False,
) -> Path:
    """Prepare shards of ``kind`` into ``out``; returns ``out``. Arguments as ``scripts/prepare_data.py``."""
    if kind not in KINDS:
        raise ConfigError(f"kind={kind!r} is unknown: allowed are {', '.join(KINDS)}")
    if not out:
        raise ConfigError("out is not set: allowed is the directory to write the shards to (it must not exist)")
    if on_bad_sample not in ("error", "skip"):
        raise ConfigError(f"on_bad_sample={on_bad_sample!r} is invalid: allowed are 'error', 'skip'")
    check_split_fractions(val_fraction, test_fraction, prefix="")  # the command's keys have no datamodule. prefix
    SEED.check("shuffle_seed", shuffle_seed)
    if "://" in str(out) or str(out).startswith("local:"):
        raise ConfigError(
            f"out={out}: prepare into a local directory, then copy it to the object store (e.g. aws s3 sync);"
            " datamodule.path reads it from there"
        )
    target = Path(out).expanduser().absolute()
    if target.exists() and not overwrite:
        raise ConfigError(f"out={out} exists: allowed is a new directory (or overwrite=true to replace it)")
    meta = {"format": FORMAT, "version": VERSION, "kind": kind}
    if kind == "image_folder":
        entries, extra = _image_folder_entries(root, val_fraction, test_fraction, split_seed, on_bad_sample)
        fn = _image_item
    else:
        entries, extra = _table_entries(
            kind,
            file,
            text_column,
            label_column,
            image_column,
            split_column,
            val_fraction,
            test_fraction,
            split_seed,
            on_bad_sample,
        )
        fn = _text_item if kind == "text" else _pair_item
    order = np.random.default_rng(shuffle_seed).permutation(len(entries["train"]))
    entries["train"] = [entries["train"][i] for i in order]  # a seeded random order: chunks mix classes
    meta.update(extra, splits={s: len(entries[s]) for s in SPLITS}, shuffle_seed=shuffle_seed)
    empty = [s for s in SPLITS if not entries[s]]
    if empty:
        raise ConfigError(f"{kind}: the {empty[0]} split would be empty; add examples or change its fraction")

    partial_dir = target.parent / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(partial_dir, ignore_errors=True)
    partial_dir.mkdir(parents=True)
    try:
        require("prepare_data", "litdata")
        from litdata import optimize  # heavy: only once the inputs are checked

        for split in SPLITS:
            n_workers = max(1, min(workers or default_workers(), len(entries[split])))
            optimize(
                fn=fn,
                inputs=entries[split],
                output_dir=str(partial_dir / split),
                chunk_bytes=int(chunk_mb * 2**20),
                num_workers=n_workers,
                reorder_files=False,
                verbose=False,
                # fork: a worker needs nothing re-imported, and a script without a __main__ guard works
                start_method="fork" if sys.platform == "linux" else None,
            )
            _check_written(partial_dir / split, len(entries[split]))
        (partial_dir / META).write_text(json.dumps(meta, indent=1) + "\n")  # last: the mark of a whole directory
        if target.exists():  # overwrite=true: the old directory goes only once the new one is complete
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, old)
            os.replace(partial_dir, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(partial_dir, target)
    except BaseException:
        shutil.rmtree(partial_dir, ignore_errors=True)
        raise
    return target


def _check_written(directory: Path, expected: int) -> None:
    """litdata's optimize can return after a worker died; a split is only whole with all its items indexed."""
    index = directory / "index.json"
    chunks = json.loads(index.read_text())["chunks"] if index.is_file() else []
    written = sum(chunk["chunk_size"] for chunk in chunks)
    missing = [c["filename"] for c in chunks if not (directory / c["filename"]).is_file()]
    if written != expected or missing:
        raise RuntimeError(
            f"litdata wrote {written} of {expected} items to {directory} (missing chunks: {missing[:3]})"
        )


def _image_folder_entries(root, val_fraction, test_fraction, split_seed, on_bad_sample):
    files, classes = folder_splits(root, val_fraction, test_fraction, split_seed, key="root")
    base = Path(root).expanduser()
    entries, skipped, moments = {}, [], None
    for split in SPLITS:
        paths, labels = files[split]
        names = [os.path.relpath(p, base) for p in paths]
        rng = np.random.default_rng(split_seed)
        sample = set(rng.permutation(len(paths))[:STATS_SAMPLE].tolist()) if split == "train" else set()
        good, bad, stats = check_images(list(paths), names, on_bad_sample, f"root={root}", sample)
        skipped += bad
        moments = stats if split == "train" else moments
        entries[split] = [(str(paths[i]), int(labels[i]), names[i]) for i in good]
    mean, std = moments
    return entries, {"classes": list(classes), "mean": mean, "std": std, "skipped": skipped}


def _table_entries(
    kind,
    file,
    text_column,
    label_column,
    image_column,
    split_column,
    val_fraction,
    test_fraction,
    split_seed,
    on_bad_sample,
):
    rows = read_table(file)
    if not rows:
        raise ConfigError(f"file={file}: no rows")
    texts = [str(t) for t in _column(rows, text_column, file)]
    extra: dict = {"columns": {"text": text_column}}
    labels = None
    if kind == "text":
        raw_labels = _column(rows, label_column or "label", file, required=label_column is not None)
        if raw_labels is not None:
            labels, classes = _encode_labels(raw_labels)
            extra.update(classes=classes)
            extra["columns"]["label"] = label_column or "label"
    split_values = _column(rows, split_column, file, required=False)
    order = table_splits(len(rows), labels, split_values, val_fraction, test_fraction, split_seed)
    if kind == "text":
        entries = {s: [(texts[i], None if labels is None else labels[i]) for i in order[s]] for s in SPLITS}
        return entries, extra
    base = Path(file).expanduser().absolute().parent  # image paths are relative to the table's folder
    names = [str(v) for v in _column(rows, image_column, file)]
    paths = [str(base / name) for name in names]
    extra["columns"]["image"] = image_column
    entries, skipped, moments = {}, [], None
    for split in SPLITS:
        idx = order[split]
        sample = set(range(min(len(idx), STATS_SAMPLE))) if split == "train" else set()
        good, bad, stats = check_images(
            [paths[i] for i in idx], [names[i] for i in idx], on_bad_sample, f"file={file}", sample
        )
        skipped += bad
        moments = stats if split == "train" else moments
        entries[split] = [(paths[idx[j]], texts[idx[j]], names[idx[j]]) for j in good]
    extra.update(mean=moments[0], std=moments[1], skipped=skipped)
    return entries, extra
