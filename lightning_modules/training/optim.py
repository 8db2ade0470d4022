"""Optimizer and LR schedule from config, with one named parameter group per layer group.

Every parameter is in the optimizer from the start; freezing only flips ``requires_grad``
(frozen parameters get no gradient, so the optimizer leaves them bit-for-bit alone). That
keeps the schedule aware of every group, whatever is frozen or unfrozen later (the trap of
schedulers built before ``add_param_group``).

A group's learning rate is ``lr * lr_scale * factor(step)``: ``lr_scale`` starts as the group's
layer-wise decay (``layer_scale``) and a strategy such as LP-FT may change it; ``factor`` is the
schedule (warmup + cosine, or constant). The scheduler here reads ``lr_scale`` itself, so layer
decay works with every schedule (unlike timm's ``lr_scale``, read only by timm's schedulers).
"""

from __future__ import annotations

import math

import torch

from lightning_modules.backbones.adapters import adapter_ids, has_adapters
from lightning_modules.config.library import library_error
from lightning_modules.config.rules import check

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


def layer_scales(num_groups: int, layer_decay: float | None, backbone_lr_scale: float = 1.0) -> list[float]:
    """LR multipliers for the backbone's groups, input side first: group i of depth d gets
    ``decay ** (d - i)`` (the head, at depth d, gets 1)."""
    if check("optimizer.layer_decay", layer_decay) is None:
        return [backbone_lr_scale] * num_groups
    return [backbone_lr_scale * layer_decay ** (num_groups - i) for i in range(num_groups)]


def param_groups(backbone, head: torch.nn.Module, cfg: dict) -> list[dict]:
    """One group per layer group (two: with and without weight decay), then the head's. Layer decay counts each
    tower of a backbone made of towers (a dual encoder) on its own: each tower's top group gets ``lr * d``.
    A backbone with adapters (``freeze=lora``) is frozen for good: only its adapters are in the optimizer, each in
    the group of the module it adapts (so layer decay scales them as it would those modules)."""
    groups = []
    wd = cfg.get("weight_decay", 0.0)
    trained = adapter_ids(backbone) if has_adapters(backbone) else None
    for layer_groups in backbone.tower_groups().values():
        scales = layer_scales(len(layer_groups), cfg.get("layer_decay"), cfg.get("backbone_lr_scale", 1.0))
        for g, scale in zip(layer_groups, scales, strict=True):
            params = g.params if trained is None else {n: p for n, p in g.params.items() if id(p) in trained}
            groups += _split_decay(params, wd, {"name": g.name, "layer_scale": scale, "lr_scale": scale})
    # An objective's own choice (an EMA teacher is updated by its momentum, not by the optimizer); any other module:
    # all of its parameters.
    optimized = getattr(head, "optimized_parameters", None)
    head_params = optimized() if optimized is not None else dict(head.named_parameters())
    if head_params:
        groups += _split_decay(head_params, wd, {"name": "head", "layer_scale": 1.0, "lr_scale": 1.0})
    return groups


def implementation(choice: str, params) -> dict:
    """torch's keyword for ``optimizer.implementation``: ``fused`` (one kernel for all parameters; CUDA),
    ``foreach`` (a few batched kernels), ``loop`` (a loop over tensors). ``auto`` is ``fused`` when every
    parameter is on a CUDA device, and torch's own default elsewhere (on the CPU: the loop), so CPU runs are
    unchanged."""
    if check("optimizer.implementation", choice) == "auto":
        return {"fused": True} if params and all(p.is_cuda for p in params) else {}
    return {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}[choice]


def build_optimizer(cfg: dict, backbone, head) -> torch.optim.Optimizer:
    name = check("optimizer.name", cfg.get("name", "adamw"))
    extra = {}
    if name == "sgd":
        extra = {"momentum": cfg.get("momentum", 0.9), "nesterov": cfg.get("nesterov", False)}
    elif "betas" in cfg:
        extra = {"betas": tuple(cfg["betas"])}
    groups = param_groups(backbone, head, cfg)
    extra.update(implementation(cfg.get("implementation", "auto"), [p for g in groups for p in g["params"]]))
    try:
        return OPTIMIZERS[name](groups, lr=cfg["lr"], **extra)
    except (ValueError, TypeError) as err:  # torch refusing a value: its message, naming the key
        raise library_error("optimizer", cfg, err) from err


def cosine_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class GroupScaledLR(torch.optim.lr_scheduler.LRScheduler):
    """lr of each group = its initial lr * its ``lr_scale`` * ``factor(step)``.

    ``factor`` is warmup then: cosine decay (``cosine``), a constant (``none``), ``gamma`` every
    ``step_size`` steps (``step``), or ``gamma`` each time the monitored metric stops improving for
    ``patience`` validations (``plateau``; fed by ``report``). Its whole state is plain numbers, so
    it checkpoints and resumes exactly.
    """

    def __init__(
        self,
        optimizer,
        kind: str,
        total: int = 1,
        warmup: int = 0,
        min_ratio: float = 0.0,
        step_size: int = 1,
        gamma: float = 0.1,
        patience: int = 2,
        mode: str = "max",
    ):
        self.kind, self.total, self.warmup, self.min_ratio = kind, total, warmup, min_ratio
        self.step_size, self.gamma, self.patience, self.mode = step_size, gamma, patience, mode
        self.plateau_scale, self.best, self.bad_checks = 1.0, None, 0
        super().__init__(optimizer)

    def factor(self, step: int) -> float:
        if self.kind == "cosine":
            return cosine_factor(step, self.total, self.warmup, self.min_ratio)
        warm = (step + 1) / self.warmup if step < self.warmup else 1.0
        if self.kind == "step":
            return warm * self.gamma ** (step // self.step_size)
        if self.kind == "plateau":
            return warm * self.plateau_scale
        return warm

    def report(self, value: float) -> None:
        """A validation result for ``plateau``: after ``patience`` checks without improvement, decay."""
        improved = self.best is None or (value > self.best if self.mode == "max" else value < self.best)
        if improved:
            self.best, self.bad_checks = value, 0
            return
        self.bad_checks += 1
        if self.bad_checks > self.patience:
            self.plateau_scale *= self.gamma
            self.bad_checks = 0

    def get_lr(self) -> list[float]:
        f = self.factor(self.last_epoch)
        return [g["initial_lr"] * g.get("lr_scale", 1.0) * f for g in self.optimizer.param_groups]


def refresh_lrs(trainer) -> None:
    """Apply a changed ``lr_scale`` (or plateau decay) now rather than at the next scheduler step."""
    for config in getattr(trainer, "lr_scheduler_configs", []) or []:
        sched = config.scheduler
        if isinstance(sched, GroupScaledLR):
            for group, lr in zip(sched.optimizer.param_groups, sched.get_lr(), strict=True):
                group["lr"] = lr


SCHEDULES = ("cosine", "step", "plateau", "none")


def build_scheduler(cfg: dict, optimizer, total_steps: int, steps_per_epoch: int = 1) -> dict:
    """Lightning scheduler dict, stepped every batch (a constant schedule too, so ``lr_scale`` holds)."""
    name = check("scheduler.name", cfg.get("name", "none"))
    warmup = round(cfg.get("warmup_fraction", 0.0) * total_steps)
    step_size = max(1, round(cfg.get("step_epochs", 1) * steps_per_epoch))
    sched = GroupScaledLR(
        optimizer,
        name,
        total_steps,
        warmup,
        cfg.get("min_lr_ratio", 0.0),
        step_size=step_size,
        gamma=cfg.get("gamma", 0.1),
        patience=cfg.get("patience", 2),
        mode=cfg.get("mode", "max"),
    )
    return {"scheduler": sched, "interval": "step", "frequency": 1}
