"""A fine-tune's ``model/``: the whole network (backbone and head) in its family's own format, with the class names
in label order and the preprocessing it was evaluated with; written when the run ends, read back by
``scripts/predict.py`` and ``scripts/export.py``, and loaded by timm or transformers without pretune.

``model/`` holds what the backbone's family writes (``Backbone.save_classifier``: timm's Hugging Face Hub layout, a
transformers model folder), and next to it ``pretune.json`` (what pretune reads it back with: the backbone class,
the modality, the labels, the preprocessing, where it came from and what it scored) and ``README.md`` (a model card
with Hugging Face's metadata header, what it was trained on, its metrics and how to load it). Written atomically, as
``backbone/`` is: a killed run leaves no half-written ``model/``.

``write_model`` is the one writer: a run that trains something else around the backbone (adapters merged into it,
...) calls it with its own network.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
from pathlib import Path

from lightning_modules.backbones.base import Backbone
from lightning_modules.backbones.handoff import atomic_dir, sha256_of
from lightning_modules.core.errors import ConfigError
from lightning_modules.core.locations import WEIGHTS

FORMAT = "pretune-model/1"
META = "pretune.json"
CARD = "README.md"
MODEL_DIR = "model"  # in a fine-tune's run dir
LIBRARIES = {"image": ("timm", "image-classification"), "text": ("transformers", "text-classification")}


def write_model(
    backbone, head, target: Path, labels, preprocessing: dict, about: dict | None = None, extra=None
) -> Path:
    """Write ``target/``: ``backbone`` with ``head`` (an ``nn.Linear`` on its pooled features) as its family's own
    classifier, the class names ``labels`` in label order, the evaluation ``preprocessing`` (a datamodule's
    ``eval_preprocessing()``), and ``about`` (where it came from, what it scored) in ``pretune.json`` and the card.
    ``extra(directory)``: writes more into the folder before it appears (e.g. an ``adapter/`` next to the merged
    weights)."""
    target = Path(target)
    tmp = atomic_dir(target)
    try:
        backbone.save_classifier(head, tmp, list(labels), preprocessing)
        if extra is not None:
            extra(tmp)
        meta = {
            "format": FORMAT,
            "backbone_class": f"{type(backbone).__module__}.{type(backbone).__qualname__}",
            "modality": backbone.modality,
            "labels": [str(label) for label in labels],
            "preprocessing": preprocessing,
            "backbone": backbone.spec,
            **(about or {}),
        }
        if (tmp / WEIGHTS).is_file():
            meta["sha256"] = sha256_of(tmp / WEIGHTS)
        (tmp / META).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        (tmp / CARD).write_text(model_card(meta, target.name))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def find_model_dir(path, what: str) -> Path:
    """``path`` as a ``model/`` folder: the folder itself, or a fine-tune run's ``model/``; ``what`` names the key in
    the error (``run_dir=<path>``)."""
    path = Path(path).expanduser()
    for candidate in (path, path / MODEL_DIR):
        if (candidate / META).is_file():
            return candidate
    raise ConfigError(f"{what}: no model/ there ({_why_none(path)})")


def _why_none(path: Path) -> str:
    """What ``path`` is instead of a fine-tune with a ``model/`` (its metrics.json and config.yaml say)."""
    if not path.exists():
        return "no such path"
    try:
        metrics = json.loads((path / "metrics.json").read_text())
    except (OSError, ValueError):
        metrics = None
    if metrics is None:
        return "not a run dir (no metrics.json) nor a model/ folder (no pretune.json)"
    if metrics.get("stage") != "finetune":
        return f"it is a {metrics.get('stage')} run, not a fine-tune; a fine-tune writes model/ when it ends"
    if metrics.get("status") != "ok":
        return f"the fine-tune failed: {metrics.get('error', '?')}"
    return metrics.get("model/skipped") or "the fine-tune wrote none (finetune.export_model=false, or an older run)"


def read_meta(directory: Path) -> dict:
    try:
        meta = json.loads((Path(directory) / META).read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{directory}: {META} is unreadable ({err})") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ConfigError(f"{directory}: {META} is not a pretune model ({FORMAT})")
    return meta


def read_model(directory: Path):
    """The classifier in ``model/`` (a module from a batch dict to logits, with its ``processor``) and its
    ``pretune.json``, read back by the family that wrote it."""
    meta = read_meta(directory)
    written_by = str(meta.get("backbone_class", ""))
    module, _, name = written_by.rpartition(".")
    try:
        family = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"{directory}: written by {written_by}, which is not importable here") from err
    if not (isinstance(family, type) and issubclass(family, Backbone)):
        raise ConfigError(f"{directory}: {written_by} is not a pretune backbone")
    return family.load_classifier(Path(directory)), meta


def push_to_hub(directory: Path, repo: str) -> str:
    """Upload ``model/`` (its card included) to the Hugging Face Hub repository ``repo`` (made if missing); its URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo, exist_ok=True)
    api.upload_folder(folder_path=str(directory), repo_id=repo, commit_message="pretune fine-tune")
    return f"https://huggingface.co/{repo}"


# --- the model card ----------------------------------------------------------------------------------------------
USAGE = {
    "timm": """```python
import timm, torch
from PIL import Image

model = timm.create_model("local-dir:{dir}", pretrained=True).eval()  # or "hf-hub:<repo>" once pushed
config = timm.data.resolve_data_config(model=model)  # the size, crop, mean and std it was evaluated with
transform = timm.data.create_transform(**config)
image = Image.open("photo.png").convert("{mode}")
with torch.no_grad():
    probabilities = model(transform(image).unsqueeze(0)).softmax(-1)
print(model.pretrained_cfg["label_names"][int(probabilities.argmax())])
```""",
    "transformers": """```python
from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

# trust_remote_code: the model class is modeling_pretune.py in this folder (pretune's pooling and head)
classify = pipeline("text-classification", model="{dir}", trust_remote_code=True)
print(classify("some text", truncation=True))
model = AutoModelForSequenceClassification.from_pretrained("{dir}", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("{dir}", trust_remote_code=True)
logits = model(**tokenizer(["some text"], truncation=True, padding=True, return_tensors="pt")).logits
```""",
}


def model_card(meta: dict, dir_name: str = MODEL_DIR) -> str:
    """A Hugging Face model card: the metadata header the Hub reads (library, task, tags), then what the model is,
    what it was trained on, its metrics, the pre-training it came from and how to load it."""
    library, task = LIBRARIES.get(meta["modality"], ("", ""))
    labels, pre = meta["labels"], meta.get("preprocessing") or {}
    data = meta.get("data") or {}
    lines = ["---", f"library_name: {library}", f"pipeline_tag: {task}", "tags:", "- pretune", f"- {task}", "---", ""]
    lines += [f"# {meta.get('name') or dir_name}", ""]
    lines += [
        f"{'An' if meta['modality'][0] in 'aeiou' else 'A'} {meta['modality']} classifier ({len(labels)} classes)"
        " fine-tuned with pretune: the backbone"
        f" `{_described(meta.get('backbone') or {})}` with a linear head on its pooled features.",
        "",
        f"**Labels**, in order: {', '.join(f'`{label}`' for label in labels)}.",
        "",
    ]
    if data:
        lines += ["## Data", "", *[f"- {k}: `{v}`" for k, v in data.items()], ""]
    if pre:
        lines += ["**Preprocessing** (what evaluation gave the model): " + _preprocessing(pre), ""]
    metrics = meta.get("metrics") or {}
    if metrics:
        lines += ["## Metrics", "", "| metric | value |", "|---|---:|"]
        lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
        lines += [""]
    lines += ["## Pre-training", "", _pretraining(meta.get("pretrained"), meta.get("pretraining")), ""]
    usage = USAGE.get(library)
    if usage:
        mode = "L" if pre.get("channels") == 1 else "RGB"
        lines += ["## Use", "", usage.replace("{dir}", dir_name).replace("{mode}", mode), ""]
    lines += [f"Written by pretune (`{FORMAT}`); `{META}` records the run it came from.", ""]
    return "\n".join(lines)


def _described(spec: dict) -> str:
    if spec.get("type") == "timm":
        return f"timm {spec.get('name')}"
    if spec.get("name") == "hf":
        return f"transformers {spec.get('source')}"
    return f"{spec.get('type')} {spec.get('name')}"


def _preprocessing(pre: dict) -> str:
    if pre.get("modality") == "text":
        return f"its tokenizer, truncating at {pre['max_length']} tokens."
    resize = "squashed to" if pre.get("crop_mode") == "squash" else "shorter side resized, centre-cropped to"
    return (
        f"{pre['channels']} channel(s), {resize} {pre['image_size']} px ({pre['interpolation']}, crop_pct"
        f" {pre['crop_pct']}), scaled to [0, 1], mean {pre['mean']}, std {pre['std']}."
    )


def _pretraining(source: dict | None, pretraining: dict | None) -> str:
    """Where the fine-tune's starting weights came from (its run record's ``weights``; the pre-training run's own
    provenance when they are a pretune backbone)."""
    if not source:
        return "None: the backbone was trained from random weights (or timm's own pretrained weights)."
    if "hf" in source:
        return f"The Hugging Face model `{source['hf']}`."
    text = f"`{source.get('path')}` (sha256 `{str(source.get('sha256'))[:12]}`)"
    if source.get("artifact"):
        text += f", the W&B artifact `{source['artifact']}`"
    if pretraining:
        details = ", ".join(f"{k} `{v}`" for k, v in pretraining.items() if v is not None)
        text += f"; pre-trained with {details}"
    return text + "."
