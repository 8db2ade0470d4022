"""Every epoch: per layer group, its learning rate (named by group, not ``pg3``) and whether it is
frozen; and the number of trainable parameters."""

from __future__ import annotations

from pytorch_lightning.callbacks import Callback


def count_params(module) -> dict:
    """Trainable and frozen parameters of what the optimizer holds: the backbone and the objective's heads, not an
    EMA teacher (updated by its momentum, neither trained nor frozen)."""
    objective = getattr(module, "objective", None)
    if objective is not None and hasattr(objective, "optimized_parameters"):
        params = [*module.backbone.parameters(), *objective.optimized_parameters().values()]
    else:
        params = list(module.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    return {"params/trainable": trainable, "params/frozen": total - trainable}


def group_state(pl_module, optimizer) -> dict[str, float]:
    values = {}
    for group in optimizer.param_groups:
        name = group.get("name", "")
        if name.endswith("/no_decay"):  # same schedule as its twin; one entry per layer group
            continue
        values[f"lr/{name}"] = float(group["lr"])
        values[f"frozen/{name}"] = float(not any(p.requires_grad for p in group["params"]))
    return values


class LayerGroupMonitor(Callback):
    def __init__(self):
        self.trainable_at_start: int | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.trainable_at_start = count_params(pl_module)["params/trainable"]

    def run_metrics(self) -> dict:
        """For metrics.json: trainable parameters when training started (they change under gradual, LP-FT)."""
        return {} if self.trainable_at_start is None else {"params/trainable_start": self.trainable_at_start}

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        # Trainable parameters change under gradual unfreezing and LP-FT: logged every epoch.
        values = {
            "epoch": float(trainer.current_epoch),
            "params/trainable": float(count_params(pl_module)["params/trainable"]),
        }
        for optimizer in trainer.optimizers:
            values.update(group_state(pl_module, optimizer))
        for logger in trainer.loggers:
            logger.log_metrics(values, step=trainer.global_step)
