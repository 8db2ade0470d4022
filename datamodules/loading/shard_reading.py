"""Reading prepared shards (``prepare.py``): their ``pretune.json`` checked, and their items read by index.

Every datamodule that reads shards starts here: ``datamodule=shards`` (images), ``text_corpus`` and
``text_classification`` (``prepare_data.py text``), ``image_text`` (``prepare_data.py image_text``). A directory that
was not prepared, was prepared by another format version, or holds another kind of data is refused in one line
naming ``datamodule.path`` and the command that prepares the right kind.

``ShardItems`` reads one split by index (random access into litdata's chunks): the image datamodule's evaluation
reads its splits so, and the text and image–text datamodules all their splits, in ``BatchLoader``'s seeded order of
global batches, each rank its slice (``streaming.IndexedLoader``): the same batches as one process, and a resumed
epoch skips the batches already trained without reading them. Their items are small (text, or an image and a
caption) and the data a few GB at most: the chunks a random access needs are local, or cached under
``datamodule.cache_dir`` from an object store.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from datamodules.loading.prepare import FORMAT, META, VERSION
from lightning_modules.core.errors import ConfigError
from lightning_modules.core.extras import require

HOW = {
    "image_folder": "python scripts/prepare_data.py image_folder root=<images> out=<dir>",
    "text": "python scripts/prepare_data.py text file=<table> out=<dir> [label_column=label]",
    "image_text": "python scripts/prepare_data.py image_text file=<pairs table> out=<dir> text_column=caption",
}


def is_url(path: str) -> bool:
    return "://" in path or path.startswith("local:")


def read_meta(path: str, cache_dir: str | None = None, kind: str = "image_folder", who: str = "shards") -> dict:
    """``pretune.json`` of a prepared directory (downloaded first from a URL), checked: a directory that was not
    prepared (or whose preparation was cut short), was prepared in another format version, or holds another
    ``kind`` of data than ``datamodule={who}`` reads, is refused with one line."""
    where = f"datamodule.path={path}"
    how = f"prepare it with: {HOW[kind]}"
    if is_url(path):
        require(where + " (shards)", "litdata")
        from litdata.streaming.downloader import get_downloader

        if cache_dir:
            Path(cache_dir).mkdir(parents=True, exist_ok=True)
        local = Path(tempfile.mkdtemp(prefix="pretune-meta-", dir=cache_dir)) / META
        try:
            get_downloader(path, str(local.parent), []).download_file(f"{path.rstrip('/')}/{META}", str(local))
            text = local.read_text()
        except Exception as err:
            raise ConfigError(f"{where}: no {META} could be read there ({type(err).__name__}); {how}") from err
    else:
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"{where}: no such directory; {how}")
        if not (folder / META).is_file():
            partial = sorted(p.name for p in folder.parent.glob(f".{folder.name}.partial-*"))
            cut = f" (an interrupted preparation left {partial[0]}: run it again)" if partial else ""
            raise ConfigError(f"{where}: not a prepared shard directory, it has no {META}{cut}; {how}")
        text = (folder / META).read_text()
    meta = json.loads(text)
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ConfigError(
            f"{where}: prepared as {meta.get('format')} version {meta.get('version')}, this pretune reads"
            f" {FORMAT} version {VERSION}; prepare it again with scripts/prepare_data.py"
        )
    if meta["kind"] != kind:
        if who == "shards":
            reads = "datamodule=shards streams images prepared from an image folder"
        else:
            reads = f"datamodule={who} reads {kind} shards ({HOW[kind]})"
        raise ConfigError(f"{where} holds {meta['kind']} shards; {reads}")
    return meta


class ShardItems:
    """The ``size`` items of one prepared split (``pretune.json``'s count) by index, as litdata stored them (a dict
    per item); the litdata dataset opens lazily, in each process that reads (DataLoader workers are forked without
    it). The size is the split's, not ``len()`` of litdata's dataset: under DDP that is this rank's share."""

    def __init__(self, path: str, size: int, cache_dir: str | None = None):
        self.path, self.size, self.cache_dir, self._dataset = path, size, cache_dir, None

    def __getstate__(self):
        return dict(self.__dict__, _dataset=None)

    def dataset(self):
        if self._dataset is None:
            require(f"datamodule.path={self.path} (shards)", "litdata")
            from litdata import StreamingDataset

            self._dataset = StreamingDataset(self.path, cache_dir=self.cache_dir)
        return self._dataset

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        return self.dataset()[index]

    def column(self, name: str) -> list:
        """One field of every item, in order (a pass over the split: for what setup must know of all items, such
        as the labels a label fraction is drawn from)."""
        return [self[i][name] for i in range(len(self))]
