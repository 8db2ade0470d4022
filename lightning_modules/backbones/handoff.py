"""Weight hand-off: export a backbone as ``backbone/`` (safetensors + config.yaml), load it back.

A backbone made of towers (a dual encoder) also exports each tower as a backbone of its own, in a folder named
after it (``backbone/image``, ``backbone/text``): a fine-tune loads one tower like any other backbone.

Nothing here unpickles: weights travel as safetensors, the architecture as YAML.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import yaml

from lightning_modules.backbones.artifacts import fetch_backbone
from lightning_modules.core.errors import ConfigError
from lightning_modules.core.locations import (
    CONFIG,
    WEIGHTS,
    find_backbone_dir,
    hf_local_dir,
    is_file_init,
    weight_file_path,
)

FORMAT = "pretune-backbone/1"
OBJECTIVE_WEIGHTS = "objective.safetensors"  # the pre-training heads, to measure forgetting later


def read_backbone_config(backbone_dir: Path) -> dict:
    try:
        meta = yaml.safe_load((backbone_dir / CONFIG).read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"model.init={backbone_dir}: {CONFIG} is not valid YAML ({err})") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "name" not in meta:
        raise ConfigError(f"model.init={backbone_dir}: {CONFIG} is not a pretune backbone config ({FORMAT})")
    return meta


def atomic_dir(target: Path):
    """A temp dir next to ``target``; the caller fills it, then ``os.replace`` makes it appear whole."""
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def export_backbone(
    backbone,
    target: Path,
    provenance: dict | None = None,
    objective=None,
    objective_cfg: dict | None = None,
    files: dict | None = None,
    preprocessing: dict | None = None,
    weights: str | None = None,
) -> Path:
    """Write ``target/`` = model.safetensors + config.yaml (+ the objective's heads and config when
    given; + each tower as a backbone of its own in ``target/<tower>``; + ``files``, name -> JSON content: what the
    data left for later, e.g. the pairs' captions), atomically: a killed export leaves no half-written ``backbone/``.
    ``preprocessing``: what the data's evaluation gave the backbone (``eval_preprocessing()``), recorded in
    config.yaml and in the family's own config (timm's ``config.json``). ``weights``: what the weights are, when
    there is a choice (a teacher–student objective's student or teacher), recorded in config.yaml."""
    from safetensors.torch import save_model

    target = Path(target)
    tmp = atomic_dir(target)
    try:
        save_model(backbone.model, str(tmp / WEIGHTS))
        backbone.save_processor(tmp, preprocessing)  # a tokenizer travels with the weights it was trained for
        for name, content in (files or {}).items():
            (tmp / name).write_text(json.dumps(content, indent=1) + "\n")
        if objective is not None:
            save_model(objective, str(tmp / OBJECTIVE_WEIGHTS))
        towers = backbone.towers()
        for name, tower in towers.items():  # each tower a backbone of its own, next to the whole
            export_backbone(tower, tmp / name, {**(provenance or {}), "tower": name}, preprocessing=preprocessing)
        features = backbone.num_features
        meta = {
            "format": FORMAT,
            **backbone.spec,
            "num_features": {k: int(v) for k, v in features.items()} if isinstance(features, dict) else int(features),
            "layer_groups": [g.name for g in backbone.layer_groups()],
            "sha256": sha256_of(tmp / WEIGHTS),
            "provenance": provenance or {},
            "objective": objective_cfg,
            "preprocessing": preprocessing,
            **({"weights": weights} if weights else {}),
            **({"towers": list(towers)} if towers else {}),
        }
        (tmp / CONFIG).write_text(yaml.safe_dump(meta, sort_keys=False))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def spec_differences(saved: dict, wanted: dict) -> list[str]:
    """How a saved backbone's spec differs from the one the model config asks for, key by key (nested
    arguments as ``kwargs.depth``); only the keys of a spec count, not the rest of ``config.yaml``."""
    saved = {"type": "timm", **saved}  # backbones exported before there were other types
    if saved.get("type") != wanted.get("type") or saved.get("name") != wanted.get("name"):
        key = "type" if saved.get("type") != wanted.get("type") else "name"
        return [f"{key}: {saved.get(key)} (saved) vs {wanted.get(key)} (model)"]
    nested = [k for k, v in wanted.items() if isinstance(v, dict) and "type" in v]  # towers: compared as specs
    differences = [f"{k}.{d}" for k in nested for d in spec_differences(saved.get(k) or {}, wanted[k])]
    wanted = {k: v for k, v in wanted.items() if k not in nested}
    flat_saved, flat_wanted = _flatten({k: saved.get(k) for k in wanted}), _flatten(wanted)
    return differences + [
        f"{key}: {flat_saved.get(key)} (saved) vs {flat_wanted.get(key)} (model)"
        for key in sorted(set(flat_saved) | set(flat_wanted))
        if flat_saved.get(key) != flat_wanted.get(key)
    ]


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def load_backbone_weights(backbone, backbone_dir: Path) -> None:
    """Load safetensors weights into ``backbone``, refusing any missing/unexpected/misshaped tensor."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = backbone_dir / WEIGHTS
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ConfigError(f"model.init={backbone_dir}: {WEIGHTS} is corrupt or truncated ({err})") from err
    differences = state_differences(backbone.model.state_dict(), state)
    if differences:
        raise ConfigError(f"model.init={backbone_dir}: weights do not fit the model ({differences})")
    backbone.model.load_state_dict(state, strict=True)


def state_differences(own: dict, saved: dict) -> str:
    """Why ``saved`` tensors do not fit a model's ``own`` state dict ('' when they do): missing and
    unexpected keys, and misshaped tensors, a few of each."""
    missing = sorted(set(own) - set(saved))
    unexpected = sorted(set(saved) - set(own))
    misshaped = [
        f"{k} {tuple(saved[k].shape)} vs {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(saved))
        if saved[k].shape != own[k].shape
    ]
    return "; ".join(
        f"{label}: {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}"
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", misshaped))
        if items
    )


def resolve_init(init: str) -> dict | None:
    """Where ``model.init``'s weights come from, as a run records it in its run record (``run.json``: ``weights``):
    the backbone dir (or the weight file of ``file:<path>``), the sha256 of its weights, and the W&B artifact
    when it was fetched from one. ``none`` and ``timm`` have no local source."""
    if init in ("none", "timm"):
        return None
    if is_file_init(init):
        path = weight_file_path(init)
        return {"path": str(path.resolve()), "sha256": sha256_of(path), "file": True}
    if init.startswith("hf:"):
        return _hf_source(init.removeprefix("hf:"))
    source = {}
    if init.startswith("wandb:"):
        backbone_dir = find_backbone_dir(str(fetch_backbone(init)))
        source["artifact"] = init.removeprefix("wandb:")
    else:
        backbone_dir = find_backbone_dir(init)
        logged_as = provenance_of(backbone_dir).get("wandb_artifact")  # its pre-training logged it to W&B as ...
        source |= {"logged_as": logged_as} if logged_as else {}
    return {"path": str(backbone_dir.resolve()), "sha256": sha256_of(backbone_dir / WEIGHTS), **source}


def provenance_of(backbone_dir: Path) -> dict:
    """Where a saved backbone came from (its ``config.yaml``'s ``provenance``); {} when unreadable (the load says
    why, with the key)."""
    try:
        provenance = (yaml.safe_load((backbone_dir / CONFIG).read_text()) or {}).get("provenance")
    except (OSError, yaml.YAMLError, AttributeError):
        return {}
    return provenance if isinstance(provenance, dict) else {}


def _hf_source(name: str) -> dict:
    """A Hugging Face model's source: ``hf`` (the local dir, or the hub name) and, for a local dir, the
    sha256 of its weights file."""
    where = hf_local_dir(name)
    if not Path(where).is_dir():
        return {"hf": where}
    weights = [Path(where) / f for f in ("model.safetensors", "pytorch_model.bin") if (Path(where) / f).is_file()]
    return {"hf": str(Path(where).resolve()), **({"sha256": sha256_of(weights[0])} if weights else {})}
