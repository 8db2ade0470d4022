"""One prediction run (``scripts/predict.py``): a trained classifier on new inputs, with no labels and no datamodule.

- **The model**: a fine-tune's ``model/`` (``backbones/model_dir.py``), read back by the family that wrote it: the
  very weights, class names and evaluation preprocessing timm or transformers load without pretune. Or a CLIP
  pre-training run: its towers, projections and temperature, classifying zero-shot over ``class_names`` through
  ``templates``, with the preprocessing its ``backbone/`` recorded.
- **The inputs** (``input``): an image folder (every image below it, any size), an image file, a glob of images;
  or texts: a ``.txt`` file (one text a line, blank lines left out), a column (``text_column``) of a ``.csv``,
  ``.tsv`` or ``.jsonl``. Images stream in batches through worker processes (the streaming loader's decoding, its
  policy for unreadable files: ``on_bad_sample``), with the evaluation transform the model recorded; texts go
  through the model's tokenizer, truncated as evaluation truncated them.
- **The output**: ``predictions.csv`` in the run dir (``outputs/predict/<timestamp>/``): each input (a file's path
  relative to ``input``, or the text) with its ``top_k`` labels and probabilities, most probable first; and
  ``metrics.json`` (how many inputs, how many skipped, inputs per second).
"""

from __future__ import annotations

import csv
import glob
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from torch import nn

from datamodules.loading.decision import default_workers
from datamodules.loading.streaming import BadSamples, IndexedLoader, ItemsDataset
from datamodules.sources.folders import IMAGE_SUFFIXES
from datamodules.sources.image_folder import Files
from datamodules.sources.text_classification import FORMATS, read_columns
from datamodules.sources.text_corpus import read_text
from datamodules.spec import ImageTextSpec
from datamodules.transforms.images import preprocessing_transform, standardize
from lightning_modules.backbones.factory import build_backbone
from lightning_modules.backbones.handoff import read_backbone_config, resolve_init
from lightning_modules.backbones.model_dir import find_model_dir, read_model
from lightning_modules.core.errors import ConfigError
from lightning_modules.core.locations import CONFIG, find_backbone_dir
from lightning_modules.core.results import write_atomic, write_metrics
from lightning_modules.objectives.base import saved_objective
from lightning_modules.runtime.evaluate import pick_device

PREDICTIONS = "predictions.csv"
TEXT_FILES = (".txt", *FORMATS)


@dataclass
class Inputs:
    """What ``input`` names: ``image`` files (with the names predictions.csv gives them) or ``text``s."""

    modality: str
    items: list  # image paths, or texts
    names: list[str]


@dataclass
class Model:
    """A classifier ready to run: a module from a batch dict to logits, its class names, what it reads (``image``
    or ``text``), the evaluation preprocessing, and where it came from."""

    network: nn.Module
    labels: list[str]
    modality: str
    preprocessing: dict
    source: str


def predict(cfg: DictConfig) -> dict:
    """As ``run.run``: ``config.yaml`` written once, as composed; ``predictions.csv``; ``metrics.json`` at the end."""
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    started = time.time()
    try:
        metrics = {"status": "ok", "stage": "predict", **_predict(cfg, out_dir / PREDICTIONS)}
    except BaseException as err:
        write_metrics(out_dir, {"status": "failed", "stage": "predict", "error": f"{type(err).__name__}: {err}"})
        raise
    metrics["time/run_s"] = round(time.time() - started, 2)
    write_metrics(out_dir, metrics)
    print(f"predictions: {out_dir / PREDICTIONS} ({metrics['predicted']} inputs)", flush=True)
    return metrics


def _predict(cfg: DictConfig, target: Path) -> dict:
    inputs = find_inputs(str(cfg.input), cfg.text_column)
    model = load_model(cfg)
    if model.modality != inputs.modality:
        raise ConfigError(
            f"input={cfg.input} holds {inputs.modality} inputs, but run_dir={cfg.run_dir} is {_a(model.modality)}"
            f" {model.modality} classifier; allowed is {_INPUT_WORDS[model.modality]}"
        )
    device = pick_device(str(cfg.get("device", "auto")))
    model.network.to(device).eval()
    top_k = min(int(cfg.top_k), len(model.labels))
    batches = model_batches(model, inputs, cfg, device)
    started, written = time.perf_counter(), 0
    with open(target, "w", newline="") as fh, torch.no_grad(), _progress(len(inputs.items), inputs.modality) as bar:
        out = csv.writer(fh)
        out.writerow(["input", *[f"{what}_{i}" for i in range(1, top_k + 1) for what in ("label", "probability")]])
        for indices, batch in batches:
            probabilities = model.network(batch).float().softmax(-1)
            values, classes = probabilities.topk(top_k, dim=-1)
            for index, row_p, row_c in zip(indices, values.tolist(), classes.tolist(), strict=True):
                pairs = [x for c, p in zip(row_c, row_p, strict=True) for x in (model.labels[c], f"{p:.6f}")]
                out.writerow([inputs.names[index], *pairs])
            written += len(indices)
            bar.update(len(indices))
    seconds = time.perf_counter() - started
    return {
        "model": model.source,
        "input": str(cfg.input),
        "inputs": len(inputs.items),
        "predicted": written,
        "skipped": len(inputs.items) - written,
        "throughput/inputs_per_s": round(written / seconds, 2) if seconds > 0 else None,
    }


_INPUT_WORDS = {"image": "images (a folder, an image file or a glob)", "text": "texts (.txt, .csv, .tsv, .jsonl)"}


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# --- the inputs ------------------------------------------------------------------------------------------------
def find_inputs(spelled: str, text_column: str = "text") -> Inputs:
    """The images or texts ``input`` names (see the module docstring), each with its name in predictions.csv."""
    what = f"input={spelled}"
    path = Path(spelled).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if not files:
            raise ConfigError(f"{what}: the folder holds no image ({', '.join(sorted(IMAGE_SUFFIXES))}) at any depth")
        return Inputs("image", files, [str(f.relative_to(path)) for f in files])
    if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
        return Inputs("image", [path], [str(spelled)])
    if path.is_file() and path.suffix.lower() in TEXT_FILES:
        texts = _texts(path, text_column, what)
        return Inputs("text", texts, texts)
    if not path.exists() and glob.has_magic(spelled):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        images = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES]
        if not images:
            raise ConfigError(f"{what}: the pattern matches no image ({len(files)} other files)")
        return Inputs("image", images, [str(f) for f in images])
    if not path.exists():
        raise ConfigError(f"{what}: no such file or folder")
    raise ConfigError(
        f"{what}: {path.suffix or 'a file without a suffix'} is neither an image ({', '.join(sorted(IMAGE_SUFFIXES))})"
        f" nor texts ({', '.join(TEXT_FILES)})"
    )


def _texts(path: Path, column: str, what: str) -> list[str]:
    """A ``.txt`` file's non-blank lines, or a table's ``text_column``."""
    if path.suffix.lower() == ".txt":
        texts = [line for line in read_text(path, what).splitlines() if line.strip()]
    else:
        texts = ["" if t is None else str(t) for (t,) in read_columns(path, {"text_column": column}, what)]
    if not texts:
        raise ConfigError(f"{what}: no texts in it")
    return texts


# --- the model -------------------------------------------------------------------------------------------------
def load_model(cfg: DictConfig) -> Model:
    """``run_dir`` as a classifier: a fine-tune's ``model/``, or a CLIP pre-training run (zero-shot)."""
    run_dir = Path(str(cfg.run_dir)).expanduser()
    stage, objective = _run_kind(run_dir)
    if stage == "pretrain" and objective == "CLIP":
        return _zero_shot(cfg, run_dir)
    if stage == "pretrain":
        raise ConfigError(
            f"run_dir={cfg.run_dir} is a pre-training run (objective {objective}), not a classifier; allowed is a"
            " fine-tune run (its model/), a model/ folder, or a CLIP pre-training run (zero-shot over class_names)"
        )
    model_dir = find_model_dir(run_dir, f"run_dir={cfg.run_dir}")
    if cfg.get("class_names"):
        raise ConfigError(
            f"class_names={list(cfg.class_names)}: only a CLIP run takes class names; {model_dir} has its own"
        )
    return model_from_dir(model_dir)


def model_from_dir(model_dir: Path) -> Model:
    """A fine-tune's ``model/``, read back by the family that wrote it."""
    network, meta = read_model(model_dir)
    return Model(network, meta["labels"], meta["modality"], meta["preprocessing"], str(model_dir))


def _run_kind(run_dir: Path) -> tuple[str | None, str | None]:
    """(stage, objective class) of a run dir, from its config.yaml; (None, None) when it is not a run dir."""
    try:
        saved = yaml.safe_load((run_dir / CONFIG).read_text())
    except (OSError, yaml.YAMLError):
        return None, None
    if not isinstance(saved, dict) or "stage" not in saved:  # e.g. a backbone/'s own config.yaml
        return None, None
    objective = str((saved.get("objective") or {}).get("_target_", "")).rsplit(".", 1)[-1] or None
    return saved.get("stage"), objective


def _zero_shot(cfg: DictConfig, run_dir: Path) -> Model:
    """A CLIP run as a classifier over ``class_names``: its dual encoder, rebuilt from the run's own model config
    and its ``backbone/``, and its saved projections."""
    if not cfg.get("class_names"):
        raise ConfigError(f"run_dir={cfg.run_dir} is a CLIP run: it classifies zero-shot, so class_names is required")
    pre = read_backbone_config(find_backbone_dir(str(run_dir))).get("preprocessing")
    if not pre:
        raise ConfigError(
            f"run_dir={cfg.run_dir}: its backbone/ records no preprocessing (pre-trained before predict.py existed);"
            " use scripts/evaluate.py zero_shot with a datamodule instead"
        )
    model_cfg = (yaml.safe_load((run_dir / CONFIG).read_text()) or {}).get("model") or {}
    model_cfg = {**model_cfg, "init": str(run_dir)}
    source = resolve_init(str(run_dir))
    backbone = build_backbone(model_cfg, source=source)
    text = backbone.towers()["text"]
    tok = text.processor
    spec = ImageTextSpec(pre["channels"], pre["image_size"], len(tok), text.max_positions, tok.pad_token_id, tok)
    objective = saved_objective(source, backbone, spec)
    names, templates = [str(c) for c in cfg.class_names], [str(t) for t in cfg.templates]
    return Model(ZeroShot(backbone, objective, names, templates), names, "image", pre, f"{run_dir} (zero-shot)")


class ZeroShot(nn.Module):
    """A CLIP model classifying images among ``class_names``: the prompts' embeddings are computed once, where the
    model is."""

    def __init__(self, backbone, objective, class_names: list[str], templates: list[str]):
        super().__init__()
        self.backbone, self.objective = backbone, objective
        self.class_names, self.templates = class_names, templates
        self.classes = None

    def forward(self, batch: dict) -> torch.Tensor:
        if self.classes is None:
            self.classes = self.objective.class_embeddings(self.backbone, self.class_names, self.templates)
        return self.objective.zero_shot_logits(self.backbone, batch, self.classes)


# --- batches ---------------------------------------------------------------------------------------------------
def model_batches(model: Model, inputs: Inputs, cfg: DictConfig, device: torch.device):
    """(the inputs' indices, a batch as the model takes it), in input order; unreadable images left out under
    ``on_bad_sample=skip``."""
    if inputs.modality == "image":
        yield from _image_batches(model.preprocessing, inputs, cfg, device)
    else:
        yield from _text_batches(model.network.processor, model.preprocessing, inputs, int(cfg.batch_size), device)


def _image_batches(pre: dict, inputs: Inputs, cfg: DictConfig, device: torch.device):
    """Decoded by worker processes with the recorded evaluation transform (uint8), then scaled and normalised where
    the model is. The label slot of each sample carries its input's index, so a skipped file keeps the rest in
    place."""
    n = len(inputs.items)
    files = Files(np.asarray([str(p) for p in inputs.items], dtype=object), np.arange(n))
    items = ItemsDataset(files, n, pre["channels"], pre["image_size"], preprocessing_transform(pre))
    bad = BadSamples(str(cfg.on_bad_sample), f"input={cfg.input}", key="on_bad_sample")
    workers, batches = cfg.get("num_workers"), -(-n // int(cfg.batch_size))
    if (
        workers is None
    ):  # one batch: decoded here (starting a worker costs more); else a worker a batch, up to the cores
        workers = 0 if batches == 1 else min(default_workers(), batches)
    loader = IndexedLoader(items, int(cfg.batch_size), False, False, bad, num_workers=int(workers), persistent=False)
    for batch in loader:
        image = standardize(batch["image"].to(device), pre["mean"], pre["std"])
        yield batch["label"].tolist(), {"image": image}


def _text_batches(tokenizer, pre: dict, inputs: Inputs, batch_size: int, device: torch.device):
    """Tokenized as evaluation tokenized them (truncated at ``max_length``, right-padded), a batch at a time."""
    for start in range(0, len(inputs.items), batch_size):
        texts = inputs.items[start : start + batch_size]
        enc = tokenizer(texts, truncation=True, max_length=int(pre["max_length"]), padding=True, return_tensors="pt")
        batch = {k: enc[k].to(device) for k in ("input_ids", "attention_mask")}
        yield list(range(start, start + len(texts))), batch


def _progress(total: int, modality: str):
    """A progress bar on a terminal (none in a log or a pipe)."""
    from tqdm import tqdm

    return tqdm(total=total, unit=f" {modality}s", disable=None, mininterval=0.2)
