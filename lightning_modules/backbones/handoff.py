"""Weight hand-off: export a backbone as ``backbone/`` (safetensors + config.yaml), load it back.

A backbone made of towers (a dual encoder) also exports each tower as a backbone of its own, in a folder named
after it (``backbone/image``, ``backbone/text``): a fine-tune loads one tower like any other backbone.

Nothing here unpickles: weights travel as safetensors, the architecture as YAML.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import yaml

from lightning_modules.backbones.weight_files import is_file_init, weight_file_path
from lightning_modules.config.errors import ConfigError

FORMAT = "pretune-backbone/1"
WEIGHTS, CONFIG = "model.safetensors", "config.yaml"
OBJECTIVE_WEIGHTS = "objective.safetensors"  # the pre-training heads, to measure forgetting later


def find_backbone_dir(init: str) -> Path:
    """Resolve ``model.init`` (a pre-training run dir or a backbone dir) to the backbone folder."""
    path = Path(init).expanduser()
    for candidate in (path, path / "backbone"):
        if (candidate / CONFIG).is_file() and (candidate / WEIGHTS).is_file():
            return candidate
    if not path.exists():
        raise ConfigError(
            f"model.init={init}: no such path; allowed: none, timm, a pre-training run dir, a backbone/ dir"
            ", file:<weight file> or hf:<Hugging Face model>"
        )
    raise ConfigError(f"model.init={init}: found no backbone/ with {WEIGHTS} and {CONFIG} there")


def read_backbone_config(backbone_dir: Path) -> dict:
    try:
        meta = yaml.safe_load((backbone_dir / CONFIG).read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"model.init={backbone_dir}: {CONFIG} is not valid YAML ({err})") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "name" not in meta:
        raise ConfigError(f"model.init={backbone_dir}: {CONFIG} is not a pretune backbone config ({FORMAT})")
    return meta


def _atomic_dir(target: Path):
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
    backbone, target: Path, provenance: dict | None = None, objective=None, objective_cfg: dict | None = None
) -> Path:
    """Write ``target/`` = model.safetensors + config.yaml (+ the objective's heads and config when
    given; + each tower as a backbone of its own in ``target/<tower>``), atomically: a killed export leaves
    no half-written ``backbone/``."""
    from safetensors.torch import save_model

    target = Path(target)
    tmp = _atomic_dir(target)
    try:
        save_model(backbone.model, str(tmp / WEIGHTS))
        backbone.save_processor(tmp)  # a tokenizer travels with the weights it was trained for
        if objective is not None:
            save_model(objective, str(tmp / OBJECTIVE_WEIGHTS))
        towers = backbone.towers()
        for name, tower in towers.items():  # each tower a backbone of its own, next to the whole
            export_backbone(tower, tmp / name, provenance={**(provenance or {}), "tower": name})
        features = backbone.num_features
        meta = {
            "format": FORMAT,
            **backbone.spec,
            "num_features": {k: int(v) for k, v in features.items()} if isinstance(features, dict) else int(features),
            "layer_groups": [g.name for g in backbone.layer_groups()],
            "sha256": sha256_of(tmp / WEIGHTS),
            "provenance": provenance or {},
            "objective": objective_cfg,
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


def saved_objective(source: dict | None, backbone, data):
    """The pre-training objective saved next to a backbone (its config in ``config.yaml``, its heads in
    ``objective.safetensors``), rebuilt on ``backbone`` and ``data`` with those weights; None when ``source`` (a
    resolved ``model.init``) is not a pretune pre-training run that saved one."""
    from safetensors.torch import load_file

    from lightning_modules.objectives.base import build_objective

    backbone_dir = Path(source["path"]) if source and "path" in source else None  # not hf:, a model of its own
    meta = read_backbone_config(backbone_dir) if backbone_dir else {}
    if not meta.get("objective") or not (backbone_dir / OBJECTIVE_WEIGHTS).is_file():
        return None
    objective = build_objective(meta["objective"], backbone, data)
    objective.load_state_dict(load_file(str(backbone_dir / OBJECTIVE_WEIGHTS)), strict=True)
    return objective


def resolve_init(init: str) -> dict | None:
    """Where ``model.init``'s weights come from, as a run records it in its config (``model.source``):
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
        from lightning_modules.runtime.wandb_runs import fetch_backbone

        backbone_dir = find_backbone_dir(str(fetch_backbone(init)))
        source["artifact"] = init.removeprefix("wandb:")
    else:
        backbone_dir = find_backbone_dir(init)
    return {"path": str(backbone_dir.resolve()), "sha256": sha256_of(backbone_dir / WEIGHTS), **source}


def _hf_source(name: str) -> dict:
    """A Hugging Face model's source: ``hf`` (the local dir, or the hub name) and, for a local dir, the
    sha256 of its weights file."""
    from lightning_modules.config.modalities import hf_local_dir

    where = hf_local_dir(name)
    if not Path(where).is_dir():
        return {"hf": where}
    weights = [Path(where) / f for f in ("model.safetensors", "pytorch_model.bin") if (Path(where) / f).is_file()]
    return {"hf": str(Path(where).resolve()), **({"sha256": sha256_of(weights[0])} if weights else {})}


def backbone_class(type_: str):
    """The Backbone class ``model.type`` names (imported only when used)."""
    import importlib

    from lightning_modules.config.modalities import BACKBONE_TYPES

    if type_ not in BACKBONE_TYPES:
        raise ConfigError(f"model.type={type_} is unknown: allowed are {sorted(BACKBONE_TYPES)}")
    module, name = BACKBONE_TYPES[type_][0].rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def build_backbone(model_cfg: dict, data=None):
    """Build the backbone ``model`` describes and initialise it as ``model.init`` says (from
    ``model.source`` when the run already resolved it). ``data``: the datamodule, for a backbone that
    needs something from it to be built (a text backbone trains its tokenizer on its texts)."""
    from lightning_modules.config.modalities import backbone_type

    cls = backbone_class(backbone_type(model_cfg))
    init = str(model_cfg.get("init", "none"))
    if init == "none" or init.startswith("hf:"):  # from scratch, or a Hugging Face model (the class loads it)
        return cls.from_config(model_cfg, data)
    if init == "timm":
        name = model_cfg["name"]
        try:
            return cls.from_config(model_cfg, data)
        except ConfigError:
            raise
        except Exception as err:  # timm/hub raise many types when offline or the weights don't exist
            raise ConfigError(
                f"model.init=timm: could not load timm's pretrained weights for model.name={name}"
                f" ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''});"
                " timm downloads them from the Hugging Face Hub, so this needs internet and a model"
                " name with published weights"
            ) from err
    source = model_cfg.get("source") or resolve_init(init)
    if is_file_init(init):
        return _from_weight_file(cls, model_cfg, data, init, Path(source["path"]))
    backbone_dir = Path(source["path"])
    saved = read_backbone_config(backbone_dir)
    if saved.get("sha256") not in (None, source["sha256"]):
        raise ConfigError(
            f"model.init={init}: {WEIGHTS} is corrupt or truncated (its sha256 is not the one {CONFIG} recorded)"
        )
    wanted = cls.spec_of(model_cfg, saved)
    diffs = spec_differences(saved, wanted)
    if diffs:
        hint = "use the model config it was pre-trained with"
        towers = [t for t in saved.get("towers") or [] if (saved.get(t) or {}).get("type") == wanted.get("type")]
        if towers and wanted.get("type") != saved.get("type"):  # one of its towers is what this model can take
            hint = f"its {' and '.join(towers)} tower is a backbone of its own: model.init={backbone_dir / towers[0]}"
        raise ConfigError(
            f"model.init={init}: the backbone's architecture does not match the model config ("
            + "; ".join(diffs)
            + f"); {hint}"
        )
    backbone = cls.from_config(model_cfg, data, directory=backbone_dir)
    load_backbone_weights(backbone, backbone_dir)
    return backbone


def _from_weight_file(cls, model_cfg: dict, data, init: str, path: Path):
    """``model.init=file:<path>``: the configured backbone with the file's weights (backbones/weight_files.py)."""
    if not hasattr(cls, "load_weight_file"):
        raise ConfigError(f"model.init={init}: a weight file loads into model.type=timm, not {cls.type}")
    backbone = cls.from_config(model_cfg, data)
    notes = backbone.load_weight_file(path, model_cfg.get("init_map"), init)
    from pytorch_lightning.utilities import rank_zero_info

    for note in notes:
        rank_zero_info(f"model.init={init}: {note}")
    return backbone
