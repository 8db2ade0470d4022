"""One export (``scripts/export.py``): a fine-tune's classifier (its ``model/``, read back as ``predict.py`` reads
it) as an ONNX graph or a ``torch.export`` program, checked against PyTorch before it is kept.

- **Inputs and outputs**: an image classifier takes ``image`` (float, ``(batch, C, H, W)``, already resized and
  normalised: the preprocessing in ``model/`` says how); a text classifier takes ``input_ids`` and
  ``attention_mask`` (int64, ``(batch, length)``); both give ``logits`` (``(batch, classes)``). The batch axis is
  dynamic, and for text the length too (up to the model's positions).
- **ONNX**: torch's exporter (``torch.onnx.export(dynamo=True)``, which needs the ``onnx`` and ``onnxscript``
  packages: ``pip install "pretune[export]"``), checked with ``onnxruntime``. **pt2**:
  ``torch.export.export`` and ``torch.export.save``; ``torch.export.load(path).module()`` runs it.
- **The check**: the exported model's logits against PyTorch's on ``input`` (new inputs, read and preprocessed as
  ``predict.py`` does), else on a synthetic batch (random images; the class names as texts); the largest difference
  goes to ``metrics.json`` (``parity/max_abs_logit_diff``), and an export off by more than ``TOLERANCE`` is refused.
- What cannot be exported says why in one line: a CLIP run (it is not a fine-tuned classifier), a model the
  exporter fails on (its first line).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lightning_modules.backbones.model_dir import find_model_dir
from lightning_modules.core.errors import ConfigError, message_of
from lightning_modules.core.extras import require
from lightning_modules.core.results import write_atomic, write_metrics
from lightning_modules.runtime.predict import Model, find_inputs, model_batches, model_from_dir

TOLERANCE = 1e-4  # the largest logit difference an export may have from PyTorch (float32 on the CPU)
INPUT_NAMES = {"image": ("image",), "text": ("input_ids", "attention_mask")}
FILES = {"onnx": "model.onnx", "pt2": "model.pt2"}


class ImageLogits(nn.Module):
    """An image classifier taking its tensor by name, as exporters trace it: ``image`` to ``logits``."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.network({"image": image})


class TextLogits(nn.Module):
    """A text classifier taking its tensors by name: ``input_ids`` and ``attention_mask`` to ``logits``."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.network({"input_ids": input_ids, "attention_mask": attention_mask})


WRAPPERS = {"image": ImageLogits, "text": TextLogits}


def export(cfg: DictConfig) -> dict:
    """As ``run.run``: ``config.yaml`` written once, as composed; the exported file; ``metrics.json`` at the end."""
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    started = time.time()
    try:
        metrics = {"status": "ok", "stage": "export", **_export(cfg, out_dir)}
    except BaseException as err:
        write_metrics(out_dir, {"status": "failed", "stage": "export", "error": f"{type(err).__name__}: {err}"})
        raise
    metrics["time/run_s"] = round(time.time() - started, 2)
    write_metrics(out_dir, metrics)
    print(f"exported: {out_dir / metrics['file']} (max |logit difference| {metrics['parity/max_abs_logit_diff']:.2e})")
    return metrics


def _export(cfg: DictConfig, out_dir: Path) -> dict:
    model_dir = find_model_dir(str(cfg.run_dir), f"run_dir={cfg.run_dir}")  # a CLIP run has none: one line
    model = model_from_dir(model_dir)
    model.network.eval()
    names = INPUT_NAMES[model.modality]
    batches = [tuple(batch[n] for n in names) for _, batch in _check_batches(cfg, model)]
    wrapper = WRAPPERS[model.modality](model.network).eval()
    target = out_dir / FILES[str(cfg.format)]
    dynamic = _dynamic_shapes(model, names)
    with torch.no_grad():
        expected = [wrapper(*batch) for batch in batches]
    try:
        run = (_to_onnx if cfg.format == "onnx" else _to_pt2)(wrapper, batches[0], names, dynamic, target)
    except ConfigError:
        raise
    except Exception as err:  # the exporters raise many types; their first line says what they could not handle
        why = re.sub(r"\x1b\[[0-9;]*m", "", message_of(err, 300))  # the exporter's colours
        raise ConfigError(
            f"format={cfg.format}: {model_dir} could not be exported ({type(err).__name__}: {why})"
        ) from err
    with torch.no_grad():
        worst = max(float((run(batch) - want).abs().max()) for batch, want in zip(batches, expected, strict=True))
    if worst > TOLERANCE:
        target.unlink(missing_ok=True)
        raise ConfigError(
            f"format={cfg.format}: the exported model's logits differ from PyTorch's by up to {worst:.2e} (more than"
            f" {TOLERANCE:g}), so it was not kept"
        )
    return {
        "model": str(model_dir),
        "format": str(cfg.format),
        "file": target.name,
        "inputs": list(names),
        "parity/max_abs_logit_diff": worst,
        "parity/inputs": sum(len(batch[0]) for batch in batches),
        "parity/on": str(cfg.input) if cfg.get("input") else "synthetic",
    }


def _check_batches(cfg: DictConfig, model: Model):
    """The batches the export is checked on: ``input``'s, as predict.py reads them, else one synthetic batch."""
    if cfg.get("input"):
        inputs = find_inputs(str(cfg.input), cfg.text_column)
        if inputs.modality != model.modality:
            raise ConfigError(f"input={cfg.input} holds {inputs.modality} inputs; the model reads {model.modality}")
        yield from model_batches(model, inputs, cfg, torch.device("cpu"))
        return
    pre = model.preprocessing
    if model.modality == "image":
        size = pre["image_size"]
        yield [], {"image": torch.randn(4, pre["channels"], size, size, generator=torch.Generator().manual_seed(0))}
    else:
        texts = [*model.labels, " ".join(model.labels)][:8]
        if len(texts) < 2:
            texts = texts * 2
        tokenizer = model.network.processor
        enc = tokenizer(texts, truncation=True, max_length=int(pre["max_length"]), padding=True, return_tensors="pt")
        yield [], {k: enc[k] for k in ("input_ids", "attention_mask")}


def _dynamic_shapes(model: Model, names: tuple[str, ...]) -> tuple:
    """The batch axis of every input dynamic, and a text's length (up to the model's positions)."""
    batch = torch.export.Dim("batch", min=1, max=65536)
    if model.modality == "image":
        return ({0: batch},)
    positions = int(model.network.model.config.encoder.get("max_position_embeddings") or 512)
    length = torch.export.Dim("length", min=1, max=positions)
    return tuple({0: batch, 1: length} for _ in names)


def _to_onnx(wrapper: nn.Module, example: tuple, names: tuple, dynamic: tuple, target: Path):
    """``target`` as ONNX; returns a function running it with onnxruntime."""
    require("format=onnx", "onnx", "onnxscript")
    torch.onnx.export(
        wrapper,
        example,
        str(target),
        input_names=list(names),
        output_names=["logits"],
        dynamic_shapes=dynamic,
        dynamo=True,
        external_data=False,
        verbose=False,
    )
    require("format=onnx (its check)", "onnxruntime")
    import onnxruntime

    session = onnxruntime.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    return lambda batch: torch.from_numpy(
        session.run(["logits"], {n: t.numpy() for n, t in zip(names, batch, strict=True)})[0]
    )


def _to_pt2(wrapper: nn.Module, example: tuple, names: tuple, dynamic: tuple, target: Path):
    """``target`` as a ``torch.export`` program; returns a function running the program loaded back from it."""
    program = torch.export.export(wrapper, example, dynamic_shapes=dynamic)
    torch.export.save(program, str(target))
    loaded = torch.export.load(str(target)).module()
    return lambda batch: loaded(*batch)
