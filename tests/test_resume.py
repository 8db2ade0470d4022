"""A run stopped mid-way and resumed from its last checkpoint ends where an uninterrupted run ends."""

from __future__ import annotations

import pytest
import torch

from lightning_modules.runtime.run import run

COMMON = [
    "model=resnet_micro",
    "datamodule.label_fraction=0.2",
    "datamodule.batch_size=32",
    "trainer.max_epochs=4",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
]


def _weights(run_dir):
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return ckpt["state_dict"]


@pytest.mark.parametrize(
    "strategy",
    [
        ["freeze=gradual", "freeze.every=1"],
        ["freeze=lp_ft", "freeze.probe_epochs=2"],
        # adapters after a probe (LP-FT with LoRA); model/ left out (tests/test_lora.py writes it)
        ["freeze=lora", "freeze.rank=2", "freeze.probe_epochs=1", "finetune.export_model=false"],
    ],
    ids=["gradual", "lp_ft", "lora"],
)
def test_resumed_run_equals_uninterrupted(cfg_factory, tmp_path, strategy):
    full = run(cfg_factory("finetune", *COMMON, *strategy, name="full"))
    # The same run, stopped after epoch 2 (groups already unfrozen), then resumed from last.ckpt.
    run(
        cfg_factory(
            "finetune",
            *COMMON,
            *strategy,
            "+callbacks.stop._target_=tests.helpers.StopAfter",
            "+callbacks.stop.epochs=2",
            name="cut",
        )
    )
    resumed = run(
        cfg_factory(
            "finetune", *COMMON, *strategy, f"ckpt_path={tmp_path / 'cut' / 'checkpoints' / 'last.ckpt'}", name="cut"
        )
    )
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for key in ("train/loss", "val/acc", "test/acc", "params/trainable"):
        assert resumed[key] == full[key], key


def test_checkpoints_written_in_the_background_equal_those_written_in_line(cfg_factory, tmp_path):
    # The default trainer hands checkpoint writes to a thread (AsyncCheckpointIO) with a copy taken at the save;
    # training goes on meanwhile, so a copy taken late, or a file read before it was complete, would differ.
    two = [*COMMON, "trainer.max_epochs=2"]
    background = run(cfg_factory("finetune", *two, name="background"))
    in_line = run(cfg_factory("finetune", *two, "trainer.plugins=null", name="in_line"))
    assert background["test/acc"] == in_line["test/acc"]  # tested on best.ckpt, read right after fit
    for name in ("last.ckpt", "best.ckpt"):
        a, b = (
            torch.load(tmp_path / run_dir / "checkpoints" / name, map_location="cpu", weights_only=True)
            for run_dir in ("background", "in_line")
        )
        for key in a["state_dict"]:
            assert torch.equal(a["state_dict"][key], b["state_dict"][key]), (name, key)
        if name == "last.ckpt":  # the full checkpoint: the optimizer's state too
            optimizer_a, optimizer_b = (ckpt["optimizer_states"][0]["state"].values() for ckpt in (a, b))
            for state_a, state_b in zip(optimizer_a, optimizer_b, strict=True):
                assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


class _Exploit:
    """Unpickling this runs a shell command: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_checkpoint_is_refused_not_executed(cfg_factory, tmp_path):
    from lightning_modules.core.errors import ConfigError

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": _Exploit(marker)}, evil)
    with pytest.raises(ConfigError, match=r"ckpt_path=.*evil.ckpt: refused, not a plain-weights"):
        run(cfg_factory("finetune", *COMMON, f"ckpt_path={evil}"))
    assert not marker.exists()
    with pytest.raises(ConfigError, match="no such checkpoint file"):
        run(cfg_factory("finetune", *COMMON, f"ckpt_path={tmp_path / 'missing.ckpt'}"))


def test_same_seed_same_config_gives_the_same_metrics(cfg_factory):
    a = run(cfg_factory("finetune", *COMMON, name="a"))
    b = run(cfg_factory("finetune", *COMMON, name="b"))
    keys = [k for k in a if k.startswith(("train/", "val/", "test/"))]
    assert keys and all(a[k] == b[k] for k in keys)


def test_a_checkpoint_from_another_model_config_is_refused(cfg_factory, tmp_path):
    from lightning_modules.core.errors import ConfigError

    run(cfg_factory("finetune", *COMMON, "trainer.max_epochs=1", name="resnet"))
    ckpt = tmp_path / "resnet" / "checkpoints" / "last.ckpt"
    with pytest.raises(ConfigError, match=rf"ckpt_path={ckpt}: the checkpoint is from another model config \(missing"):
        run(cfg_factory("finetune", *COMMON, "model=vit_micro", f"ckpt_path={ckpt}", name="vit"))


KILLED = {
    # stage, overrides, the metrics that must come out equal
    "image": (
        "finetune",
        [*COMMON, "freeze=gradual", "freeze.every=1"],
        ("val/acc", "val/acc_best", "test/acc", "test/loss"),
    ),
    # MLM pre-training of bert_micro on the embedded corpus: masks and dropout are drawn from the seeded stream,
    # and the resumed process trains its tokenizer again (it must be the same one).
    "text": (
        "pretrain",
        ["datamodule=text_corpus", "objective=mlm", "model=bert_micro", *COMMON[2:]],
        ("val/loss", "val/acc", "val/perplexity"),
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(KILLED))
def test_a_run_killed_mid_epoch_resumes_to_the_uninterrupted_result(tmp_path, case):
    """A real training process SIGKILLed in the middle of an epoch, then relaunched in its run dir
    with ckpt_path=last, ends with the same weights and metrics as a run never interrupted."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    from tests.conftest import ROOT

    stage, overrides, compared = KILLED[case]
    args = [*overrides, "trainer.enable_progress_bar=false", "logger=csv"]

    def launch(run_dir, *extra):
        cmd = [sys.executable, f"scripts/{stage}.py", *args, *extra, f"hydra.run.dir={run_dir}"]
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    full = launch(tmp_path / "full")
    assert full.wait(timeout=600) == 0, full.stdout.read()[-2000:]

    marker = tmp_path / "mid-epoch"
    killed = launch(
        tmp_path / "cut",
        "+callbacks.pause._target_=tests.helpers.PauseAt",
        "+callbacks.pause.epoch=2",
        "+callbacks.pause.batch=1",
        f"+callbacks.pause.marker={marker}",
    )
    deadline = time.time() + 600
    while not marker.exists():
        assert killed.poll() is None and time.time() < deadline, "the run ended before it could be killed"
        time.sleep(0.2)
    os.kill(killed.pid, signal.SIGKILL)
    assert killed.wait(timeout=60) == -signal.SIGKILL
    assert not (tmp_path / "cut" / "metrics.json").exists()  # a killed run leaves no result behind

    resumed = launch(tmp_path / "cut", "ckpt_path=last")
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output[-2000:]
    # It continued from the end of epoch 1 rather than starting over (which, seeded, would end alike).
    assert f"Restoring states from the checkpoint path at {tmp_path / 'cut' / 'checkpoints' / 'last.ckpt'}" in output
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    full_metrics, resumed_metrics = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("full", "cut"))
    for key in ("train/loss", "val/loss", *compared, "steps"):
        assert resumed_metrics[key] == full_metrics[key], key


def test_a_run_resumed_from_a_mid_epoch_checkpoint_equals_the_uninterrupted_run(cfg_factory, tmp_path):
    # last.ckpt every 4 steps of 6-step epochs: step 8 is the third batch of epoch 1. Augmentation (torch RNG) and
    # mixup (numpy RNG) make every step's draws matter; the epoch's loss mean spans the cut; gradual unfreezing
    # has another group trainable in epoch 1 than in epoch 0 (Lightning skips the epoch's start on such a resume).
    common = [
        "model=resnet_micro",
        "datamodule.label_fraction=0.2",
        "datamodule.batch_size=32",
        "datamodule.train_batches_per_epoch=6",
        "objective.mixup=0.2",
        "freeze=gradual",
        "freeze.every=1",
        "trainer.max_epochs=2",
        "trainer.log_every_n_steps=3",
        "callbacks.last_checkpoint.every_n_train_steps=4",
    ]
    full = run(cfg_factory("finetune", *common, name="full"))
    run(
        cfg_factory(
            "finetune",
            *common,
            "+callbacks.stop._target_=tests.helpers.StopAtStep",
            "+callbacks.stop.step=8",
            name="cut",
        )
    )
    assert torch.load(tmp_path / "cut" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 8
    resumed = run(cfg_factory("finetune", *common, f"ckpt_path={tmp_path / 'cut'}", name="cut"))
    assert resumed["steps"] == full["steps"] == 12
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    for key in ("train/loss", "val/loss", "val/acc", "test/acc"):
        assert resumed[key] == full[key], key
