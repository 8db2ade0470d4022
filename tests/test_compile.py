"""model.compile=true compiles each graph once per run: an epoch after the first compiles nothing (train and eval
graphs are kept, a short last eval batch reuses the eval graph), a change of frozen groups compiles its new graph
once, and a resumed run compiles what a fresh run compiles for the same epochs.

Compilations are counted at dynamo's backend, which sees one call per graph it compiles; the graphs' calls are
counted too, so a run that silently fell back to eager (dynamo's recompile limit) would fail here. The backend is
aot_eager: dynamo and AOTAutograd as in a real run, no code generation (seconds instead of minutes on a CPU).
"""

from __future__ import annotations

import pytest
import torch
from pytorch_lightning.callbacks import Callback

from lightning_modules.runtime import run as run_module

COMMON = [
    "model=vit_micro",
    "model.compile=true",
    "datamodule.batch_size=32",
    "datamodule.eval_batch_size=100",  # 270 validation images: batches of 100, 100 and a short 70
    "trainer.limit_train_batches=3",
]
COUNTS = {"compiled": 0, "calls": 0}


def counting_backend(gm, example_inputs):
    COUNTS["compiled"] += 1
    compiled = torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    def call(*args):
        COUNTS["calls"] += 1
        return compiled(*args)

    return call


class PerEpoch(Callback):
    """Graphs compiled and graph calls made in each epoch (its training and its validation)."""

    log: list = []

    def on_train_epoch_start(self, trainer, pl_module):
        PerEpoch.log.append(dict(COUNTS))

    def on_fit_end(self, trainer, pl_module):
        PerEpoch.log.append(dict(COUNTS))


def _per_epoch():
    marks = PerEpoch.log
    return [
        (after["compiled"] - before["compiled"], after["calls"] - before["calls"])
        for before, after in zip(marks, marks[1:], strict=False)
    ]


@pytest.fixture
def counted(monkeypatch):
    monkeypatch.setattr(run_module, "COMPILE_OPTIONS", {"backend": counting_backend})
    PerEpoch.log = []
    return ["+callbacks.per_epoch._target_=tests.test_compile.PerEpoch"]


def test_steady_state_epochs_compile_nothing(cfg_factory, counted):
    metrics = run_module.run(cfg_factory("finetune", *COMMON, *counted, "freeze.layers=0", "trainer.max_epochs=3"))
    epochs = _per_epoch()
    first, rest = epochs[0], epochs[1:]
    assert first[0] >= 2, epochs  # the train graph and the eval graph (each with the graphs around any graph break)
    assert [compiled for compiled, _ in rest] == [0, 0]
    # 3 training steps and 3 eval batches of 100, 100, 70 every epoch, all through compiled graphs
    assert all(calls == first[1] and calls >= 6 for _, calls in rest)
    assert metrics["time/compile_s"] > 0


@pytest.mark.slow
def test_a_change_of_frozen_groups_compiles_once_and_resume_compiles_what_a_fresh_run_does(
    cfg_factory, tmp_path, counted
):
    lp_ft = ["freeze=lp_ft", "freeze.probe_epochs=1", "trainer.max_epochs=3"]  # all frozen, then all trainable
    run_module.run(cfg_factory("finetune", *COMMON, *counted, *lp_ft, name="full"))
    full = _per_epoch()
    compiled = [c for c, _ in full]
    assert compiled[0] > 0 and compiled[1] > 0  # a new frozen configuration: its train and eval graphs, once
    assert compiled[2] == 0  # nothing changed: nothing compiled
    # Stopped after epoch 1 and resumed (a fresh process: dynamo's caches are reset at each run's start): epoch 2
    # compiles its configuration's graphs once, as the uninterrupted run did when it reached it.
    cut = tmp_path / "cut"
    stop = ["+callbacks.stop._target_=tests.helpers.StopAfter", "+callbacks.stop.epochs=2"]
    run_module.run(cfg_factory("finetune", *COMMON, *lp_ft, *stop, name="cut"))
    PerEpoch.log = []
    run_module.run(cfg_factory("finetune", *COMMON, *counted, *lp_ft, f"ckpt_path={cut}", name="cut"))
    (resumed,) = _per_epoch()
    assert resumed == full[1] == (compiled[1], full[2][1])
