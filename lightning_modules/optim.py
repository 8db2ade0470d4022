"""Optimizer and LR schedule from config, with one named parameter group per layer group.

Every parameter is in the optimizer from the start; freezing only flips ``requires_grad``
(frozen parameters get no gradient, so the optimizer leaves them bit-for-bit alone). That
keeps the scheduler aware of every group, whatever is frozen or unfrozen later.
"""

from __future__ import annotations

import math

import torch

from datamodules.errors import ConfigError

OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}


def _split_decay(named: dict, weight_decay: float, base: dict) -> list[dict]:
    """No weight decay on biases, norms and tokens (1-D tensors), as is standard for ViTs and CNNs."""
    decay = [p for p in named.values() if p.ndim > 1]
    no_decay = [p for p in named.values() if p.ndim <= 1]
    groups = []
    if decay:
        groups.append({**base, "params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({**base, "name": base["name"] + "/no_decay", "params": no_decay, "weight_decay": 0.0})
    return groups


def param_groups(
    backbone, head: torch.nn.Module, lr: float, weight_decay: float, backbone_lr_scale: float = 1.0
) -> list[dict]:
    groups = []
    for g in backbone.layer_groups():
        groups += _split_decay(g.params, weight_decay, {"name": g.name, "lr": lr * backbone_lr_scale})
    head_params = dict(head.named_parameters())
    if head_params:
        groups += _split_decay(head_params, weight_decay, {"name": "head", "lr": lr})
    return groups


def build_optimizer(cfg: dict, backbone, head) -> torch.optim.Optimizer:
    name = cfg.get("name", "adamw")
    if name not in OPTIMIZERS:
        raise ConfigError(f"optimizer.name={name} is unknown: allowed are {sorted(OPTIMIZERS)}")
    groups = param_groups(backbone, head, cfg["lr"], cfg.get("weight_decay", 0.0), cfg.get("backbone_lr_scale", 1.0))
    extra = {}
    if name == "sgd":
        extra = {"momentum": cfg.get("momentum", 0.9), "nesterov": cfg.get("nesterov", False)}
    elif "betas" in cfg:
        extra = {"betas": tuple(cfg["betas"])}
    return OPTIMIZERS[name](groups, lr=cfg["lr"], **extra)


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to ``min_ratio``, as a multiple of each group's base LR."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(cfg: dict, optimizer, total_steps: int):
    """Lightning scheduler dict (stepped every batch) or ``None`` for a constant LR."""
    name = cfg.get("name", "none")
    if name == "none":
        return None
    if name != "cosine":
        raise ConfigError(f"scheduler.name={name} is unknown: allowed are ['cosine', 'none']")
    warmup = round(cfg.get("warmup_fraction", 0.0) * total_steps)
    min_ratio = cfg.get("min_lr_ratio", 0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, warmup, min_ratio))
    return {"scheduler": sched, "interval": "step", "frequency": 1}
