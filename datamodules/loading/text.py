"""What the text DataModules share: texts in, token ids out, through the backbone's own tokenizer.

The order of a run (``runtime/run.py``) is the reason for the shape of this class: the datamodule is built
first and reads its raw texts (``texts()``: a backbone built from scratch trains its tokenizer on them); the
backbone comes next and hands its tokenizer over (``use_backbone``); ``setup`` then tokenizes every split once
and keeps it in memory as padded id tensors.

Batches are padded per *global* batch: the loader (``PaddedBatchLoader``, a ``BatchLoader`` with its seeding
and rank slicing) cuts every batch to the longest example of the global batch before each rank takes its
slice, so a batch of B per rank on W ranks holds exactly the tensors a batch of W*B holds on one process, and
no batch carries the padding of the longest text in the data.

**From prepared shards** (``datamodule.path``: a directory or URL that ``scripts/prepare_data.py text`` wrote) the
texts are not held: ``setup`` makes each split a dataset of tokenized examples (``loading/text_shards.py``) that
DataLoader workers read in the same seeded order of global batches, each rank its slice, a resumed epoch skipping
the batches already trained (``streaming.IndexedLoader``); each rank cuts its share of a batch to its own longest
text (an encoder's outputs do not depend on the padding; the blocks of a corpus have none).
"""

from __future__ import annotations

from pathlib import Path

import torch

from datamodules.base import PretuneDataModule
from datamodules.loading.decision import Loading
from datamodules.loading.in_memory import BatchLoader, as_stored, at_most
from datamodules.loading.shard_reading import ShardItems, is_url, read_meta
from datamodules.loading.streaming import BadSamples, IndexedLoader, OpenLoaders, training_options, worker_options
from datamodules.loading.text_shards import cut_to_longest
from datamodules.spec import TextSpec
from datamodules.transforms.text import tokenize
from lightning_modules.backbones.base import FEATURES
from lightning_modules.config.rules import check
from lightning_modules.config.rules.datamodule import longer_than_positions
from lightning_modules.core.errors import ConfigError


def read_text(path: Path, key: str) -> str:
    """A file's text as UTF-8, refused with one line naming ``key`` and the file when it cannot be."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError(f"{key}: cannot read {path} ({err.strerror or err})") from err
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{key}: {path} is not UTF-8 text (byte 0x{data[err.start]:02x} at position {err.start})"
        ) from err
    if not text.strip():
        raise ConfigError(f"{key}: {path} is empty")
    return text


class PaddedBatchLoader(BatchLoader):
    """A ``BatchLoader`` whose right-padded ``(N, max_length)`` token tensors (``input_ids``, ``attention_mask``)
    are cut, batch by batch, to the longest example (``lengths``) of the global batch; other entries (labels,
    images next to captions) pass as they are."""

    TOKEN_KEYS = ("input_ids", "attention_mask")

    def __init__(self, tensors: dict[str, torch.Tensor], lengths: torch.Tensor, *args, **kwargs):
        super().__init__(tensors, *args, **kwargs)
        self.lengths = lengths

    def take(self, idx: torch.Tensor, global_idx: torch.Tensor) -> dict:
        width = int(self.lengths[global_idx].max())
        return {k: v[idx, :width] if k in self.TOKEN_KEYS else v[idx] for k, v in self.tensors.items()}


class TextDataModule(PretuneDataModule):
    """Base of the text sources. A subclass reads its texts (``texts()`` for the tokenizer, ``setup``) and
    fills ``self.splits`` with ``encode``'s tensors; the loaders, the spec and the checks are shared."""

    modality = "text"

    def __init__(
        self,
        batch_size: int = 32,
        eval_batch_size: int = 256,
        max_length: int = 64,
        train_batches_per_epoch: int | None = None,
        labeled: bool = True,
        cache_dir: str | None = None,
        num_workers: int | None = None,
    ):
        super().__init__()
        self.batch_size = check("datamodule.batch_size", batch_size)
        self.eval_batch_size = check("datamodule.eval_batch_size", eval_batch_size)
        self.max_length = check("datamodule.max_length", max_length)
        self.train_batches_per_epoch = check("datamodule.train_batches_per_epoch", train_batches_per_epoch)
        self.labeled, self.cache_dir = labeled, cache_dir
        self.tokenizer = None
        self.splits: dict[str, dict[str, torch.Tensor]] = {}
        self.lengths: dict[str, torch.Tensor] = {}
        self.spec: TextSpec | None = None
        # From prepared shards: pretune.json, the path taken, and each split as a dataset of tokenized examples.
        self.num_workers = check("datamodule.num_workers", num_workers)
        self.shard_meta: dict | None = None
        self.loading: Loading | None = None
        self.streamed: dict | None = None
        self.open_loaders = OpenLoaders()

    # --- what a subclass provides --------------------------------------------------------------------------
    def texts(self) -> list[str]:
        """The training texts, raw: what a tokenizer trained from scratch learns its vocabulary from."""
        raise NotImplementedError

    # --- from prepared shards ------------------------------------------------------------------------------
    @staticmethod
    def is_shards(path: str | None) -> bool:
        """Whether ``datamodule.path`` names prepared shards (a directory or a URL) rather than a file."""
        return path is not None and (is_url(str(path)) or Path(str(path)).expanduser().is_dir())

    def read_shards(self, path: str) -> dict:
        """``pretune.json`` of text shards, checked (one line for anything else), and the path this run takes."""
        self.shard_path = str(path).rstrip("/")
        self.shard_meta = read_meta(self.shard_path, self.cache_dir, "text", self.name)
        sizes = self.shard_meta["splits"]
        self.loading = Loading(
            "stream",
            f"datamodule={self.name} path={path}: streamed from prepared text shards by DataLoader workers"
            f" ({sum(sizes.values()):,} texts: {sizes})",
        )
        return self.shard_meta

    def describe(self) -> dict:
        return {"loading": self.loading.path} if self.loading is not None else {}

    def shard_items(self, split: str) -> ShardItems:
        return ShardItems(f"{self.shard_path}/{split}", self.shard_meta["splits"][split], self.cache_dir)

    def _shard_loader(self, split: str, batch_size: int, train: bool, sharded: bool = True) -> IndexedLoader:
        options = dict(worker_options(self, self.num_workers, sharded), collate_fn=cut_to_longest)
        options.update(training_options(self, self.shuffle_seed) if train else {})
        bad = BadSamples("error", f"datamodule.path={self.shard_path}")  # texts always decode: nothing to screen
        return self.open_loaders.add(IndexedLoader(self.streamed[split], batch_size, train, train, bad, **options))

    def teardown(self, stage: str) -> None:
        self.open_loaders.close()  # the workers end with the fit (or test), not when the collector gets to them

    # --- shared --------------------------------------------------------------------------------------------
    def use_backbone(self, backbone) -> None:
        """Take the backbone's tokenizer; its position embeddings bound ``max_length``."""
        tokenizer = getattr(backbone, "processor", None)
        if tokenizer is None:
            raise ConfigError(f"datamodule {type(self).__name__} needs a text backbone with a tokenizer")
        limit = getattr(backbone, "max_positions", None)
        if limit is not None and self.max_length > limit:
            raise ConfigError(longer_than_positions(self.max_length, limit))
        self.tokenizer = tokenizer

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise RuntimeError("use_backbone(backbone) must come before setup(): the tokenizer is the backbone's")
        return self.tokenizer

    def encode(self, texts: list[str]) -> tuple[dict[str, torch.Tensor], torch.Tensor, int]:
        """``tokenize`` with the backbone's tokenizer and ``max_length``."""
        return tokenize(self._require_tokenizer(), texts, self.max_length)

    def eval_preprocessing(self) -> dict:
        """The backbone's tokenizer (it travels with the weights), truncating at ``max_length`` tokens."""
        return {"modality": "text", "max_length": int(self.max_length)}

    def make_spec(self, class_names: tuple[str, ...] = ()) -> TextSpec:
        tokenizer = self._require_tokenizer()
        return TextSpec(
            vocab_size=len(tokenizer),
            max_length=self.max_length,
            pad_id=int(tokenizer.pad_token_id),
            num_classes=len(class_names),
            class_names=tuple(class_names),
            tokenizer=tokenizer,
        )

    def check_batch_size(self, what: str) -> None:
        n_train = len(self.streamed["train"]) if self.streamed is not None else len(self.lengths["train"])
        if self.batch_size > n_train:
            raise ConfigError(
                f"datamodule.batch_size={self.batch_size} is larger than the {n_train} {what}; allowed is at most"
                f" {n_train}"
            )

    def train_dataloader(self):
        if self.streamed is not None:
            return self._shard_loader("train", self.batch_size, train=True)
        return PaddedBatchLoader(
            self.splits["train"],
            self.lengths["train"],
            self.batch_size,
            shuffle=True,
            drop_last=True,
            seed=self.shuffle_seed,
            epoch_fn=self.epoch,
            num_batches=self.train_batches_per_epoch,
            skip_fn=self.batches_trained,
            **self.shard(),
        )

    shuffle_seed = 0  # the training order's seed (a labeled source: its label_seed, which follows seed)

    def eval_loader(self, split: str, batch_size: int | None = None, sharded: bool = True):
        """A split in order; ``sharded=False``: all of it on this process (e.g. the forgetting probe)."""
        shard = self.shard() if sharded else {}
        size = batch_size or self.eval_batch_size
        if self.streamed is not None:
            return self._shard_loader(split, size, train=False, sharded=sharded)
        return PaddedBatchLoader(self.splits[split], self.lengths[split], size, False, False, **shard)

    def val_dataloader(self):
        return self.eval_loader("val")

    def test_dataloader(self):
        return self.eval_loader("test")

    def labeled_examples(self, split: str, limit: int | None = None) -> tuple[dict, object] | None:
        """The ``split``'s token ids with their labels (at most ``limit``: a stratified subset seeded by
        ``split_seed``), as the model reads them; None for a split without labels. For the feature monitor
        (callbacks/feature_monitor.py)."""
        tensors = self.splits.get(split) or {}
        if "label" not in tensors:
            return None
        tensors = {k: tensors[k] for k in ("input_ids", "attention_mask", "label")}
        return at_most(tensors, limit, getattr(self, "split_seed", 0)), as_stored

    def can_cache_features(self) -> bool:
        # Nothing random reaches the backbone in a text batch (MLM's masks are the objective's); streamed texts are
        # not held, so there is nothing to keep features next to.
        return self.streamed is None

    def cache_features(self, encode) -> None:
        """Store each example's features next to it (``features``): ``encode(split, identity, batches)`` returns
        them for the split's batches in order (callbacks/feature_cache.py); every batch then carries them."""
        done = []
        for name, tensors in self.splits.items():
            if any(tensors is d for d in done):  # the corpus's test split is its validation split: one pass
                continue
            done.append(tensors)
            batches = PaddedBatchLoader(dict(tensors), self.lengths[name], self.eval_batch_size, False, False)
            tensors[FEATURES] = encode(name, [tensors["input_ids"]], batches)  # in place: loaders made already see it
