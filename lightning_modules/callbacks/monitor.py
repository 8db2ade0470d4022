"""Every epoch: per layer group, its learning rate (named by group, not ``pg3``) and whether it is
frozen; and the number of trainable parameters. For the run's metrics: the training state's memory."""

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


def train_state_mb(module, optimizers) -> float:
    """Parameters, the gradients they hold and the optimizers' state tensors, in MB: what a strategy that trains
    fewer parameters saves (LoRA, a probe), measured on the tensors, so any optimizer and dtype counts as it is.
    Every parameter the module holds counts, trained or not (a frozen backbone's, an EMA teacher's): they are in
    memory all the same, where ``params/trainable`` counts only what the optimizer moves.
    Activations are not in it (they depend on the batch, not the strategy; the benchmark's peak RSS has them)."""
    import torch

    tensors = {id(p): p for p in module.parameters()}
    tensors.update({id(p.grad): p.grad for p in module.parameters() if p.grad is not None})
    for optimizer in optimizers:
        for state in optimizer.state.values():
            tensors.update({id(v): v for v in state.values() if isinstance(v, torch.Tensor)})
    return sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20


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
        self.state_mb = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        self.trainable_at_start = count_params(pl_module)["params/trainable"]

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # The gradients of the epoch's last step are still held here; the peak over epochs covers strategies
        # whose trainable set grows (gradual unfreezing, LP-FT).
        self.state_mb = max(self.state_mb, train_state_mb(pl_module, trainer.optimizers))

    def run_metrics(self) -> dict:
        """For metrics.json: trainable parameters when training started (they change under gradual, LP-FT) and the
        peak memory of the training state (parameters, gradients, optimizer state)."""
        if self.trainable_at_start is None:
            return {}
        return {"params/trainable_start": self.trainable_at_start, "memory/train_state_mb": round(self.state_mb, 3)}

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
