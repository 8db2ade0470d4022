"""Gradual unfreezing, LP-FT and layer-wise LR decay: which groups train in which epoch (bit-exact),
and every group's learning rate at chosen steps against a hand computation."""

from __future__ import annotations

import math

import pytest
import torch
from pytorch_lightning.callbacks import Callback

from lightning_modules.backbones.image import TimmBackbone
from lightning_modules.callbacks.freezing import GradualUnfreezing, LinearProbeThenFinetune
from lightning_modules.core.errors import ConfigError
from lightning_modules.objectives.classification import Classification
from lightning_modules.training.module import PretuneModule
from lightning_modules.training.optim import build_optimizer, build_scheduler
from tests.helpers import RESNET, SPEC, fit_tiny, group_keys, resnet


class _Snapshots(Callback):
    """The state dict and every group's LR at the end of each epoch."""

    def __init__(self):
        self.states, self.lrs = [], []

    def on_train_epoch_end(self, trainer, pl_module):
        self.states.append({k: v.clone() for k, v in pl_module.state_dict().items()})
        self.lrs.append({g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups})


def _fit(strategy, epochs, optimizer=None, scheduler=None):
    snaps = _Snapshots()
    module, start = fit_tiny(resnet(), [strategy, snaps], epochs, optimizer, scheduler)
    return module, [start, *snaps.states], snaps.lrs


def _changed_groups(module, before, after) -> list[str]:
    """Names of the backbone groups with any parameter or buffer changed."""
    return [
        g.name
        for g in module.backbone.layer_groups()
        if any(not torch.equal(before[k], after[k]) for k in group_keys(module, g))
    ]


def test_gradual_unfreezes_one_group_per_epoch_from_the_top():
    module, states, _ = _fit(GradualUnfreezing(start=0, every=1), epochs=4)
    changed = [_changed_groups(module, a, b) for a, b in zip(states, states[1:], strict=False)]
    assert changed == [[], ["layer4"], ["layer3", "layer4"], ["layer2", "layer3", "layer4"]]
    head = [
        not torch.equal(a["objective.head.1.weight"], b["objective.head.1.weight"])
        for a, b in zip(states, states[1:], strict=False)
    ]
    assert all(head)  # the head trains in every epoch


def test_gradual_every_two_epochs_with_a_start():
    module, states, _ = _fit(GradualUnfreezing(start=2, every=2), epochs=3)
    changed = [_changed_groups(module, a, b) for a, b in zip(states, states[1:], strict=False)]
    assert changed == [["layer3", "layer4"], ["layer3", "layer4"], ["layer2", "layer3", "layer4"]]


def test_lp_ft_probes_then_trains_everything_at_the_lower_lr():
    lr = 1e-2
    module, states, lrs = _fit(
        LinearProbeThenFinetune(probe_epochs=2, ft_lr_scale=0.1),
        epochs=3,
        optimizer={"name": "adamw", "lr": lr, "weight_decay": 0.0},
    )
    changed = [_changed_groups(module, a, b) for a, b in zip(states, states[1:], strict=False)]
    assert changed[0] == changed[1] == []
    assert changed[2] == ["stem", "layer1", "layer2", "layer3", "layer4"]
    assert lrs[1]["head"] == pytest.approx(lr) and lrs[1]["stem"] == pytest.approx(lr)
    assert lrs[2]["head"] == pytest.approx(0.1 * lr) and lrs[2]["layer3"] == pytest.approx(0.1 * lr)


def _hand_cosine(step, total, warmup, lr):
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


@pytest.mark.parametrize("decay", [None, 0.5])
def test_each_group_lr_follows_cosine_warmup_and_layer_decay(decay):
    backbone = resnet()
    head = Classification(backbone, SPEC)
    lr, total = 0.1, 20
    opt = build_optimizer({"name": "adamw", "lr": lr, "layer_decay": decay}, backbone, head)
    sched = build_scheduler({"name": "cosine", "warmup_fraction": 0.2}, opt, total)["scheduler"]
    depth = {"stem": 5, "layer1": 4, "layer2": 3, "layer3": 2, "layer4": 1, "head": 0}  # groups below the head
    for step in range(total):
        for g in opt.param_groups:
            scale = 1.0 if decay is None else decay ** depth[g["name"].split("/")[0]]
            assert g["lr"] == pytest.approx(_hand_cosine(step, total, 4, lr) * scale, rel=1e-9), (step, g["name"])
        opt.step()
        sched.step()


def test_layer_decay_really_scales_each_groups_update():
    """One SGD step from the same weights and batch: each group's update is its plain update times
    decay ** depth (the optimizer really uses the decayed rates, not just stores them)."""
    from tests.helpers import batch

    def one_step(decay):
        torch.manual_seed(0)
        # zero_init_last=False: timm zero-inits each block's last BN, which zeroes block gradients at step 0.
        backbone = TimmBackbone(RESNET[0], {**RESNET[1], "zero_init_last": False}).double()
        objective = Classification(backbone, SPEC).double()
        opt = build_optimizer({"name": "sgd", "lr": 0.1, "momentum": 0.0, "layer_decay": decay}, backbone, objective)
        build_scheduler({"name": "none"}, opt, 10)
        before = {n: p.detach().clone() for n, p in backbone.model.named_parameters()}
        data = batch(8)
        objective(backbone, {**data, "image": data["image"].double()})["loss"].backward()
        opt.step()
        return {n: p.detach() - before[n] for n, p in backbone.model.named_parameters()}

    plain, decayed = one_step(None), one_step(0.5)
    for name, depth in (("conv1.weight", 5), ("layer1.0.conv1.weight", 4), ("layer4.0.conv1.weight", 1)):
        assert plain[name].abs().sum() > 0
        torch.testing.assert_close(
            decayed[name], plain[name] * 0.5**depth, rtol=1e-6, atol=1e-12
        )  # float64: exact up to rounding


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda: GradualUnfreezing(every=0), "freeze.every=0 is out of range"),
        (lambda: GradualUnfreezing(start=-1), "freeze.start=-1 is out of range"),
        (lambda: GradualUnfreezing(start=9).validate(resnet()), "freeze.start=9 is out of range: the backbone has 5"),
        (lambda: LinearProbeThenFinetune(probe_epochs=-2), "freeze.probe_epochs=-2 is out of range"),
        (lambda: LinearProbeThenFinetune(ft_lr_scale=0), "freeze.ft_lr_scale=0 is out of range"),
        (lambda: LinearProbeThenFinetune(ft_lr_scale=1.5), "freeze.ft_lr_scale=1.5 is out of range"),
        (
            lambda: build_optimizer({"lr": 1, "layer_decay": 0}, resnet(), torch.nn.Linear(1, 1)),
            "optimizer.layer_decay=0 is out of range",
        ),
        (
            lambda: build_optimizer({"lr": 1, "layer_decay": 1.5}, resnet(), torch.nn.Linear(1, 1)),
            "optimizer.layer_decay=1.5 is out of range",
        ),
    ],
)
def test_bad_strategy_parameters_are_refused(make, needle):
    with pytest.raises(ConfigError) as err:
        make()
    assert needle in str(err.value)


def test_run_logs_each_group_lr_and_frozen_flag(cfg_factory, tmp_path):
    import csv

    from lightning_modules.runtime.run import run

    cfg = cfg_factory(
        "finetune",
        "model=resnet_micro",
        "freeze=gradual",
        "freeze.every=1",
        "logger=csv",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
    )
    metrics = run(cfg)
    rows = list(csv.DictReader(open(tmp_path / "finetune" / "csv" / "metrics.csv")))
    epoch_rows = [r for r in rows if r.get("lr/stem")]
    assert [r["frozen/layer4"] for r in epoch_rows] == ["1.0", "0.0"]
    assert [r["frozen/stem"] for r in epoch_rows] == ["1.0", "1.0"]
    assert float(epoch_rows[0]["lr/head"]) > 0
    assert metrics["params/trainable_start"] < metrics["params/trainable"]


def test_l2_sp_penalty_is_zero_at_start_and_matches_a_hand_computation():
    torch.manual_seed(0)
    backbone = resnet()
    module = PretuneModule(backbone, Classification(backbone, SPEC), {"lr": 1e-3}, {"name": "none"}, l2_sp=0.3)
    assert module.l2_sp_penalty().item() == 0.0
    start = {n: p.detach().clone() for n, p in backbone.named_parameters()}
    with torch.no_grad():
        backbone.model.conv1.weight.add_(0.5)
        backbone.model.layer4[0].conv1.weight.mul_(2)
    backbone.model.layer4[0].conv1.weight.requires_grad = False  # frozen: not penalised
    hand = (
        0.5
        * 0.3
        * sum(((p.detach() - start[n]) ** 2).sum().item() for n, p in backbone.named_parameters() if p.requires_grad)
    )
    assert hand == pytest.approx(0.5 * 0.3 * 0.25 * backbone.model.conv1.weight.numel(), rel=1e-5)
    assert module.l2_sp_penalty().item() == pytest.approx(hand, rel=1e-5)


def test_early_stopping_stops_and_best_checkpoint_is_tested(cfg_factory):
    from lightning_modules.runtime.run import run

    metrics = run(
        cfg_factory(
            "finetune",
            "model=resnet_micro",
            "callbacks=early_stopping",
            "callbacks.early_stopping.patience=1",
            "optimizer.lr=1e-9",
            "scheduler=none",
            "trainer.max_epochs=20",
            "trainer.limit_train_batches=1",
            "trainer.limit_val_batches=1",
        )
    )
    assert metrics["epochs"] < 20  # a learning rate of 1e-9 never improves val/acc: stopped after patience
    assert metrics["best_checkpoint"] == "checkpoints/best.ckpt"


def test_step_schedule_with_layer_decay_matches_hand_values():
    backbone = resnet()
    head = Classification(backbone, SPEC)
    opt = build_optimizer({"name": "sgd", "lr": 0.1, "layer_decay": 0.5}, backbone, head)
    sched = build_scheduler({"name": "step", "step_epochs": 2, "gamma": 0.5}, opt, 20, steps_per_epoch=4)["scheduler"]
    for step in range(20):
        groups = {g["name"]: g["lr"] for g in opt.param_groups}
        assert groups["head"] == pytest.approx(0.1 * 0.5 ** (step // 8))
        assert groups["stem"] == pytest.approx(0.1 * 0.5**5 * 0.5 ** (step // 8))
        opt.step()
        sched.step()


def test_plateau_schedule_decays_after_patience_validations_without_improvement():
    backbone = resnet()
    opt = build_optimizer({"name": "adamw", "lr": 0.1}, backbone, Classification(backbone, SPEC))
    sched = build_scheduler({"name": "plateau", "patience": 1, "gamma": 0.1, "mode": "max"}, opt, 100)["scheduler"]
    seen = []
    for value in [0.5, 0.6, 0.6, 0.55, 0.7, 0.7, 0.7]:
        sched.report(value)
        opt.step()
        sched.step()
        seen.append(opt.param_groups[0]["lr"])
    assert seen == pytest.approx([0.1, 0.1, 0.1, 0.01, 0.01, 0.01, 0.001])
    state = sched.state_dict()
    assert state["plateau_scale"] == pytest.approx(0.01) and state["best"] == 0.7  # resumable plain numbers


def test_plateau_decays_in_a_training_loop(cfg_factory, tmp_path):

    from lightning_modules.runtime.run import run

    metrics = run(
        cfg_factory(
            "finetune",
            "model=resnet_micro",
            "scheduler=plateau",
            "scheduler.patience=0",
            "optimizer.lr=1e-9",
            "trainer.max_epochs=3",
            "trainer.limit_train_batches=1",
            "trainer.limit_val_batches=1",
            "logger=csv",
        )
    )
    assert metrics["status"] == "ok"
