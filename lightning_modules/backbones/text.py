"""Text backbones from transformers (``TransformersBackbone``): a BERT-style encoder or a GPT-style decoder, built
from a transformers config (``model=bert_micro``, ``model=gpt_micro``: no download) or loaded with its tokenizer
from a Hugging Face model (``model.init=hf:<local dir or hub name>``, which builds this class whatever the preset).

- Reads ``batch["input_ids"]`` and ``batch["attention_mask"]`` (right-padded); ``forward`` pools the last
  hidden states (``model.pooling``: ``cls`` the first token, ``mean`` over the real tokens, ``last`` the last
  real token, the one a GPT-style decoder has read everything up to); ``tokens`` returns them all, for MLM/CLM.
- Layer groups: the embeddings, then each transformer layer. What follows the last layer (GPT-2's final
  ``ln_f``) belongs to the last group: every pooled feature passes through it, so a linear probe
  (``freeze.layers=all``) freezes it too, and ``freeze.layers=N < all`` trains it with the top layer. A
  pooler (BERT's dense+tanh on ``[CLS]``, trained by next-sentence prediction, which pretune does not do) is
  dropped: the objective's head is the only thing above the backbone.
- ``kind``: ``encoder`` (bidirectional: MLM, classification) or ``decoder`` (causal: CLM, classification).
- ``processor`` is the tokenizer; ``save_processor`` writes it and the transformers config (``config.json``)
  into ``backbone/``, and the spec records the tokenizer's hash, size and special ids, checked on load.
- Leaving pretune (``save_classifier``): a transformers model folder of ``PretuneForSequenceClassification``
  (``hf_classifier.py``, copied into the folder: the base model, pooled by the very function ``forward`` pools with,
  and the head), its tokenizer truncating at the data's ``max_length``, ``id2label``/``label2id``.

The architecture: from the model config's sizes (``model.layers``, ``hidden``, ``heads``, ``intermediate``,
``max_positions``, ``vocab_size``) when built here, and compared with a saved backbone's as for images; from
the Hugging Face config with ``hf:`` (the preset's sizes are then ignored), and from the saved ``config.json``
for a pretune backbone that was itself pre-trained from an ``hf:`` model.
"""

from __future__ import annotations

import copy
import shutil
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn

from lightning_modules.backbones import hf_classifier
from lightning_modules.backbones.base import Backbone, evaluating
from lightning_modules.backbones.handoff import read_backbone_config
from lightning_modules.backbones.hf_classifier import PretuneClassifierConfig, PretuneForSequenceClassification, pool
from lightning_modules.backbones.tokenizer import (
    KINDS,
    check_tokenizer,
    load_tokenizer,
    tokenizer_record,
    train_tokenizer,
)
from lightning_modules.config.rules import check
from lightning_modules.core.errors import ConfigError
from lightning_modules.core.locations import hf_local_dir, tokenizer_dir

MODELING_FILE = "modeling_pretune.py"  # hf_classifier.py, as a text model/ carries it (the config's auto_map)
AUTO_MAP = {
    "AutoConfig": "modeling_pretune.PretuneClassifierConfig",
    "AutoModelForSequenceClassification": "modeling_pretune.PretuneForSequenceClassification",
}


def hf_config(model_cfg: dict, tokenizer=None):
    """The transformers config of a backbone built from ``model``'s sizes (and the tokenizer's special ids)."""
    from transformers import AutoConfig

    name = model_cfg.get("name")
    if name not in TransformersBackbone.ARCH_KINDS:
        allowed = list(TransformersBackbone.ARCH_KINDS)
        raise ConfigError(f"model.name={name} is not a text architecture pretune builds: allowed are {allowed}")
    sizes = {k: check(f"model.{k}", model_cfg[k]) for k in ("layers", "hidden", "heads", "intermediate")}
    max_positions, vocab_size = check("model.max_positions", model_cfg["max_positions"]), model_cfg["vocab_size"]
    check("model.vocab_size", vocab_size)
    dropout = float(check("model.dropout", model_cfg.get("dropout", 0.1)))
    if sizes["hidden"] % sizes["heads"]:
        raise ConfigError(f"model.hidden={sizes['hidden']} is not divisible by model.heads={sizes['heads']}")
    ids = {}
    if tokenizer is not None:
        ids = {"pad_token_id": tokenizer.pad_token_id}
        if name == "gpt2":
            ids |= {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    if name == "bert":
        return AutoConfig.for_model(
            "bert",
            vocab_size=vocab_size,
            hidden_size=sizes["hidden"],
            num_hidden_layers=sizes["layers"],
            num_attention_heads=sizes["heads"],
            intermediate_size=sizes["intermediate"],
            max_position_embeddings=max_positions,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
            **ids,
        )
    return AutoConfig.for_model(
        "gpt2",
        vocab_size=vocab_size,
        n_embd=sizes["hidden"],
        n_layer=sizes["layers"],
        n_head=sizes["heads"],
        n_inner=sizes["intermediate"],
        n_positions=max_positions,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        **{"bos_token_id": None, "eos_token_id": None, **ids},  # GPT-2's defaults (50256) lie outside a small vocab
    )


def text_kind(config) -> str | None:
    """``encoder`` for a masked-LM architecture (BERT, RoBERTa, ...), ``decoder`` for a causal LM (GPT-2, ...)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "encoder"
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "decoder"
    return None


class TransformersBackbone(Backbone):
    """Wraps a transformers base model (``AutoModel``: ``BertModel``, ``GPT2Model``, ...) and its tokenizer."""

    modality = "text"
    type = "transformers"
    # model.name built from sizes -> its kind: a BERT-style encoder or a GPT-style decoder (the config check reads
    # it from this source, to refuse objective=mlm on gpt_micro before anything is built)
    ARCH_KINDS = {"bert": "encoder", "gpt2": "decoder"}

    def __init__(self, model: nn.Module, tokenizer, pooling: str = "cls", hf_source: str | None = None):
        super().__init__(model, model.config.hidden_size)
        check("model.pooling", pooling)
        if getattr(model, "pooler", None) is not None:
            model.pooler = None  # see the module docstring: nothing of it is used
        self.tokenizer, self.pooling, self.hf_source = tokenizer, pooling, hf_source
        self.kind = text_kind(model.config)
        self._layers = _layer_list(model)
        if self.kind is None or self._layers is None:
            raise ConfigError(
                f"{self.described}: a {type(model).__name__} is not supported; pretune's text backbone takes"
                " BERT-style encoders and GPT-style decoders"
            )
        if tokenizer.pad_token is None:  # GPT-2 has none: pad with its end-of-text token (masked out anyway)
            tokenizer.pad_token = tokenizer.eos_token

    # --- building ------------------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, model_cfg: dict, data=None, directory=None) -> TransformersBackbone:
        """With ``model.init=hf:...``: that model and its tokenizer. With ``directory`` (a ``backbone/`` whose
        weights the caller loads next): the architecture and its saved tokenizer. Else from the sizes, with a
        tokenizer trained on ``data.texts()`` (the datamodule's training texts), or the one ``model.tokenizer``
        names (a pre-training run, a ``backbone/`` dir or ``hf:<model>``: a scratch baseline on the vocabulary
        of the backbone it is compared with)."""
        from transformers import AutoConfig

        init, pooling = str(model_cfg.get("init", "none")), model_cfg.get("pooling", "cls")
        if init.startswith("hf:"):
            return cls.from_hf(init.removeprefix("hf:"), pooling)
        if directory is not None:
            meta = read_backbone_config(Path(directory))
            what = f"model.init={init}"
            tokenizer = load_tokenizer(directory, what)
            if meta.get("name") == "hf":  # pre-trained here from a Hugging Face model: its config came along
                config, hf_source = AutoConfig.from_pretrained(str(directory)), meta.get("source")
            else:
                config, hf_source = hf_config(model_cfg, tokenizer), None
            check_tokenizer(tokenizer, config.vocab_size, what, meta.get("tokenizer"))
            return cls(_from_config(config), tokenizer, pooling, hf_source)
        hf_config(model_cfg)  # every size checked before the tokenizer is trained
        name, vocab_size = model_cfg["name"], model_cfg["vocab_size"]
        shared = model_cfg.get("tokenizer")
        if shared:  # another backbone's tokenizer (a scratch run sharing the pre-trained vocabulary)
            tokenizer, source = load_tokenizer(tokenizer_dir(shared), f"model.tokenizer={shared}"), shared
        elif data is None or not hasattr(data, "texts"):
            raise ConfigError(
                f"model.name={model_cfg.get('name')} from scratch trains its tokenizer on the datamodule's texts;"
                " pass a text datamodule (or use model.init=<backbone dir> / hf:<model>, or model.tokenizer=)"
            )
        else:
            tokenizer = train_tokenizer(KINDS[name], data.texts(), vocab_size, model_cfg["max_positions"])
            source = "this data"
        if len(tokenizer) > vocab_size:
            raise ConfigError(
                f"model.vocab_size={vocab_size} is too small for {source}: its tokenizer needs {len(tokenizer)}"
                f" tokens; allowed is at least {len(tokenizer)}"
            )
        return cls(_from_config(hf_config(model_cfg, tokenizer)), tokenizer, pooling)

    @classmethod
    def from_hf(cls, source: str, pooling: str = "cls") -> TransformersBackbone:
        """A pre-trained Hugging Face model and its tokenizer: a local directory, or a hub name (downloaded
        when online; from the local cache when offline)."""
        from transformers import AutoModel

        what = f"model.init=hf:{source}"
        directory = hf_local_dir(source)  # a local dir checked to hold a model, or a hub name (refused offline)
        try:
            with _no_progress_bars():
                model = AutoModel.from_pretrained(directory)
        except (OSError, ValueError, KeyError) as err:  # no weights, unknown architecture, offline hub ...
            raise ConfigError(f"{what}: could not load it as a Hugging Face model ({_first_line(err)})") from err
        tokenizer = load_tokenizer(directory, what)
        check_tokenizer(tokenizer, model.config.vocab_size, what)
        return cls(model, tokenizer, pooling, hf_source=source)

    @staticmethod
    def spec_of(model_cfg: dict, saved: dict | None = None) -> dict:
        """The spec a model config asks for, to compare with a saved backbone's. A backbone pre-trained from a
        Hugging Face model carries its architecture (``config.json``): the model config's sizes do not apply."""
        if saved is not None and saved.get("name") == "hf":
            return {"type": "transformers", "name": "hf"}
        keys = ("layers", "hidden", "heads", "intermediate", "max_positions", "vocab_size")
        return {"type": "transformers", "name": model_cfg.get("name"), **{k: model_cfg.get(k) for k in keys}}

    @property
    def spec(self) -> dict:
        """For a backbone built here: its sizes. For one from a Hugging Face model: ``name: hf``, the source
        and the model type (the architecture itself travels as ``config.json``). Both: the tokenizer record."""
        config = self.model.config
        if self.hf_source is not None:
            spec = {"type": self.type, "name": "hf", "source": self.hf_source, "model_type": config.model_type}
        else:
            name = config.model_type
            spec = {
                "type": self.type,
                "name": name,
                "layers": config.num_hidden_layers,
                "hidden": config.hidden_size,
                "heads": config.num_attention_heads,
                "intermediate": config.intermediate_size if name == "bert" else config.n_inner,
                "max_positions": config.max_position_embeddings,
                "vocab_size": config.vocab_size,
            }
        return {**spec, "tokenizer": tokenizer_record(self.tokenizer)}

    @property
    def described(self) -> str:
        """How the user named this backbone, for messages: ``model.init=hf:...`` or ``model.name=...``."""
        return f"model.init=hf:{self.hf_source}" if self.hf_source else f"model.name={self.model.config.model_type}"

    # --- the contract --------------------------------------------------------------------------------------
    @property
    def processor(self):
        return self.tokenizer

    @property
    def max_positions(self) -> int:
        """The longest input the backbone takes (its position embeddings)."""
        return int(self.model.config.max_position_embeddings)

    def save_processor(self, directory: Path, preprocessing: dict | None = None) -> None:
        """The tokenizer (``tokenizer.json`` ...) and the transformers config (``config.json``)."""
        self.tokenizer.save_pretrained(str(directory))
        self.model.config.save_pretrained(str(directory))

    def save_classifier(self, head: nn.Linear, directory: Path, labels: list[str], preprocessing: dict) -> None:
        """``save_pretrained`` of the classifier (``config.json`` with ``auto_map`` and the labels,
        ``model.safetensors``), the tokenizer (truncating at ``max_length``, right-padding, giving only the ids and
        the mask the model reads) and ``modeling_pretune.py``."""
        directory = Path(directory)
        with _no_progress_bars():
            self.classifier(head, labels, preprocessing).save_pretrained(str(directory))
        tokenizer = copy.deepcopy(self.tokenizer)  # the run's own stays as it is
        tokenizer.model_max_length, tokenizer.padding_side = int(preprocessing["max_length"]), "right"
        tokenizer.model_input_names = ["input_ids", "attention_mask"]
        tokenizer.save_pretrained(str(directory))
        shutil.copyfile(hf_classifier.__file__, directory / MODELING_FILE)

    def classifier(self, head: nn.Linear, labels: list[str], preprocessing: dict) -> PretuneForSequenceClassification:
        """The transformers classifier holding this backbone's weights and ``head``'s, checked on the class names
        (as texts) to give what ``head`` on this backbone gives."""
        config = PretuneClassifierConfig(
            encoder=self.model.config.to_dict(),
            pooling=self.pooling,
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
        )
        config.auto_map, config.architectures = dict(AUTO_MAP), [PretuneForSequenceClassification.__name__]
        with _no_init():  # every weight is loaded next: drawing random ones first costs seconds for MiniLM
            model = PretuneForSequenceClassification(config).eval()
        model.backbone.load_state_dict(self.model.state_dict(), strict=True)
        model.classifier.load_state_dict(head.state_dict())
        enc = self.tokenizer(list(labels)[:8], truncation=True, max_length=int(preprocessing["max_length"]))
        batch = self.tokenizer.pad({k: enc[k] for k in ("input_ids", "attention_mask")}, return_tensors="pt")
        device = next(self.model.parameters()).device
        with torch.no_grad(), evaluating(self), evaluating(head):
            expected, got = head(self({k: v.to(device) for k, v in batch.items()})).cpu(), model(**batch).logits
        if not torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
            raise ConfigError(
                f"{self.described}: the transformers classifier does not reproduce pretune's logits (max |difference|"
                f" {float((got - expected).abs().max()):.2e}), so model/ is not written"
            )
        return model

    @classmethod
    def load_classifier(cls, directory: Path) -> nn.Module:
        """The classifier and its tokenizer (pretune's own copy of the class: no remote code to trust)."""
        from transformers import AutoTokenizer

        with _no_progress_bars():
            model = PretuneForSequenceClassification.from_pretrained(str(directory)).eval()
        return TextClassifier(model, AutoTokenizer.from_pretrained(str(directory), config=model.config))

    def tokens(self, batch: dict) -> torch.Tensor:
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state

    def forward(self, batch: dict) -> torch.Tensor:
        return pool(self.tokens(batch), batch["attention_mask"], self.pooling)  # the exported classifier's pooling

    def grouped_parameter_names(self) -> list[tuple[str | None, list[str]]]:
        layers_path, layers = self._layers
        index = {id(p): i for i, layer in enumerate(layers) for p in layer.parameters()}
        groups: list[list[str]] = [[] for _ in range(len(layers) + 1)]
        seen_layer = False
        for name, param in self.model.named_parameters():
            if id(param) in index:
                groups[index[id(param)] + 1].append(name)
                seen_layer = True
            else:  # before the layers: the embeddings; after them (a final norm): with the last layer
                groups[-1 if seen_layer else 0].append(name)
        return [("embeddings", groups[0])] + [(None, names) for names in groups[1:]]


class TextClassifier(nn.Module):
    """A text classifier read back from ``model/``: ``input_ids`` and ``attention_mask`` to logits; ``processor`` is
    its tokenizer."""

    def __init__(self, model: nn.Module, tokenizer):
        super().__init__()
        self.model, self.processor = model, tokenizer

    def forward(self, batch: dict) -> torch.Tensor:
        return self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _layer_list(model: nn.Module):
    """(path, ModuleList) of the model's transformer layers: the ModuleList with one entry per hidden layer."""
    n = getattr(model.config, "num_hidden_layers", None)
    for path, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return path, module
    return None


@contextmanager
def _no_progress_bars():
    """transformers' progress bars off inside (a bar per weight file: no news in a run's log), as they were after."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _no_init():
    """transformers' own switch for building a model whose weights are loaded right after (none: build as usual)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # another transformers layout
        return nullcontext()
    return no_init_weights()


def _from_config(config):
    from transformers import AutoModel

    return AutoModel.from_config(config)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"
