"""Parameter-efficient fine-tuning (``freeze=lora``): Hugging Face ``peft``'s LoRA, DoRA or IA³ adapters put into
a backbone's library model, the backbone itself frozen; and the two ways they leave pretune.

peft wraps timm and transformers modules alike (``Linear``, ``Conv2d``, transformers' ``Conv1D``): its
``get_peft_model`` replaces each target module in place by a layer holding the original one (``<path>.base_layer``)
and the adapter's tensors (``<path>.lora_A.default`` ...), so ``backbone.model`` keeps its identity and its module
paths, and the layer groups (timm's ``group_matcher``, a transformer's layers) find the adapters in the group of the
module they adapt: layer-wise LR decay and ``freeze.layers`` count them as they count the weights. The ``PeftModel``
peft returns is kept beside the backbone, out of its modules (``backbone.__dict__``), so state dicts and checkpoints
hold the backbone's names, not peft's ``base_model.model.`` prefix.

Which modules receive adapters is resolved here to exact module paths (then handed to peft as a list): the family's
defaults (``auto``: the attention projections of a ViT or a BERT/GPT-style encoder, the 1×1 and 3×3 convolutions of
a CNN, each tower of a dual encoder by its own family), ``attention``, ``all`` (every layer peft can wrap), a list of
module names (a name matches a module path that is it or ends with ``.<name>``, peft's rule) or a regex (matched
against the whole path, peft's rule) — and only in the layer groups above the first ``freeze.layers``.

Leaving pretune: ``merged(backbone)`` is a copy with the adapters folded into the weights (peft's
``merge_and_unload``): a plain backbone, which ``model/`` is written from and which loads with no peft installed.
``save_adapter`` writes ``adapter/`` in peft's own format (``adapter_config.json``, ``adapter_model.safetensors``)
relative to the family's classifier (what ``model/`` holds), with the task head as a ``modules_to_save`` module, so
``PeftModel.from_pretrained(<that classifier with the pre-trained weights>, "model/adapter")`` gives the fine-tune's
logits.
"""

from __future__ import annotations

import copy
import re
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

from torch import nn

from lightning_modules.core.errors import ConfigError
from lightning_modules.core.extras import require

LORA_DEFAULTS = {"rank": 8, "alpha": None, "dropout": 0.0, "use_rslora": False}  # alpha None: 2 x rank
ADAPTER_DIR = "adapter"  # inside model/
PEFT_MODELS = "_peft_models"  # backbone.__dict__ key: tower name -> the PeftModel wrapping its library model


@contextmanager
def _quiet_deprecation():
    """peft reads ``model.is_gradient_checkpointing``, which transformers deprecates with a FutureWarning on every
    wrap: one library's deprecation of the other's call, nothing a user can act on (it filled the study's console)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def require_peft():
    require("freeze=lora", "peft")  # one line naming pip install "pretune[lora]" (make install installs it)
    import peft

    return peft


def _is_attention(path: str) -> bool:
    return any(part in ("attn", "attention", "self_attn") or "attention" in part for part in path.split(".")[:-1])


def wrappable(model: nn.Module) -> dict[str, nn.Module]:
    """The modules of ``model`` peft's LoRA, DoRA and IA³ can each wrap, by path: linear layers, transformers'
    ``Conv1D`` (GPT-2's projections), and convolutions without groups (a depthwise conv has no low-rank update)."""
    out = {}
    for path, module in model.named_modules():
        conv = isinstance(module, nn.Conv2d) and module.groups == 1
        if isinstance(module, nn.Linear) or conv or type(module).__name__ == "Conv1D":
            out[path] = module
    return out


def _default(path: str, module: nn.Module, convolutional: bool) -> bool:
    if convolutional:  # a CNN: its 1x1 and 3x3 convolutions (the stem's 7x7 and the classifier left alone)
        return isinstance(module, nn.Conv2d) and module.kernel_size in ((1, 1), (3, 3))
    return _is_attention(path)  # a ViT or a BERT/GPT-style encoder: the attention projections


def _matches(targets, path: str, module: nn.Module, convolutional: bool) -> bool:
    if targets == "auto":
        return _default(path, module, convolutional)
    if targets == "attention":
        return _is_attention(path)
    if targets == "all":
        return True
    if isinstance(targets, str):  # a regex, matched against the whole path (peft's rule for a string)
        return re.fullmatch(targets, path) is not None
    return any(path == name or path.endswith(f".{name}") for name in targets)  # peft's rule for a list


def shortened(paths: list[str], limit: int = 12) -> str:
    """Module paths with their indices folded (``blocks.*.attn.qkv``), at most ``limit`` of them."""
    folded = list(dict.fromkeys(re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.)", "*", p) for p in paths))
    more = f", ... ({len(folded) - limit} more)" if len(folded) > limit else ""
    return ", ".join(folded[:limit]) + more


def _width(module: nn.Module) -> int:
    """The largest rank an update of ``module``'s weight can have."""
    if isinstance(module, nn.Conv2d):
        k = module.kernel_size[0] * module.kernel_size[1]
        return min(module.out_channels, module.in_channels * k)
    if isinstance(module, nn.Linear):
        return min(module.in_features, module.out_features)
    return min(module.weight.shape)  # transformers' Conv1D


def target_paths(tower, targets, skipped_groups: int, rank: int | None, what: str = "the backbone") -> list[str]:
    """The module paths of ``tower.model`` that receive adapters: those ``targets`` names, in the layer groups above
    the first ``skipped_groups``; checked to be some, and (``rank``) each at least ``rank`` wide."""
    model = tower.model
    candidates = wrappable(model)
    if not candidates:
        raise ConfigError(
            f"freeze=lora: {what} ({type(tower).__name__}, {type(model).__name__}) has no module peft can wrap"
            " (linear layers, ungrouped Conv2d, Conv1D); allowed are backbones built of those"
        )
    convolutional = sum(isinstance(m, nn.Conv2d) for m in model.modules()) > 1  # a ViT's only conv is its patches
    groups = tower.grouped_parameter_names()
    group_of = {name: i for i, (_, names) in enumerate(groups) for name in names}
    chosen = []
    for path, module in candidates.items():
        group = group_of.get(f"{path}.weight" if path else "weight")
        if group is not None and group >= skipped_groups and _matches(targets, path, module, convolutional):
            chosen.append(path)
    if not chosen:
        above = f" in the layer groups above the first {skipped_groups}" if skipped_groups else ""
        raise ConfigError(
            f"freeze.targets={_show(targets)} matches no module of {what}{above}; modules peft can wrap there:"
            f" {shortened([p for p in candidates if group_of.get(f'{p}.weight', -1) >= skipped_groups]) or 'none'}"
        )
    if rank is not None:
        narrowest = min(chosen, key=lambda p: _width(candidates[p]))
        if rank > _width(candidates[narrowest]):
            raise ConfigError(
                f"freeze.rank={rank} is above the width of {what}'s module {narrowest}"
                f" ({_width(candidates[narrowest])}); allowed is freeze.rank <= {_width(candidates[narrowest])}, or"
                " freeze.targets without it"
            )
    return chosen


def _show(targets) -> str:
    return targets if isinstance(targets, str) else "[" + ",".join(str(t) for t in targets) + "]"


def peft_config(method: str, targets: list[str], rank, alpha, dropout, use_rslora, **extra):
    """peft's config for ``method`` on the exact module paths ``targets``."""
    peft = require_peft()
    if method == "ia3":  # every target scales its output (no feed-forward module scales its input)
        return peft.IA3Config(target_modules=list(targets), feedforward_modules=[], **extra)
    rank = LORA_DEFAULTS["rank"] if rank is None else int(rank)
    return peft.LoraConfig(
        r=rank,
        lora_alpha=2 * rank if alpha is None else alpha,
        lora_dropout=float(dropout or 0.0),
        use_rslora=bool(use_rslora),
        use_dora=method == "dora",
        target_modules=list(targets),
        **extra,
    )


def add_adapters(backbone, settings: dict, skipped: dict[str, int]) -> dict[str, list[str]]:
    """Put adapters into each tower of ``backbone`` (one piece: the tower ``""``) whose ``skipped[tower]`` groups
    do not hold all of it; returns the adapted module paths by tower. The backbone's parameters are frozen by peft
    (``requires_grad=False``), the adapters' trainable."""
    peft = require_peft()
    towers = backbone.towers() or {"": backbone}
    groups = backbone.tower_groups()
    adapted, models = {}, {}
    for name, tower in towers.items():
        if skipped[name] >= len(groups[name]):  # a tower wholly frozen (freeze.text=all): no adapters there
            continue
        what = f"the {name} tower" if name else "the backbone"
        rank = None if settings["method"] == "ia3" else settings.get("rank") or LORA_DEFAULTS["rank"]
        paths = target_paths(tower, settings["targets"], skipped[name], rank, what)
        config = peft_config(settings["method"], paths, **{k: settings.get(k) for k in LORA_DEFAULTS})
        try:
            with _quiet_deprecation():
                models[name] = peft.get_peft_model(tower.model, config)
        except (ValueError, TypeError, NotImplementedError) as err:  # peft refusing a module or an option
            raise ConfigError(f"freeze.method={settings['method']} on {what}: peft refused it ({_first(err)})") from err
        adapted[name] = paths
    backbone.__dict__[PEFT_MODELS] = models
    trained = adapter_ids(backbone)
    for p in backbone.parameters():  # a wholly frozen tower, too
        p.requires_grad = id(p) in trained
    return adapted


def _first(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


def peft_models(backbone) -> dict:
    return backbone.__dict__.get(PEFT_MODELS) or {}


def has_adapters(backbone) -> bool:
    return bool(peft_models(backbone))


def adapter_ids(backbone) -> set[int]:
    """The ids of the adapters' tensors (what a run with adapters trains in the backbone)."""
    ids = set()
    for model in peft_models(backbone).values():
        prefix = model.base_model.prefix  # "lora_", "ia3_"
        ids |= {id(p) for n, p in model.base_model.model.named_parameters() if prefix in n}
    return ids


def _copy_with(backbone, merge: bool):
    """A copy of ``backbone`` without adapters: folded into its weights (``merge``), or dropped (the pre-trained
    backbone, as frozen)."""
    out = copy.deepcopy(backbone)  # the PeftModels beside it are copied with it, wrapping the copy's modules
    for model in peft_models(out).values():
        model.merge_and_unload() if merge else model.unload()
    out.__dict__.pop(PEFT_MODELS, None)
    return out


def merged(backbone):
    """A plain backbone equal to ``backbone`` with its adapters: each adapted weight ``W + scale * B @ A`` (peft's
    ``merge_and_unload``), loadable and runnable without peft."""
    return _copy_with(backbone, merge=True)


def unadapted(backbone):
    """The backbone as it was before adapters were added: its frozen, pre-trained weights alone."""
    return _copy_with(backbone, merge=False)


def save_adapter(backbone, head: nn.Linear, directory: Path, labels, preprocessing: dict, base_name: str) -> Path:
    """``directory/adapter/`` in peft's format, on the family's classifier (as ``model/`` holds it) with the
    pre-trained weights: the adapters, and the head (``modules_to_save``). ``base_name``: what the adapters were
    trained on (peft's ``base_model_name_or_path``)."""
    peft = require_peft()
    trained = peft_models(backbone)
    if list(trained) != [""]:
        raise ConfigError("adapter/ is written for a backbone of one piece (a dual encoder has no classifier)")
    base = unadapted(backbone)
    with tempfile.TemporaryDirectory() as tmp:  # the classifier as its family writes and reads it
        base.save_classifier(head, Path(tmp), list(labels), preprocessing)
        classifier = type(backbone).load_classifier(Path(tmp)).model
    prefix = _prefix_of(base.model, classifier)
    head_path = _head_path(classifier, head)
    settings = trained[""].peft_config["default"]
    config = copy.deepcopy(settings)
    config.target_modules = {prefix + t for t in settings.target_modules}
    config.modules_to_save = [head_path]
    config.base_model_name_or_path = None  # (peft fills it in from the model, then warns when it differs)
    with _quiet_deprecation():
        model = peft.get_peft_model(classifier, config)  # the classifier's modules, adapted in place
    model.peft_config["default"].base_model_name_or_path = base_name
    tuner = trained[""].base_model
    state = {f"{prefix}{n}": p for n, p in tuner.model.named_parameters() if tuner.prefix in n}
    unexpected = classifier.load_state_dict(state, strict=False).unexpected_keys
    if unexpected:
        raise ConfigError(
            f"adapter/: the classifier has no place for {len(unexpected)} adapter tensors ({unexpected[0]})"
        )
    out = Path(directory) / ADAPTER_DIR
    with warnings.catch_warnings():  # peft looking for a transformers config.json the base (timm's) has none of
        warnings.simplefilter("ignore")
        model.save_pretrained(str(out))
    return out


def _prefix_of(model: nn.Module, classifier: nn.Module) -> str:
    """Where the backbone's library model sits inside its family's classifier (``""`` for timm's,
    ``backbone.`` for pretune's transformers classifier)."""
    names = list(model.state_dict())
    for path, module in classifier.named_modules():
        inside = module.state_dict()
        if all(n in inside for n in names):
            return f"{path}." if path else ""
    raise ConfigError(f"adapter/: {type(classifier).__name__} does not hold the backbone's modules by their names")


def _head_path(classifier: nn.Module, head: nn.Linear) -> str:
    for path, module in classifier.named_modules():
        if isinstance(module, nn.Linear) and module.weight.shape == head.weight.shape:
            if (module.weight.detach().cpu() == head.weight.detach().cpu()).all():
                return path
    raise ConfigError(f"adapter/: no linear layer of {type(classifier).__name__} holds the head")


def load_adapter(base: nn.Module, directory: Path):
    """``PeftModel.from_pretrained(base, directory)``, a mismatch (another base: names or shapes) in one line."""
    peft = require_peft()
    try:
        with _quiet_deprecation():
            return peft.PeftModel.from_pretrained(base, str(directory)).eval()
    except (RuntimeError, ValueError, KeyError) as err:
        config = Path(directory) / "adapter_config.json"
        raise ConfigError(
            f"{directory}: the adapter does not fit this base model ({_first(err)}); it was trained on the base named"
            f" in {config.name}"
        ) from err
