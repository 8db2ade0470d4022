"""Unlabeled text for pre-training (MLM, CLM): ``.txt`` files, or the embedded standard-library docs.

``datamodule.paths``: files or globs (``notes/*.txt``, ``~/books/**/*.txt``); ``datamodule.document``: ``file``
(each file is one document) or ``line`` (each non-blank line is one). With ``paths: null`` the corpus is the
documentation shipped with Python (``stdlib_docs.corpus_documents``: ~2 M characters). Or ``datamodule.path``:
prepared text shards (``prepare_data.py text``, a directory or URL), each row a document, streamed with the
shards' own splits (``loading/text_shards.py``: the same blocks, read by DataLoader workers).

Every document is tokenized once (BERT-style: ``[CLS] text [SEP]``; GPT-style: text then ``<|endoftext|>``),
the documents are concatenated and cut into blocks of ``max_length`` tokens (the remainder dropped), and a
seeded ``val_fraction`` of the blocks is held out for validation (a block split works for a single file too;
it lets neighbouring blocks of one document fall into both splits, which only makes ``val/loss`` a little
optimistic). The tokenizer of a backbone built from scratch is trained on all the documents. Blocks have no
padding. The corpus has no test split: ``test`` is the validation blocks.
"""

from __future__ import annotations

import glob
from pathlib import Path

import torch

from datamodules.loading.text import TextDataModule, read_text
from datamodules.loading.text_shards import CorpusBlocks, token_counts
from datamodules.sources.stdlib_docs import corpus_documents
from datamodules.sources.text_classification import TextClassificationDataModule
from lightning_modules.config.rules import check
from lightning_modules.core.errors import ConfigError


class TextCorpusDataModule(TextDataModule):
    name = "text_corpus"

    def __init__(
        self,
        paths: list[str] | None = None,
        path: str | None = None,
        document: str = "line",
        val_fraction: float = 0.05,
        split_seed: int = 0,
        shuffle_seed: int = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.paths = list(paths) if paths else None
        check("datamodule.path", path)
        if path is not None:
            if self.paths is not None:
                raise ConfigError(
                    f"datamodule.paths={self.paths}, datamodule.path={path}: give one, .txt files (paths) or prepared"
                    " text shards (path)"
                )
            if not self.is_shards(path):
                raise ConfigError(
                    f"datamodule.path={path}: allowed is a directory or URL of prepared text shards"
                    " (prepare_data.py text); .txt files go in datamodule.paths"
                )
            self.read_shards(path)
        self.document = check("datamodule.document", document)
        self.val_fraction = float(check("datamodule.val_fraction", val_fraction))
        self.split_seed, self.shuffle_seed = split_seed, shuffle_seed
        self._documents: list[str] | None = None
        self._task: TextClassificationDataModule | None = None  # the embedded corpus's labeled task, when asked for

    def labeled_examples(self, split: str, limit: int | None = None) -> tuple[dict, object] | None:
        """A corpus has no labels. The embedded one has a labeled task of its own: the standard library's docstrings
        labeled by package family (``datamodule=text_classification``'s embedded task), whose validation and test
        modules the corpus leaves out; the feature monitor classifies those, tokenized by the same tokenizer. A
        corpus of the user's files, or of prepared text shards, has none: None."""
        if self.paths is not None or self.shard_meta is not None:
            return None
        if self._task is None:
            task = TextClassificationDataModule(max_length=self.max_length, cache_dir=self.cache_dir)
            task.tokenizer = self._require_tokenizer()
            task.setup()
            self._task = task
        return self._task.labeled_examples(split, limit)

    def files(self) -> list[Path]:
        """The files ``paths`` names, in order, each once."""
        files: list[Path] = []
        for pattern in self.paths:
            if not isinstance(pattern, str) or not pattern.strip():
                raise ConfigError(f"datamodule.paths={self.paths!r}: allowed is a list of .txt files or globs")
            expanded = str(Path(pattern).expanduser())
            if Path(expanded).is_dir():
                raise ConfigError(f"datamodule.paths: {pattern} is a directory; name its files, e.g. {pattern}/*.txt")
            matches = sorted(Path(p) for p in glob.glob(expanded, recursive=True) if Path(p).is_file())
            if not matches:
                raise ConfigError(f"datamodule.paths: {pattern} matches no file")
            files += [m for m in matches if m not in files]
        return files

    def documents(self) -> list[str]:
        if self._documents is None:
            if self.paths is None:
                self._documents = corpus_documents(self.cache_dir)
            else:
                docs = []
                for path in self.files():
                    text = read_text(path, "datamodule.paths")
                    if self.document == "file":
                        docs.append(text.strip())
                    else:
                        docs += [line.strip() for line in text.splitlines() if line.strip()]
                self._documents = docs
        return self._documents

    def texts(self):
        if self.shard_meta is not None:  # read as the tokenizer trains, not held
            items = self.shard_items("train")
            return (items[i]["text"] for i in range(len(items)))
        return self.documents()

    def setup(self, stage: str | None = None) -> None:
        if self.splits or self.streamed:
            return
        if self.shard_meta is not None:
            return self._setup_shards()
        tokenizer = self._require_tokenizer()
        ids = tokenizer(self.documents(), verbose=False)["input_ids"]  # documents longer than a block are expected
        eos = tokenizer.eos_token_id if tokenizer.cls_token_id is None else None  # GPT-style: end each document
        flat = torch.tensor([t for doc in ids for t in (doc + [eos] if eos is not None else doc)], dtype=torch.long)
        n_blocks = len(flat) // self.max_length
        n_val = max(1, round(self.val_fraction * n_blocks))
        if n_blocks - n_val < 1:
            where = "the embedded corpus" if self.paths is None else f"datamodule.paths={self.paths}"
            raise ConfigError(
                f"{where}: {len(flat)} tokens make only {n_blocks} blocks of max_length={self.max_length};"
                " too few to hold out validation blocks"
            )
        blocks = flat[: n_blocks * self.max_length].view(n_blocks, self.max_length)
        order = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(self.split_seed))
        for split, rows in (("train", order[n_val:].sort().values), ("val", order[:n_val].sort().values)):
            self.splits[split] = {"input_ids": blocks[rows], "attention_mask": torch.ones_like(blocks[rows])}
            self.lengths[split] = torch.full((len(rows),), self.max_length)
        self.splits["test"], self.lengths["test"] = self.splits["val"], self.lengths["val"]
        self.check_batch_size(f"training blocks of {self.max_length} tokens")
        self.spec = self.make_spec()

    def _setup_shards(self) -> None:
        """Each split's documents counted in tokens (one pass), then read a block at a time by the workers."""
        tokenizer, self.streamed = self._require_tokenizer(), {}
        for split in ("train", "val", "test"):
            items = self.shard_items(split)
            blocks = CorpusBlocks(items, tokenizer, self.max_length, token_counts(items, tokenizer))
            if len(blocks) < 1:
                raise ConfigError(
                    f"datamodule.path={self.shard_path}: the {split} split's {int(blocks.starts[-1])} tokens make no"
                    f" block of max_length={self.max_length}"
                )
            self.streamed[split] = blocks
        self.check_batch_size(f"training blocks of {self.max_length} tokens")
        self.spec = self.make_spec()
