"""Weights from a local file into a timm backbone: ``model.init=file:<path>``.

A paper's release, a colleague's ``.pth``, an older Lightning checkpoint, weights shipped in a Python package:
their keys rarely carry timm's names. They are matched in this order:

1. the rename rules of ``model.init_map``, applied to every key in turn: ``{strip: <prefix>}`` removes a prefix
   where present, ``{drop: <regex>}`` removes matching tensors (said so), ``{regex: <regex>, replace: <text>}``
   is ``re.sub``; or, only when asked (``model.init_map=positional``), the file's tensors in their order against
   the model's own (with the classifier the weights were trained with), every shape checked;
2. timm's own checkpoint filter for the model (``checkpoint_filter_fn`` in its module), as ``pretrained=True``
   applies it: it converts the names of the original releases timm knows and adapts shapes (a ViT's position
   embedding to another image size). It runs after the rules, because it recognises timm's names and those
   releases' names, which is what the rules map a file's names to;
3. the first convolution adapted to the model's input channels (timm's ``adapt_input_conv``: summed over RGB for
   one channel, as timm does for ``pretrained=True, in_chans=1``).

Then loading is strict: every tensor the model has must be there with its shape, and nothing else, or one error
lists what is missing, unexpected and misshaped. The classifier head of the weights (keys the model would have
with the weights' own classes) is dropped on purpose, and said so: the objective brings its own head.

Nothing is unpickled that could run code: ``.safetensors`` files hold only tensors, anything else loads with
``torch.load(weights_only=True)``, which refuses a pickle that would build any object beyond tensors and plain
containers. ``config/check.py`` checks the form and that the file exists before torch is imported; nothing
here imports torch at module level.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

from lightning_modules.backbones.handoff import state_differences
from lightning_modules.config.rules.model import check_init_map
from lightning_modules.core.errors import ConfigError


def read_state_dict(path: Path, init: str) -> dict:
    """The tensors of a weight file by name: a safetensors file, a state dict, or a checkpoint holding one
    (Lightning's ``state_dict``, timm's ``state_dict_ema``/``model_ema`` first as timm does, ``model``);
    DDP/compile prefixes (``module.``, ``_orig_mod.``) removed as timm removes them."""
    import pickle

    import torch
    from timm.models import clean_state_dict

    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise ConfigError(f"model.init={init}: not a readable safetensors file ({err})") from err
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ConfigError(
            f"model.init={init}: refused, the file is a pickle that would build objects beyond tensors (it could run"
            f" code): {str(err).splitlines()[0][:160]}; save its state_dict with safetensors or torch.save(state_dict)"
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise ConfigError(f"model.init={init}: not a readable torch file ({type(err).__name__}: {err})") from err
    state = checkpoint
    if isinstance(checkpoint, dict):
        for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
            if isinstance(checkpoint.get(key), dict):
                state = checkpoint[key]
                break
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise ConfigError(f"model.init={init}: holds no state dict (a mapping of names to tensors)")
    return clean_state_dict(dict(state))


def apply_rules(state: dict, rules: list[dict]) -> tuple[dict, list[str]]:
    """``state`` with every key renamed by the rules in turn; the keys a ``drop`` rule removed."""
    out, dropped = {}, []
    for key, value in state.items():
        new = key
        for rule in rules:
            if "strip" in rule:
                new = new.removeprefix(rule["strip"])
            elif "drop" in rule:
                if re.search(rule["drop"], new):
                    new = None
                    break
            else:
                new = re.sub(rule["regex"], rule["replace"], new)
        if new is None:
            dropped.append(key)
        elif new in out:
            raise ConfigError(f"model.init_map maps two tensors of the file to {new}; make the rules tell them apart")
        else:
            out[new] = value
    return out, dropped


def positional(state: dict, reference: dict, init: str, own: dict | None = None) -> dict:
    """The file's tensors renamed, in order, to the names of ``reference`` (the model with the weights' classifier)
    or, for a file without a classifier, of the model's ``own``; refused unless every shape matches (a first conv
    for the model's own input channels is taken as it is)."""
    own = own or {}
    if len(state) != len(reference):
        if len(state) != len(own):
            raise ConfigError(
                f"model.init={init} with model.init_map=positional: the file has {len(state)} tensors, the model"
                f" {len(reference)} with its classifier ({len(own)} without); positional mapping needs the same"
                " tensors in the same order"
            )
        reference = own
    misshaped = [
        f"#{i} {theirs} {tuple(a.shape)} vs {ours} {tuple(b.shape)}"
        for i, ((theirs, a), (ours, b)) in enumerate(zip(state.items(), reference.items(), strict=True))
        if a.shape != b.shape and (ours not in own or a.shape != own[ours].shape)
    ]
    if misshaped:
        raise ConfigError(
            f"model.init={init} with model.init_map=positional: {len(misshaped)} tensors differ in shape from the"
            f" model's at the same position ({'; '.join(misshaped[:5])}{' ...' if len(misshaped) > 5 else ''})"
        )
    return dict(zip(reference, state.values(), strict=True))


def _reference_state(name: str, kwargs: dict, pretrained_cfg: dict) -> dict:
    """The state dict (shapes only, on the meta device) of the model the weights were trained as: the same
    architecture with the weights' own classifier and input channels."""
    import timm
    import torch

    channels = (pretrained_cfg.get("input_size") or (3,))[0]
    classes = pretrained_cfg.get("num_classes") or 1000
    with torch.device("meta"):
        model = timm.create_model(name, **{**kwargs, "num_classes": classes, "in_chans": channels})
    return model.state_dict()


def _timm_filter(name: str):
    """timm's checkpoint filter for ``name`` (the ``checkpoint_filter_fn`` of its module), or None."""
    from timm.models import get_arch_name
    from timm.models._registry import _model_to_module

    module = _model_to_module.get(get_arch_name(name))
    if module is None:
        return None
    return getattr(importlib.import_module(f"timm.models.{module}"), "checkpoint_filter_fn", None)


def load_weight_file(backbone, path: Path, init_map, init: str) -> list[str]:
    """Load the file at ``path`` into ``backbone.model`` (a timm model built with ``num_classes=0``), matching
    keys as the module docstring says. Returns notes on what was done on purpose (head dropped, first conv
    adapted, tensors dropped by a rule); raises a ConfigError listing every tensor that does not fit."""
    rules = check_init_map(init_map)
    model = backbone.model
    own = model.state_dict()
    reference = _reference_state(backbone.name, backbone.kwargs, model.pretrained_cfg or {})
    state = read_state_dict(path, init)
    notes = []
    if rules == "positional":
        if path.suffix == ".safetensors":
            raise ConfigError(
                f"model.init={init} with model.init_map=positional: a safetensors file does not keep its tensors'"
                " order (it sorts them by name); map names with rules instead"
            )
        state = positional(state, reference, init, own)
    elif rules:
        state, dropped = apply_rules(state, rules)
        if dropped:
            notes.append(f"dropped by model.init_map: {_listing(dropped)}")
    filter_fn = _timm_filter(backbone.name)
    if filter_fn is not None:
        try:
            state = filter_fn(state, model)
        except Exception as err:  # a filter written for timm's and the original releases' names
            raise ConfigError(
                f"model.init={init}: timm's checkpoint filter for {backbone.name} failed on these weights"
                f" ({type(err).__name__}: {err}); map the file's names to timm's with model.init_map"
            ) from err
    notes += _adapt_first_conv(state, model, own)
    head = [k for k in state if k in reference and k not in own]
    dropped_head = {key: state.pop(key) for key in head}
    if head:
        notes.append(f"classifier head dropped on purpose ({', '.join(head)}): the objective brings its own")
    # Kept aside (not in the model): the forgetting probe measures how fine-tuning changes its predictions.
    backbone.pretrained_head = _linear_head(dropped_head, reference, backbone.num_features)
    # BatchNorm's step counter carries no learned value; files written by other frameworks often lack it.
    for key in own:
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = own[key]
    differences = state_differences(own, state)
    if differences:
        raise ConfigError(f"model.init={init}: the weights do not fit model.name={backbone.name} ({differences})")
    model.load_state_dict(state, strict=True)
    return notes


def _linear_head(tensors: dict, reference: dict, num_features: int):
    """The weights' classifier as ``(weight, bias)`` of a linear layer on the pooled features, when it is one
    (else None). Plain tensors: an ``nn.Module`` attribute would join the backbone's parameters."""
    weights = [k for k in tensors if k.endswith(".weight")]
    if len(weights) != 1 or len(tensors) != 2:
        return None
    weight = tensors[weights[0]]
    bias = tensors.get(weights[0].removesuffix("weight") + "bias")
    if (
        bias is None
        or weight.ndim != 2
        or weight.shape[1] != num_features
        or reference[weights[0]].shape != weight.shape
    ):
        return None
    return weight.float(), bias.float()


def _adapt_first_conv(state: dict, model, own: dict) -> list[str]:
    """The first conv's weights summed/repeated to the model's input channels, as timm's pretrained loading does."""
    from timm.models import adapt_input_conv

    first = (model.pretrained_cfg or {}).get("first_conv")
    notes = []
    for conv in [first] if isinstance(first, str) else first or []:
        key = f"{conv}.weight"
        if key in state and key in own and state[key].ndim == 4 and state[key].shape[1] != own[key].shape[1]:
            channels = own[key].shape[1]
            before = state[key].shape[1]
            try:
                state[key] = adapt_input_conv(channels, state[key], base_chans=before)
            except (NotImplementedError, AssertionError, ValueError):
                continue  # left misshaped: the strict check lists it
            notes.append(f"{key} adapted from {before} to {channels} input channels (timm's adapt_input_conv)")
    return notes


def _listing(keys: list[str]) -> str:
    return f"{len(keys)} tensors ({', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''})"
