"""FSDP for real, on 2 CPU processes over gloo (``trainer=fsdp``: FSDP2 through Lightning's ModelParallelStrategy,
one unit per layer group): the same result as DDP on the same global batches, with a frozen group and gradual
unfreezing; full-state checkpoints of the sharded model resumed mid-epoch bit-identically; ``backbone/`` exported
as the whole, unsharded weights, equal to a DDP run's.

One pre-training serves every check (4 runs of 2 processes): MAE on ``vit_micro`` with ``freeze=gradual`` (the stem
and three blocks frozen at first, one more block unfrozen in each of the 3 epochs), ``last.ckpt`` every 4 steps.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.test_ddp import TINY, _max_difference, _script, _weights

COMMON = [
    *TINY,
    "logger=none",
    "objective=mae",
    "freeze=gradual",
    "freeze.start=1",
    "freeze.every=1",
    "trainer.max_epochs=3",  # 3 steps an epoch (debug=limit)
    "datamodule.batch_size=16",  # per process: a global batch of 32
    "datamodule.eval_batch_size=128",
    "callbacks.last_checkpoint.every_n_train_steps=4",  # steps 4 (mid-epoch 1) and 8
]
DDP = ["trainer=ddp"]
FSDP = ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fsdp")
    _script("pretrain", *COMMON, *DDP, f"hydra.run.dir={root / 'ddp'}")
    _script("pretrain", *COMMON, *FSDP, f"hydra.run.dir={root / 'fsdp'}")
    # The same FSDP run stopped right after its step-4 checkpoint (mid-epoch 1), then resumed in its run dir.
    stop = ["+callbacks.stop._target_=tests.helpers.StopAtStep", "+callbacks.stop.step=4"]
    _script("pretrain", *COMMON, *FSDP, *stop, f"hydra.run.dir={root / 'cut'}")
    shutil.copy(root / "cut" / "checkpoints" / "last.ckpt", root / "step4.ckpt")
    _script("pretrain", *COMMON, *FSDP, "ckpt_path=last", f"hydra.run.dir={root / 'cut'}")
    return root


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def _group_keys(run: Path) -> list[set[str]]:
    """The state-dict keys of each layer group of the run's backbone, input side first."""
    from lightning_modules.backbones.image import TimmBackbone

    model = yaml.safe_load((run / "config.yaml").read_text())["model"]
    backbone = TimmBackbone(model["name"], model["kwargs"])
    return [{f"backbone.model.{name}" for name in group.params} for group in backbone.layer_groups()]


@pytest.mark.slow
def test_fsdp_trains_as_ddp_does_on_the_same_global_batches(runs):
    ddp, fsdp = _metrics(runs / "ddp"), _metrics(runs / "fsdp")
    assert ddp["status"] == fsdp["status"] == "ok" and ddp["steps"] == fsdp["steps"] == 9
    for key in ("train/loss", "val/loss", "params/trainable", "params/trainable_start"):
        assert fsdp[key] == pytest.approx(ddp[key], rel=1e-5, abs=1e-6), key
    # The checkpoint holds whole tensors, as DDP's (the tolerance of tests/test_ddp.py; measured: 0.0).
    assert _max_difference(_weights(runs / "ddp"), _weights(runs / "fsdp")) < 5e-5


@pytest.mark.slow
def test_under_fsdp_frozen_groups_stay_frozen_and_an_unfrozen_group_trains(runs):
    groups = _group_keys(runs / "fsdp")  # stem, blocks.0 .. blocks.3(+norm): 5 groups
    step4 = torch.load(runs / "step4.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    step8 = torch.load(runs / "fsdp" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert step8["global_step"] == 8
    step8 = step8["state_dict"]

    def changed(keys):
        return any(not torch.equal(step4[k], step8[k]) for k in keys)

    # Epoch 2 (steps 6-8) trains the top three groups; the two below stay frozen through all 3 epochs, bit for bit.
    assert [changed(keys) for keys in groups] == [False, False, True, True, True]
    # blocks.1 was frozen up to step 6 (epochs 0 and 1), then trained: unfreezing reached the sharded parameters.
    ddp = _weights(runs / "ddp")
    for keys in groups[:2]:  # and the frozen groups are bit-identical to DDP's
        assert all(torch.equal(step8[k], ddp[k]) for k in keys)


@pytest.mark.slow
def test_a_sharded_run_resumed_from_its_full_state_checkpoint_ends_bit_identical(runs):
    cut = torch.load(runs / "step4.ckpt", map_location="cpu", weights_only=True)
    assert cut["global_step"] == 4 and set(cut["state_dict"]) == set(_weights(runs / "fsdp"))  # one whole file
    full, resumed = (torch.load(runs / d / "checkpoints" / "last.ckpt", weights_only=True) for d in ("fsdp", "cut"))
    for key, value in full["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key
    optimizer_a, optimizer_b = (ckpt["optimizer_states"][0] for ckpt in (full, resumed))
    assert optimizer_a["state"].keys() == optimizer_b["state"].keys()  # blocks.2's state, saved mid-epoch, kept
    for key, state in optimizer_a["state"].items():
        assert all(torch.equal(value, optimizer_b["state"][key][name]) for name, value in state.items()), key
    for group_a, group_b in zip(optimizer_a["param_groups"], optimizer_b["param_groups"], strict=True):
        assert {**group_a, "betas": list(group_a["betas"])} == {**group_b, "betas": list(group_b["betas"])}
    a, b = _metrics(runs / "fsdp"), _metrics(runs / "cut")
    for key in ("train/loss", "val/loss", "steps", "epochs"):
        assert b[key] == a[key], key


@pytest.mark.slow
def test_fsdp_exports_the_whole_backbone_equal_to_a_ddp_runs(runs):
    fsdp, ddp = (load_file(runs / d / "backbone" / "model.safetensors") for d in ("fsdp", "ddp"))
    checkpoint = _weights(runs / "fsdp")
    assert fsdp.keys() == ddp.keys() == {k.removeprefix("backbone.model.") for k in checkpoint if "backbone." in k}
    for name, tensor in fsdp.items():  # whole tensors, not a rank's shard
        assert tensor.shape == checkpoint[f"backbone.model.{name}"].shape, name
    # The weights after the last step (9; last.ckpt holds step 8), as DDP's (measured: 0.0 apart), heads included.
    assert _max_difference(fsdp, ddp) < 5e-5
    heads = [load_file(runs / d / "backbone" / "objective.safetensors") for d in ("fsdp", "ddp")]
    assert heads[0].keys() == heads[1].keys() and _max_difference(*heads) < 5e-5
