"""In memory or streamed: the decision, made once per run from the data's size and a memory budget.

Small data live in memory as one uint8 tensor (8-bit sources: a byte a pixel) and each batch is an index into
it: nothing is faster. Data larger than ``datamodule.memory_budget_gb`` (per process: under DDP every process
holds its own copy) stream from disk through DataLoader workers instead, with memory that does not grow with
the number of images. ``datamodule.loading=memory|stream`` forces either path. The budget is a fixed number,
not a share of the free memory, so every rank, and every rerun of a config, takes the same path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from lightning_modules.core.errors import ConfigError

LOADING = ("auto", "memory", "stream")


@dataclass(frozen=True)
class Loading:
    path: str  # "memory" or "stream"
    reason: str  # the line printed once and kept with the run

    @property
    def streams(self) -> bool:
        return self.path == "stream"


def in_memory_bytes(images: int, channels: int, image_size: int) -> int:
    """What ``images`` images take in memory as uint8 at ``image_size`` x ``image_size``."""
    return images * channels * image_size * image_size


def choose(what: str, images: int, channels: int, image_size: int, loading: str, budget_gb: float) -> Loading:
    if loading not in LOADING:  # also checked before torch (config/rules/datamodule.py); this is the Python entry
        raise ConfigError(f"datamodule.loading={loading!r} is invalid: allowed are {', '.join(map(repr, LOADING))}")
    size = in_memory_bytes(images, channels, image_size)
    fits = size <= budget_gb * 1e9
    path = {"auto": "memory" if fits else "stream"}.get(loading, loading)
    measure = f"{images:,} images, {size / 1e9:.2f} GB as uint8 at {image_size} px"
    if loading != "auto":
        why = f"datamodule.loading={loading}"
    else:
        why = f"{'within' if fits else 'over'} datamodule.memory_budget_gb={budget_gb:g}"
    where = "held in memory" if path == "memory" else "streamed from disk by DataLoader workers"
    return Loading(path, f"{what}: {where} ({measure}; {why})")


def default_workers(processes_on_node: int = 1) -> int:
    """The cores this process may use, shared among the training processes of this node."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, processes_on_node))
