"""``scripts/evaluate.py``'s own keys (``conf/evaluate.yaml``): the task and its options."""

from __future__ import annotations

from lightning_modules.config.kinds import Choice, ListOf, Rule, Section, Text

RULES: dict[str, object] = {
    "task": Choice("zero_shot", "retrieval"),
    "device": Text(r"auto|cpu|cuda(:\d+)?", "auto, cpu, cuda or cuda:<index>"),
    "zero_shot": Section(),
    "zero_shot.split": Choice("train", "val", "test"),
    "zero_shot.class_names": ListOf(Text(), min_len=1, nullable=True),
    "zero_shot.templates": ListOf(Text(r".*\{\}.*", "a template with {} for the class name"), min_len=1, nullable=True),
    "zero_shot.batch_size": Rule(int, low=1),
    "retrieval": Section(),
    "retrieval.split": Choice("train", "val"),
    "retrieval.batch_size": Rule(int, low=1),
}
