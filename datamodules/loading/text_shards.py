"""Text and image–text pairs from prepared shards (``scripts/prepare_data.py text|image_text``), streamed: the items of
a split read by index in ``BatchLoader``'s seeded order of global batches (``streaming.IndexedLoader``: each rank
its slice, a resumed epoch skipping what was trained) and tokenized in DataLoader workers by the backbone's
tokenizer, as the in-memory text sources tokenize their files (``transforms/text.py``, ``sources/text_corpus.py``).

- ``LabeledTexts`` (``text_classification``): an item's text, truncated at ``max_length`` tokens and padded to it,
  and its label; a batch is cut to its longest text (``cut_to_longest``).
- ``CorpusBlocks`` (``text_corpus``): the split's documents tokenized and concatenated, as in memory, and cut into
  blocks of ``max_length`` tokens; block ``b`` is read as the documents it spans. Which those are comes from the
  documents' token counts, counted once when the datamodule is set up (``token_counts``); a worker keeps the
  documents it tokenized last, so a block does not tokenize again the long document its neighbour just did.
- ``PairItems`` (``image_text``): an item's image, decoded and transformed as a streamed image is, and its caption.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from torch.utils.data import default_collate

from datamodules.loading.shard_reading import ShardItems
from datamodules.transforms.images import load_sample

TOKEN_KEYS = ("input_ids", "attention_mask")


def cut_to_longest(samples: list[dict]) -> dict:
    """Samples right-padded to one width, stacked and cut to the longest of them (what the batch needs)."""
    batch = default_collate(samples)
    width = int(batch["attention_mask"].sum(1).max())
    return {k: v[:, :width] if k in TOKEN_KEYS else v for k, v in batch.items()}


class LabeledTexts(torch.utils.data.Dataset):
    """(index, key) -> one text of a split, tokenized: ``input_ids``/``attention_mask`` padded to ``max_length``,
    and ``label`` when ``labeled``. ``indices``: which items the split's examples are (a label fraction's)."""

    def __init__(self, items: ShardItems, tokenizer, max_length: int, labeled: bool, indices=None):
        self.items, self.tokenizer, self.max_length, self.labeled = items, tokenizer, max_length, labeled
        self.indices = None if indices is None else np.asarray(indices, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.items) if self.indices is None else len(self.indices)

    def __getitem__(self, item) -> dict:
        index, _key = item  # nothing random: the key is unused
        row = self.items[int(index if self.indices is None else self.indices[index])]
        enc = self.tokenizer(
            row["text"], truncation=True, max_length=self.max_length, padding="max_length", return_tensors="pt"
        )
        out = {k: enc[k][0].long() for k in TOKEN_KEYS}
        if self.labeled:
            out["label"] = int(row["label"])
        return out


def document_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Each document's token ids as the in-memory corpus makes them: the tokenizer's own special tokens (BERT:
    ``[CLS] ... [SEP]``), and the end-of-text token after each document for a tokenizer without them (GPT)."""
    ids = tokenizer(texts, verbose=False)["input_ids"]  # documents longer than a block are expected
    eos = tokenizer.eos_token_id if tokenizer.cls_token_id is None else None
    return [doc + [eos] if eos is not None else doc for doc in ids]


def token_counts(items: ShardItems, tokenizer, chunk: int = 4096) -> np.ndarray:
    """How many tokens each document of a split makes (``document_ids``): one pass over its texts."""
    counts = []
    for start in range(0, len(items), chunk):
        texts = [items[i]["text"] for i in range(start, min(start + chunk, len(items)))]
        counts += [len(doc) for doc in document_ids(tokenizer, texts)]
    return np.asarray(counts, dtype=np.int64)


class CorpusBlocks(torch.utils.data.Dataset):
    """(index, key) -> block ``index`` of a split: ``max_length`` tokens of its documents concatenated in order (the
    remainder after the last whole block is dropped, as in memory), without padding."""

    CACHED_TOKENS = 1 << 20  # per worker: the documents tokenized last, up to this many tokens

    def __init__(self, items: ShardItems, tokenizer, max_length: int, counts: np.ndarray):
        self.items, self.tokenizer, self.max_length = items, tokenizer, max_length
        self.starts = np.concatenate([[0], np.cumsum(counts)])  # document d's tokens: [starts[d], starts[d + 1])
        self.blocks = int(self.starts[-1]) // max_length
        self._cache: OrderedDict[int, list[int]] = OrderedDict()

    def __getstate__(self):
        return dict(self.__dict__, _cache=OrderedDict())

    def __len__(self) -> int:
        return self.blocks

    def document(self, d: int) -> list[int]:
        if d in self._cache:
            self._cache.move_to_end(d)
            return self._cache[d]
        ids = document_ids(self.tokenizer, [self.items[d]["text"]])[0]
        self._cache[d] = ids
        while sum(len(v) for v in self._cache.values()) > self.CACHED_TOKENS and len(self._cache) > 1:
            self._cache.popitem(last=False)
        return ids

    def __getitem__(self, item) -> dict:
        index, _key = item
        start = index * self.max_length
        d = int(np.searchsorted(self.starts, start, side="right")) - 1  # the document the block begins in
        ids, offset = [], start - int(self.starts[d])
        while len(ids) < offset + self.max_length:
            ids += self.document(d)
            d += 1
        block = torch.tensor(ids[offset : offset + self.max_length], dtype=torch.long)
        return {"input_ids": block, "attention_mask": torch.ones_like(block)}


class PairItems(torch.utils.data.Dataset):
    """(index, key) -> one image–caption pair of an ``image_text`` shard split: the image decoded and transformed
    (``transform``, seeded by ``key`` as a streamed image is: ``transforms/images.py``), uint8, with ``_error`` and
    ``_name`` for the bad-sample policy; the caption tokenized and padded to ``max_length``; and, for evaluation,
    ``image_id`` and ``caption_id`` (which image, which distinct caption: ``ids``, rows of the split)."""

    def __init__(self, items: ShardItems, tokenizer, max_length: int, channels: int, size: int, transform, ids=None):
        self.items, self.tokenizer, self.max_length = items, tokenizer, max_length
        self.channels, self.size, self.transform, self.ids = channels, size, transform, ids

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, item) -> dict:
        index, key = item
        row = self.items[int(index)]
        out = load_sample(bytes(row["image"]), None, row["name"], self.channels, self.size, self.transform, key)
        enc = self.tokenizer(
            row["text"], truncation=True, max_length=self.max_length, padding="max_length", return_tensors="pt"
        )
        out.update({k: enc[k][0].long() for k in TOKEN_KEYS})
        if self.ids is not None:
            out["image_id"], out["caption_id"] = int(self.ids[0][index]), int(self.ids[1][index])
        return out
