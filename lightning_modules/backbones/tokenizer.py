"""Tokenizers for text backbones built from scratch, and the checks that keep a tokenizer with its backbone.

A backbone pre-trained from scratch trains its tokenizer on the run's training texts with the ``tokenizers``
library: WordPiece for a BERT-style encoder (lowercased, ``[CLS] text [SEP]``, a ``[MASK]`` token for MLM),
byte-level BPE for a GPT-style decoder (GPT-2's scheme: no unknown characters, ``<|endoftext|>`` between
documents, a ``<pad>`` token). It is wrapped as a transformers fast tokenizer, so the datamodules and MLM's
collator use the one API whether the tokenizer was trained here or came with a Hugging Face model.

Training must give the same tokenizer in every process (each DDP rank, and a resumed run, trains its own):
byte-level BPE does; WordPiece's trainer creates its within-word tokens (``##e``) in hash-map order and breaks
ties between merges by token id, so those tokens are handed to it in a fixed order, and the vocabulary is
numbered by name afterwards (special tokens first). No character limit is set: the trainer's ``limit_alphabet``
drops characters among equally rare ones in hash-map order too.

The hand-off saves the tokenizer into ``backbone/`` (``tokenizer.json`` + ``tokenizer_config.json``) and
records ``tokenizer_record``: a hash of the tokenizer's content, the vocabulary size and the special ids; a
fine-tune loading that directory refuses a tokenizer that is not the one recorded, or that does not fit the
backbone.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from lightning_modules.core.errors import ConfigError

TOKENIZER_FILE = "tokenizer.json"
# The special tokens of each kind, in the order they get the first ids; the transformers names they fill.
SPECIALS = {
    "wordpiece": {
        "pad_token": "[PAD]",
        "unk_token": "[UNK]",
        "cls_token": "[CLS]",
        "sep_token": "[SEP]",
        "mask_token": "[MASK]",
    },
    "bpe": {"eos_token": "<|endoftext|>", "pad_token": "<pad>"},
}
KINDS = {"bert": "wordpiece", "gpt2": "bpe"}  # model.name -> the tokenizer it trains


def train_tokens(kind: str, texts: Iterable[str], vocab_size: int):
    """A ``tokenizers.Tokenizer`` of ``kind`` trained on ``texts``; the same one in every process."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    texts = list(texts)
    specials = list(SPECIALS[kind].values())
    if kind == "wordpiece":
        normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
        # The trainer creates a "##c" token (c inside a word) when it first meets it, in hash-map order, and
        # breaks ties between equally frequent merges by token id: the vocabulary would differ from process to
        # process (tokenizers #1794). Given in a fixed order up front, those ids, and so the merges, are fixed.
        inside = sorted(c for c in set(normalizer.normalize_str("\n".join(texts))) if _inside_a_word(c))
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size, special_tokens=specials + [f"##{c}" for c in inside], show_progress=False
        )
        trained = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        trained.normalizer, trained.pre_tokenizer = normalizer, pre_tokenizer
        trained.train_from_iterator(texts, trainer)
        vocab = trained.get_vocab()
        order = specials + sorted(t for t in vocab if t not in specials)  # numbered by name: no hash order left
        tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(order)}, unk_token="[UNK]"))
        tok.add_special_tokens(specials)
        tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, pre_tokenizer, decoders.WordPiece()
        cls, sep = order.index("[CLS]"), order.index("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
        )
    elif kind == "bpe":  # no per-word prefix: every initial token is a byte, numbered in order
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer)
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}: allowed are {sorted(SPECIALS)}")
    return tok


def _inside_a_word(c: str) -> bool:
    """Whether BERT's pre-tokenizer can leave ``c`` inside a word: not whitespace, not punctuation (ASCII
    punctuation, or a Unicode punctuation category), not a CJK ideograph (each is a word of its own)."""
    import unicodedata

    if c.isspace() or (c.isascii() and not c.isalnum() and c.isprintable()):
        return False
    return not unicodedata.category(c).startswith("P") and not 0x4E00 <= ord(c) <= 0x9FFF


def train_tokenizer(kind: str, texts: Iterable[str], vocab_size: int, max_length: int):
    """``train_tokens`` wrapped as a transformers fast tokenizer (``model_max_length=max_length``)."""
    from transformers import PreTrainedTokenizerFast

    specials = dict(SPECIALS[kind])
    if kind == "bpe":  # GPT-2's convention: one token begins, ends and stands for the unknown
        specials |= {"bos_token": specials["eos_token"], "unk_token": specials["eos_token"]}
    return PreTrainedTokenizerFast(
        tokenizer_object=train_tokens(kind, texts, vocab_size), model_max_length=max_length, **specials
    )


def special_ids(tokenizer) -> dict[str, int]:
    """The tokenizer's special tokens by role (``pad``, ``cls``, ``mask``, ...), as ids."""
    out = {}
    for role in ("pad", "unk", "cls", "sep", "mask", "bos", "eos"):
        token_id = getattr(tokenizer, f"{role}_token_id", None)
        if token_id is not None:
            out[role] = int(token_id)
    return out


def tokenizer_sha256(tokenizer) -> str:
    """A hash of what the tokenizer does (its vocabulary, merges, normalizer, ... as ``tokenizers`` serialises
    them), not of a file: the truncation and padding a call last set are left out."""
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    state["truncation"] = state["padding"] = None
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()


def tokenizer_record(tokenizer) -> dict:
    """What ``backbone/config.yaml`` records about the backbone's tokenizer, to check the one loaded with it."""
    return {"sha256": tokenizer_sha256(tokenizer), "vocab_size": len(tokenizer), "special_ids": special_ids(tokenizer)}


def load_tokenizer(directory: Path, what: str):
    """The tokenizer saved in ``directory`` (a ``backbone/`` or a Hugging Face model dir); ``what`` names the
    source in the error (e.g. ``model.init=<dir>``)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError, TypeError) as err:
        raise ConfigError(f"{what}: no usable tokenizer in {directory} ({_first_line(err)})") from err


def check_tokenizer(tokenizer, vocab_rows: int, what: str, recorded: dict | None = None) -> None:
    """Refuse a tokenizer that does not belong to its backbone: ids past the embedding rows, or (when
    ``recorded``, from config.yaml) another tokenizer or other special ids than the backbone was trained with."""
    problems = []
    if recorded:
        if recorded.get("sha256") and tokenizer_sha256(tokenizer) != recorded["sha256"]:
            problems.append(f"{TOKENIZER_FILE} is not the tokenizer it was trained with (sha256 differs)")
        if recorded.get("vocab_size") not in (None, len(tokenizer)):
            problems.append(f"vocabulary {len(tokenizer)} vs {recorded['vocab_size']} recorded")
        if recorded.get("special_ids") not in (None, special_ids(tokenizer)):
            problems.append(f"special ids {special_ids(tokenizer)} vs {recorded['special_ids']} recorded")
    if len(tokenizer) > vocab_rows:
        problems.append(f"vocabulary of {len(tokenizer)} tokens but the backbone embeds {vocab_rows}")
    if problems:
        raise ConfigError(f"{what}: the tokenizer does not match its backbone ({'; '.join(problems)})")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"
