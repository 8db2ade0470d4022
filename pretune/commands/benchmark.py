#!/usr/bin/env python
"""pretune against a plain PyTorch loop: same model, data, batches, optimizer, schedule and steps.

    pretune bench                # the table; also outputs/bench/<timestamp>/bench.md
    pretune bench --tiny         # seconds: checks the benchmark itself (no timing worth reading)
    pretune bench --compare trainer.precision=bf16-mixed   # pretune vs pretune + overrides
    pretune bench --overhead "finetune: resnet_micro"     # pretune's extra ms a step, an epoch
    pretune bench --device cuda  # on a GPU: against a tuned hand loop, data on the device (~6 min)
    pretune bench --predict      # predict.py against the fine-tune's evaluation, same inputs
    pretune bench --lora         # only the LoRA table: freeze=lora against full fine-tuning

Each case runs the plain loop and pretune's real run path (``run(cfg)`` on the composed config, with the
default callbacks, CSV logger and progress bar) interleaved, ``--repeats`` times; the table shows medians.
steps/s counts optimizer steps over the fit loop: from the start of the first epoch to the end of the last,
so it includes each epoch's validation (and, for pretune, its checkpoints and logging) but not set-up.
Peak memory is the peak RSS above the RSS after imports, in a fresh process per case and loop.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import importlib.util
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from datetime import datetime
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # where pretune imports from: the checkout (or site-packages)
OUT = Path("outputs") / "bench"  # in the directory the command runs from

# What the run path needs, checked first: a machine set up for another project (a GPU box) answers in one line.
_NEEDED = ("torch", "hydra", "omegaconf", "pytorch_lightning", "timm", "torchmetrics", "sklearn", "safetensors", "yaml")
_MISSING = [name for name in _NEEDED if importlib.util.find_spec(name) is None]
if _MISSING:
    sys.exit(f"error: pretune bench needs {', '.join(_MISSING)} (not importable here); see docs/performance.md")

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.utils import get_class, instantiate  # noqa: E402
from omegaconf import DictConfig, OmegaConf, open_dict  # noqa: E402
from pytorch_lightning.callbacks import Callback  # noqa: E402

from lightning_modules.core.locations import CONF  # noqa: E402
from lightning_modules.runtime.cuda_check import runtime_cuda_check  # noqa: E402

# Text: batches of 64 as for digits and 19 of them an epoch (a pass over digits); MLM on 64-token blocks of the
# embedded corpus (no padding), fine-tuning on the embedded labeled task (texts padded per batch).
TEXT = ["datamodule.batch_size=64", "datamodule.train_batches_per_epoch=19"]
CASES = {
    "pretrain: MAE, vit_micro": ("pretrain", ["objective=mae", "model=vit_micro"]),
    "finetune: resnet_micro": ("finetune", ["model=resnet_micro"]),
    "finetune: vit_micro": ("finetune", ["model=vit_micro"]),
    "pretrain: MLM, bert_micro": ("pretrain", ["datamodule=text_corpus", "objective=mlm", "model=bert_micro", *TEXT]),
    "finetune: bert_micro, text": ("finetune", ["datamodule=text_classification", "model=bert_micro", *TEXT]),
}
COMMON = ["datamodule=digits", "trainer.accelerator=cpu"]  # a case's own datamodule= comes later and wins


def _now(device: torch.device | None = None) -> float:
    """Wall-clock time once the device's queued work is done (a GPU runs behind the host)."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.time()


class Clock(Callback):
    """Wall-clock times of the fit loop and its epochs (and the last training loss), written to ``path`` as JSON.
    On a GPU each mark waits for the queued work: once an epoch, not per step."""

    def __init__(self, path: str):
        self.path, self.times, self.loss = path, {"created": time.time(), "epochs": []}, None

    def on_train_start(self, trainer, pl_module):
        self.times.update(train_start=_now(pl_module.device), cpu_start=time.process_time())

    def on_train_epoch_start(self, trainer, pl_module):
        self.times["epochs"].append(_now(pl_module.device))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.times.setdefault("first_step", time.time())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.times.setdefault("first_step_end", time.time())
        self.loss = outputs["loss"].detach()  # no .item() here: the clock must not add a sync per step

    def on_train_end(self, trainer, pl_module):
        self.times.update(train_end=_now(pl_module.device), cpu_end=time.process_time())
        out = dict(self.times, steps=trainer.global_step, loss=float(self.loss))
        Path(self.path).write_text(json.dumps(out))


def _scratch() -> Path:
    """A temporary directory for run outputs (checkpoints, logs), removed when the process exits."""
    path = tempfile.mkdtemp(prefix="pretune-bench-")
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return Path(path)


def make_cfg(stage: str, overrides: list[str], out_dir: Path) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=stage, overrides=COMMON + overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out_dir)
    return cfg


def pretune_run(cfg: DictConfig) -> dict:
    """pretune's real run path, with a ``Clock`` added to the configured callbacks."""
    from lightning_modules.runtime.run import run  # loads torch where the benchmark times it

    clock = Path(cfg.paths.output_dir) / "clock.json"
    with open_dict(cfg):
        cfg.callbacks = cfg.get("callbacks") or {}
        cfg.callbacks.bench_clock = {"_target_": f"{__name__}.Clock", "path": str(clock)}
    start = time.time()
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), contextlib.redirect_stderr(null):
        metrics = run(cfg)  # the progress bar still draws, into /dev/null
    return dict(json.loads(clock.read_text()), start=start, metrics=metrics)


def plain_run(cfg: DictConfig, compile_options: dict | None = None) -> dict:
    """What one writes by hand: the same model, data, batches and optimizer, a bare loop, validation each epoch.

    On a GPU (``trainer.accelerator=gpu``) it is a tuned hand loop: the splits on the device (indexed there),
    bf16 autocast as ``trainer.precision`` says, fused AdamW, TF32 matmuls, channels-last for CNNs, and
    ``torch.compile`` of the forward with ``compile_options`` (None: eager)."""
    from datamodules.loading.in_memory import BatchLoader  # loads torch where the benchmark times it
    from lightning_modules.objectives.base import build_objective  # loads torch where the benchmark times it
    from lightning_modules.runtime.run import matmul_precision  # loads torch where the benchmark times it
    from lightning_modules.training.module import use_channels_last  # loads torch where the benchmark times it
    from lightning_modules.training.optim import build_optimizer, build_scheduler  # torch-bearing

    start = time.time()
    device = torch.device("cuda" if cfg.trainer.accelerator in ("gpu", "cuda") else "cpu")
    torch.set_float32_matmul_precision(
        matmul_precision(cfg.get("float32_matmul_precision", "auto"), cfg.trainer.accelerator)
    )
    torch.manual_seed(cfg.seed)  # as run(): seed, data, backbone, objective, so the initial weights are the same
    dm, backbone = _data_and_backbone(cfg)
    if hasattr(dm, "place"):  # in-memory images: on the accelerator once, as run() does
        dm.place(device)
    objective = build_objective(cfg.objective, backbone, dm.spec)
    channels_last = use_channels_last(cfg.model.get("channels_last", "auto"), backbone, device)

    class Model(torch.nn.Module):  # the forward pretune compiles: backbone + objective, loss included
        def __init__(self):
            super().__init__()
            self.backbone, self.objective = backbone, objective

        def forward(self, batch):
            if channels_last:
                batch = dict(batch, image=batch["image"].contiguous(memory_format=torch.channels_last))
            return self.objective(self.backbone, batch)

    model = Model().to(device)
    if channels_last:
        backbone.to(memory_format=torch.channels_last)
    if compile_options is not None:
        torch._dynamo.reset()  # as pretune does at a run's start: no earlier run's graphs in the caches
    forward = model if compile_options is None else torch.compile(model, **compile_options)
    optimizer = build_optimizer(OmegaConf.to_container(cfg.optimizer, resolve=True), backbone, objective)
    bf16 = str(cfg.trainer.precision).startswith("bf16")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    epochs, epoch = cfg.trainer.max_epochs, 0
    if dm.modality == "text":  # the datamodule's loader (padding per batch), told the epoch as Lightning would
        dm.epoch = lambda: epoch
        train = dm.train_dataloader()
    else:
        train = BatchLoader(
            dm.splits["train"],
            dm.batch_size,
            True,
            True,
            dm.label_seed,
            lambda: epoch,
            dm.train_batches_per_epoch,
            transform=dm.decode,
            **dm.batch_device(),
        )
    augment = getattr(dm, "augment", None)  # image sources augment whole batches; text has nothing to augment
    total = epochs * len(train)
    schedule = build_scheduler(OmegaConf.to_container(cfg.scheduler, resolve=True), optimizer, total, len(train))
    scheduler = schedule["scheduler"]
    compiled_before = _compile_seconds()
    times = {"train_start": _now(device), "cpu_start": time.process_time(), "epochs": []}
    with runtime_cuda_check(device.type == "cpu"):  # as in a process that never imported Lightning
        for epoch in range(epochs):
            times["epochs"].append(_now(device))
            torch.manual_seed(cfg.seed * 10_007 + epoch)  # pretune's per-epoch seeding, so the draws match
            model.train()
            for batch in train:
                times.setdefault("first_step", time.time())
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}  # placed already: no-op
                if augment is not None:
                    batch = dict(batch, image=augment(batch["image"]))
                with autocast:
                    loss = forward(batch)["loss"]
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                times.setdefault("first_step_end", time.time())
            model.eval()
            with torch.no_grad(), autocast:
                for batch in dm.val_dataloader():
                    out = forward(batch)
                    if "logits" in out:
                        (out["logits"].argmax(-1) == out["target"]).float().mean()
    times.update(train_end=_now(device), cpu_end=time.process_time())
    times["compile_s"] = _compile_seconds() - compiled_before
    return dict(times, start=start, steps=total, loss=float(loss.detach()))


def _compile_seconds() -> float:
    from torch._dynamo.utils import calculate_time_spent

    return calculate_time_spent().get("total_wall_time", 0.0)


def _data_and_backbone(cfg: DictConfig):
    """The datamodule, set up, and the backbone, built in run()'s order: a text backbone from scratch trains its
    tokenizer on the data's texts and hands it to the datamodule before ``setup`` tokenizes."""
    from lightning_modules.backbones.factory import build_backbone  # loads torch where the benchmark times it

    dm = instantiate(cfg.datamodule, labeled=cfg.stage == "finetune")
    backbone = build_backbone(OmegaConf.to_container(cfg.model, resolve=True), data=dm)
    dm.use_backbone(backbone)
    dm.setup("fit")
    return dm, backbone


def loader_rate(cfg: DictConfig, batches: int) -> float:
    """Training batches per second from the datamodule's train loader plus its batch augmentation (text: the
    padding of each batch to its longest text, in the loader), no model."""
    dm = _data_and_backbone(cfg)[0]
    loader, n = dm.train_dataloader(), 0
    augment = getattr(dm, "augment", None)
    start = time.perf_counter()
    while n < batches:
        for batch in loader:
            if augment is not None:
                augment(batch["image"])
            n += 1
    return n / (time.perf_counter() - start)


def loader_options(batches: int = 300) -> list[tuple[str, float, float]]:
    """The in-memory loader against torch's DataLoader over the same tensors with worker processes:
    (name, seconds to the first batch, batches/s after it), augmentation excluded."""
    from torch.utils.data import BatchSampler, DataLoader, RandomSampler

    dm = instantiate(make_cfg("finetune", [], _scratch()).datamodule)
    dm.setup("fit")
    data = dm.decode(dm.splits["train"])  # float32, as the workers would hand them over

    class Batches(torch.utils.data.Dataset):  # one item = one whole batch, indexed from the tensors
        def __len__(self):
            return len(data["image"])

        def __getitem__(self, idx):
            return {k: v[idx] for k, v in data.items()}

    sampler = BatchSampler(RandomSampler(range(len(Batches()))), dm.batch_size, drop_last=True)
    options = [("in-memory BatchLoader (pretune's)", lambda: dm.train_dataloader())]
    for workers, persistent in ((0, False), (1, False), (2, False), (2, True)):
        kw = {"num_workers": workers, "persistent_workers": persistent, "batch_size": None, "sampler": sampler}
        options.append(
            (f"DataLoader, num_workers={workers}, persistent={persistent}", lambda kw=kw: DataLoader(Batches(), **kw))
        )
    rows = []
    for name, make in options:
        loader, n = make(), 0
        start = time.perf_counter()
        first = None
        while n < batches:
            for _ in loader:
                first = first or time.perf_counter()
                n += 1
        rows.append((name, first - start, (n - 1) / (time.perf_counter() - first)))
    return rows


def steps_per_s(r: dict) -> float:
    return r["steps"] / (r["train_end"] - r["train_start"])


def steps_per_cpu_s(r: dict) -> float:
    """Steps per second of this process's CPU time (all its threads): far less noisy on shared cores."""
    return r["steps"] / (r["cpu_end"] - r["cpu_start"])


def _rss_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def memory_child(case: str, loop: str, overrides: list[str]) -> None:
    """In a fresh process: peak RSS above the RSS after imports, in MB (printed as JSON)."""
    import lightning_modules.runtime.run  # noqa: F401  (everything either loop imports, before the baseline) (torch)

    stage, extra = CASES[case]
    cfg = make_cfg(stage, extra + overrides, _scratch())
    base = _rss_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
    (plain_run if loop == "plain" else pretune_run)(cfg)
    print(json.dumps({"peak_mb": (_rss_kb("VmHWM") - base) / 1024}))


def peak_memory_mb(case: str, loop: str, overrides: list[str]) -> float:
    cmd = [sys.executable, "-m", __name__, "--memory-child", case, loop, *overrides]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mb"]


def startup(tmp: Path) -> list[tuple[str, float]]:
    """Seconds for the command line to answer, and from the command to pretune's first training step."""
    script = [sys.executable, "-m", "pretune.commands.finetune"]
    rows = []
    for name, args in [
        ("", ["--help"]),
        ("", ["--cfg", "job"]),
        (" (config error)", ["optimizer.lr=-1"]),
        (" (unknown key)", ["foo=1"]),
    ]:
        runs = []
        for _ in range(3):
            start = time.time()
            subprocess.run(script + args, cwd=ROOT, capture_output=True)
            runs.append(time.time() - start)
        rows.append((f"`finetune.py {' '.join(args)}`{name}", statistics.median(runs)))
    clock = tmp / "startup_clock.json"
    start = time.time()
    subprocess.run(
        script
        + COMMON
        + [
            f"hydra.run.dir={tmp / 'startup'}",
            "trainer.max_steps=1",
            "+callbacks.bench_clock._target_=pretune.commands.benchmark.Clock",
            f"+callbacks.bench_clock.path={clock}",
        ],
        cwd=ROOT,
        capture_output=True,
        check=True,
    )
    t = json.loads(clock.read_text())
    rows += [
        ("`finetune.py` to first training step, total", t["first_step"] - start),
        ("  of which: interpreter, imports, config, data, model", t["created"] - start),
        ("  of which: trainer, logger, fit set-up", t["first_step"] - t["created"]),
        ("  first step itself", t["first_step_end"] - t["first_step"]),
    ]
    return rows


def _median(values) -> float:
    return statistics.median(values)


LOOPS = (("plain", plain_run), ("pretune", pretune_run))


def _alternate(pair: tuple, repeat: int) -> tuple:
    """The pair in its order on even repeats, reversed on odd ones: neither side always goes first (no order
    bias). The caller collects garbage before each run, so neither pays for the other's."""
    return pair if repeat % 2 == 0 else pair[::-1]


def _paired_runs(stage: str, overrides: list[str], variants: tuple, repeats: int, tmp: Path) -> dict[str, list]:
    """pretune's run path under each of two (name, extra overrides) variants, ``repeats`` times, interleaved."""
    runs = {name: [] for name, _ in variants}
    for r in range(repeats):
        for name, more in _alternate(variants, r):
            gc.collect()
            runs[name].append(pretune_run(make_cfg(stage, overrides + more, tmp / f"{name}-{r}")))
    return runs


def _speed_ratio(a: list[dict], b: list[dict]) -> float:
    """Median over interleaved pairs of b's steps/s over a's."""
    return _median(steps_per_s(y) / steps_per_s(x) for x, y in zip(a, b, strict=True))


def _to_first_step(r: dict) -> float:
    """Seconds from the run's start to the end of its first optimizer step (set-up, and compilation if any)."""
    return r["first_step_end"] - r["start"]


def benchmark(
    epochs: int = 3,
    repeats: int = 5,
    batches_per_epoch: int | None = None,
    memory: bool = True,
    with_startup: bool = True,
    overrides: list[str] | None = None,
    out_root: Path = OUT,
    cases: list[str] | None = None,
) -> Path:
    """The CASES (``cases``: those whose name contains one of these words) in both loops, interleaved."""
    selected = {c: v for c, v in CASES.items() if not cases or any(word in c for word in cases)}
    if not selected:
        sys.exit(f"error: --cases {' '.join(cases)}: no case matches; the cases are {', '.join(CASES)}")
    overrides = [f"trainer.max_epochs={epochs}", *(overrides or [])]
    if batches_per_epoch:
        overrides.append(f"datamodule.train_batches_per_epoch={batches_per_epoch}")
    out_dir = out_root / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    tmp = _scratch()
    results = {case: {"plain": [], "pretune": []} for case in selected}
    plain_run(make_cfg("finetune", ["trainer.max_epochs=1", "datamodule.train_batches_per_epoch=2"], tmp / "w"))
    for r in range(repeats):
        for i, (case, (stage, extra)) in enumerate(selected.items()):
            for loop, fn in _alternate(LOOPS, r):
                cfg = make_cfg(stage, extra + overrides, tmp / f"case{i}-{loop}-{r}")
                gc.collect()
                results[case][loop].append(fn(cfg))
    lines = [
        f"pretune vs a plain PyTorch loop, {epochs} epochs (batch 64, {batches_per_epoch or 19} batches an epoch;"
        " images: digits; text: the embedded corpus and labeled task), CPU,"
        f" {torch.get_num_threads()} threads, median of {repeats} interleaved runs."
        f" `pretune bench {' '.join(sys.argv[1:])}`".rstrip(),
        "",
        "| case | steps | plain steps/s | pretune steps/s | pretune / plain | same, CPU time | plain peak MB"
        " | pretune peak MB | memory pretune / plain | loader batches/s | loader / pretune steps"
        " | final loss plain / pretune |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for case, (stage, extra) in selected.items():
        plain, pre = results[case]["plain"], results[case]["pretune"]
        ratio = _speed_ratio(plain, pre)
        cpu_ratio = _median(steps_per_cpu_s(b) / steps_per_cpu_s(a) for a, b in zip(plain, pre, strict=True))
        cfg = make_cfg(stage, extra + overrides, tmp / "loader")
        loader = loader_rate(cfg, batches=200 if repeats > 1 else 20)
        pre_rate = _median(map(steps_per_s, pre))
        if memory:
            mem = [peak_memory_mb(case, loop, extra + overrides) for loop in ("plain", "pretune")]
            mem_cells = f"{mem[0]:.0f} | {mem[1]:.0f} | {mem[1] / mem[0]:.2f}"
        else:
            mem_cells = "– | – | –"  # a fresh process per cell: seconds each
        lines.append(
            f"| {case} | {plain[-1]['steps']} | {_median(map(steps_per_s, plain)):.1f} | {pre_rate:.1f}"
            f" | **{ratio:.3f}** | {cpu_ratio:.3f} | {mem_cells} | {loader:.0f} | {loader / pre_rate:.0f}×"
            f" | {plain[-1]['loss']:.4f} / {pre[-1]['loss']:.4f} |"
        )
    lines += [
        "",
        "steps/s: optimizer steps over the fit loop, first epoch start to last epoch end (validation each epoch"
        " included, set-up excluded); CPU time: the same over this process's CPU seconds (all threads), which"
        " shared cores disturb less. Peak MB: peak RSS above the RSS after imports, fresh process per cell."
        " loader: the train loader plus its batch augmentation, no model.",
    ]
    setup = [r["first_step"] - r["start"] for case in selected for r in results[case]["pretune"]]
    plain_setup = [r["first_step"] - r["start"] for case in selected for r in results[case]["plain"]]
    lines.append(
        f"In-process set-up to the first step (median over cases): pretune {_median(setup):.2f} s,"
        f" plain {_median(plain_setup):.2f} s."
    )
    if with_startup:
        lines += ["", "| command line (median of 3; first step: one run) | seconds |", "|---|---:|"]
        lines += [f"| {name} | {sec:.2f} |" for name, sec in startup(tmp)]
    table = "\n".join(lines) + "\n"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.md").write_text(table)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print(table + f"\nwritten to {out_dir / 'bench.md'}")
    return out_dir / "bench.md"


def compare(variant: list[str], epochs: int, repeats: int, out_root: Path = OUT) -> Path:
    """pretune as configured against pretune plus ``variant`` overrides: speed, compile/first-step cost, result."""
    tmp = _scratch()
    base = [f"trainer.max_epochs={epochs}"]
    lines = [
        f"pretune vs pretune + `{' '.join(variant)}`, {epochs} epochs of digits, CPU, {torch.get_num_threads()}"
        f" threads, median of {repeats} interleaved runs.",
        "",
        "| case | default steps/s | variant steps/s | variant / default | extra s before the first step end"
        " | default val metric / test acc | variant val metric / test acc |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for i, (case, (stage, extra)) in enumerate(CASES.items()):
        runs = _paired_runs(stage, extra + base, (("default", []), ("variant", variant)), repeats, tmp / f"case{i}")
        a, b = runs["default"], runs["variant"]
        ratio = _speed_ratio(a, b)
        delay = _median(_to_first_step(y) - _to_first_step(x) for x, y in zip(a, b, strict=True))

        def result(r):
            m = r["metrics"]
            return f"{m.get('val/acc', m.get('val/loss')):.4f} / {m.get('test/acc', float('nan')):.4f}"

        lines.append(
            f"| {case} | {_median(map(steps_per_s, a)):.1f} | {_median(map(steps_per_s, b)):.1f} | **{ratio:.3f}**"
            f" | {delay:.1f} | {result(a[-1])} | {result(b[-1])} |"
        )
    table = "\n".join(lines) + "\n"
    out_dir = out_root / (datetime.now().strftime("%Y-%m-%d_%H-%M-%S") + "_compare")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.md").write_text(table)
    print(table + f"\nwritten to {out_dir / 'bench.md'}")
    return out_dir / "bench.md"


# freeze=lora (peft's LoRA adapters on the frozen backbone) against full fine-tuning of the same backbone.
LORA_CASES = ("finetune: vit_micro", "finetune: bert_micro, text")
LORA = ["freeze=lora"]


def lora_benchmark(
    epochs: int = 3,
    repeats: int = 3,
    batches_per_epoch: int | None = None,
    memory: bool = True,
    cases: tuple[str, ...] = LORA_CASES,
    out_root: Path = OUT,
) -> Path:
    """pretune's run path with ``freeze=lora`` against the same with every parameter trained (``freeze=none``),
    interleaved: steps/s, peak memory, trainable parameters and the test accuracy each reached."""
    overrides = [f"trainer.max_epochs={epochs}"]
    if batches_per_epoch:
        overrides.append(f"datamodule.train_batches_per_epoch={batches_per_epoch}")
    tmp = _scratch()
    lines = [
        f"freeze=lora (rank 8, targets=auto) against full fine-tuning (freeze=none) of the same backbone, {epochs}"
        f" epochs, CPU, {torch.get_num_threads()} threads, median of {repeats} interleaved runs of pretune's run path.",
        "",
        "| case | full steps/s | LoRA steps/s | LoRA / full | full peak MB | LoRA peak MB | memory LoRA / full"
        " | trainable full / LoRA | test acc full / LoRA |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    variants = (("full", ["freeze=none"]), ("lora", LORA))
    for i, case in enumerate(cases):
        stage, extra = CASES[case]
        runs = _paired_runs(stage, extra + overrides, variants, repeats, tmp / f"lora{i}")
        full, lora = runs["full"], runs["lora"]
        ratio = _speed_ratio(full, lora)
        mem_cells = "– | – | –"
        if memory:
            mem = [peak_memory_mb(case, "pretune", extra + overrides + more) for _, more in variants]
            mem_cells = f"{mem[0]:.0f} | {mem[1]:.0f} | **{mem[1] / mem[0]:.2f}**"
        m_full, m_lora = full[-1]["metrics"], lora[-1]["metrics"]
        lines.append(
            f"| {case} | {_median(map(steps_per_s, full)):.1f} | {_median(map(steps_per_s, lora)):.1f}"
            f" | **{ratio:.3f}** | {mem_cells} | {m_full['params/trainable']:,} / {m_lora['params/trainable']:,}"
            f" | {m_full.get('test/acc', float('nan')):.4f} / {m_lora.get('test/acc', float('nan')):.4f} |"
        )
    lines += [
        "",
        "steps/s as in the main table (fit loop, validation included); peak MB: peak RSS above the RSS after imports,"
        " a fresh process per cell. Trainable: parameters of backbone and head.",
    ]
    table = "\n".join(lines) + "\n"
    out_dir = out_root / (datetime.now().strftime("%Y-%m-%d_%H-%M-%S") + "_lora")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.md").write_text(table)
    print(table + f"\nwritten to {out_dir / 'bench.md'}")
    return out_dir / "bench.md"


def overhead(case: str, repeats: int, epochs: int = 4, overrides: tuple[str, ...] = ()) -> list[str]:
    """Where pretune's extra time goes: per step (medians over all steps, robust to this machine's noise) and per
    epoch (the rest of the fit time: validation, checkpoints, logging), pretune and the plain loop interleaved.
    Steps are timed from one batch's augmentation end to the next one's, with the objective's forward and the
    backward timed inside: both loops call these same functions, so the segments compare like for like."""
    from datamodules.transforms.augment import BatchAugment  # loads torch where the benchmark times it

    marks: dict[str, list[float]] = {}

    def timed(owner, name, start, end):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            on = torch.is_grad_enabled()  # training only, not validation
            if on:
                marks.setdefault(start, []).append(time.perf_counter())
            out = original(*args, **kwargs)
            if on:
                marks.setdefault(end, []).append(time.perf_counter())
            return out

        setattr(owner, name, wrapper)
        return original

    stage, extra = CASES[case]
    if any(o.startswith("datamodule=text") for o in extra):
        raise SystemExit(f"--overhead times steps between batch augmentations, which a text case has not: {case!r}")
    objective_cls = get_class(make_cfg(stage, extra, _scratch()).objective._target_)
    originals = [
        (BatchAugment, "forward", timed(BatchAugment, "forward", "aug0", "aug1")),
        (objective_cls, "forward", timed(objective_cls, "forward", "f0", "f1")),
        (torch.Tensor, "backward", timed(torch.Tensor, "backward", "b0", "b1")),
    ]
    rows = {"plain": [], "pretune": []}
    try:
        for r in range(repeats):
            for loop, fn in _alternate(LOOPS, r):
                marks.clear()
                gc.collect()
                cfg = make_cfg(stage, [*extra, f"trainer.max_epochs={epochs}", *overrides], _scratch() / f"{loop}{r}")
                out = fn(cfg)
                n = len(marks["aug1"]) - 1
                fwd = _median(marks["f1"][i] - marks["f0"][i] for i in range(n))
                bwd = _median(marks["b1"][i] - marks["b0"][i] for i in range(n))
                step = _median(marks["aug1"][i + 1] - marks["aug1"][i] for i in range(n))
                per_epoch = (out["train_end"] - out["train_start"] - out["steps"] * step) / epochs
                rows[loop].append((fwd, bwd, step - fwd - bwd, step, per_epoch))
    finally:
        for owner, name, original in originals:
            setattr(owner, name, original)
    names = ["forward", "backward", "rest of the step", "step", "per epoch beyond its steps"]
    lines = [
        f"{case}, {epochs} epochs, medians of {repeats} interleaved runs (ms):",
        "",
        "| | plain | pretune | pretune - plain |",
        "|---|---:|---:|---:|",
    ]
    for j, name in enumerate(names):
        a, b = (_median(row[j] for row in rows[loop]) * 1e3 for loop in ("plain", "pretune"))
        lines.append(f"| {name} | {a:.2f} | {b:.2f} | {b - a:+.2f} |")
    print("\n".join(lines))
    return lines


# --- on a GPU: pretune against a tuned hand loop whose data sit on the device --------------------------------

GPU_DATA = [  # every case; each brings its data below
    "datamodule.batch_size=256",
    "datamodule.eval_batch_size=512",
    "datamodule.train_batches_per_epoch=30",
    "trainer=gpu",  # bf16-mixed
    "trainer.max_epochs=3",
    "logger=csv",
]
# 1,797 real 8x8 digits, upscaled on the device per batch (stored as uint8)
IMAGES = ["datamodule=digits", "datamodule.image_size=224"]
VIT_S, R50 = [*IMAGES, "model=timm", "model.name=vit_small_patch16_224"], [*IMAGES, "model=timm", "model.name=resnet50"]
# MLM on the embedded corpus, 128-token blocks, a BERT the size of all-MiniLM-L6-v2 (6 layers, 384 wide, ~22 M)
MLM_MINILM_SIZE = ["datamodule=text_corpus", "datamodule.max_length=128", "objective=mlm", "model=bert_micro"]
MLM_MINILM_SIZE += ["model.layers=6", "model.hidden=384", "model.heads=12", "model.intermediate=1536"]
MLM_MINILM_SIZE += ["model.vocab_size=8000"]
# case: (stage, overrides, compiled)
GPU_CASES = {
    "fine-tune vit_small_patch16_224": ("finetune", VIT_S, False),
    "fine-tune resnet50 (channels-last)": ("finetune", R50, False),
    "MAE pre-train vit_small_patch16_224": ("pretrain", ["objective=mae", *VIT_S], False),
    "MLM pre-train, BERT 6x384 (text, 128 tokens)": ("pretrain", MLM_MINILM_SIZE, False),
    "fine-tune vit_small_patch16_224, compiled": ("finetune", VIT_S, True),
    "MAE pre-train vit_small_patch16_224, compiled": ("pretrain", ["objective=mae", *VIT_S], True),
}
# freeze=lora against full fine-tuning (freeze=none) of the same backbone on the device, pretune's run path both times
GPU_LORA = {"vit_small_patch16_224": ("finetune", VIT_S)}
# --tiny: the same logic on the CPU in seconds (tiny models, 32 px, fp32; compiled with aot_eager, no codegen).
TINY_DATA = [
    "datamodule.batch_size=16",
    "datamodule.train_batches_per_epoch=3",
    "trainer.accelerator=cpu",
    "trainer.max_epochs=2",
    "logger=csv",
]
TINY_CASES = {
    "fine-tune vit_micro": ("finetune", ["datamodule=digits", "model=vit_micro"], False),
    "fine-tune resnet_micro": ("finetune", ["datamodule=digits", "model=resnet_micro"], False),
    "MAE pre-train vit_micro": ("pretrain", ["datamodule=digits", "objective=mae", "model=vit_micro"], False),
    "MLM pre-train bert_micro (text)": (
        "pretrain",
        ["datamodule=text_corpus", "objective=mlm", "model=bert_micro"],
        False,
    ),
    "fine-tune vit_micro, compiled": ("finetune", ["datamodule=digits", "model=vit_micro"], True),
}
TINY_LORA = {"vit_micro": ("finetune", ["datamodule=digits", "model=vit_micro"])}


def gpu_cfg(stage: str, overrides: list[str], out_dir: Path, tiny: bool) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=stage, overrides=(TINY_DATA if tiny else GPU_DATA) + overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out_dir)
    return cfg


class SyncCount(Callback):
    """Host syncs in the steady-state training steps of epoch 1 (from its second batch to its validation), counted
    with torch.cuda.set_sync_debug_mode("warn"), with where each one came from."""

    def __init__(self):
        self.steps, self.syncs, self._recording = 0, [], None

    def _stop(self):
        if self._recording is not None:
            torch.cuda.set_sync_debug_mode(0)
            caught = [w for w in self._recording[1] if "synchroniz" in str(w.message)]
            self.syncs += [str(w.message).splitlines()[0] + " @ " + _caller(w) for w in caught]
            self._recording[0].__exit__(None, None, None)
            self._recording = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == 1 and batch_idx >= 1 and pl_module.device.type == "cuda":
            if self._recording is None:
                catcher = warnings.catch_warnings(record=True)
                self._recording = (catcher, catcher.__enter__())
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
            self.steps += 1

    def on_validation_start(self, trainer, pl_module):
        self._stop()

    def on_train_epoch_end(self, trainer, pl_module):
        self._stop()


def _caller(w) -> str:
    return f"{Path(w.filename).name}:{w.lineno}"


def _steady(r: dict, images_per_step: int, steps_per_epoch: int) -> float:
    """Images per second over the epochs after the first (compilation and warm-up excluded), validation included."""
    marks = [*r["epochs"], r["train_end"]]
    return images_per_step * steps_per_epoch * (len(marks) - 2) / (marks[-1] - marks[1])


def flops_per_image(cfg: DictConfig, device: torch.device) -> float:
    """Training FLOPs per sample, an image or a text (one forward and backward of backbone + objective, as torch
    counts them)."""
    from torch.utils.flop_counter import FlopCounterMode

    from lightning_modules.objectives.base import build_objective  # loads torch where the benchmark times it

    dm, backbone = _data_and_backbone(cfg)
    if hasattr(dm, "place"):
        dm.place(device)
    objective = build_objective(cfg.objective, backbone, dm.spec)
    model = torch.nn.ModuleList([backbone, objective]).to(device)
    batch = next(iter(dm.train_dataloader()))
    batch = {k: v.to(device) for k, v in batch.items()}
    bf16 = str(cfg.trainer.precision).startswith("bf16")
    with FlopCounterMode(display=False) as counter:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = objective(backbone, batch)["loss"]
        loss.backward()
    del model
    return counter.get_total_flops() / len(next(iter(batch.values())))


def matmul_peak_tflops(device: torch.device, tiny: bool) -> float:
    """The device's measured dense matmul rate (bf16 on a GPU), the ceiling MFU is quoted against."""
    n, dtype = (512, torch.float32) if tiny else (8192, torch.bfloat16)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    reps = 3 if tiny else 50
    start = _now(device)
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (_now(device) - start) / 1e12


def _timed_checkpoints():
    """Patch Trainer.save_checkpoint to add up the training thread's time in it (and count the saves)."""
    import pytorch_lightning as pl

    spent = {"s": 0.0, "n": 0}
    original = pl.Trainer.save_checkpoint

    def save_checkpoint(self, *args, **kwargs):
        start = _now(self.strategy.root_device)
        out = original(self, *args, **kwargs)
        spent["s"] += _now(self.strategy.root_device) - start
        spent["n"] += 1
        return out

    pl.Trainer.save_checkpoint = save_checkpoint
    return spent, lambda: setattr(pl.Trainer, "save_checkpoint", original)


def gpu_pretune_run(cfg: DictConfig) -> dict:
    """pretune's run path with a Clock, the sync counter and the checkpoint timer; peak memory of the device."""
    device = torch.device("cuda" if cfg.trainer.accelerator in ("gpu", "cuda") else "cpu")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    counter = SyncCount()
    with open_dict(cfg):
        cfg.callbacks = cfg.get("callbacks") or {}
        cfg.callbacks.bench_syncs = {"_target_": f"{__name__}._the_sync_counter"}
    _SYNC_COUNTER[0] = counter
    spent, restore = _timed_checkpoints()
    try:
        out = pretune_run(cfg)
    finally:
        restore()
    ckpts = Path(cfg.paths.output_dir) / "checkpoints"
    out.update(
        syncs=counter.syncs,
        sync_steps=counter.steps,
        checkpoint_s=spent["s"],
        checkpoints=spent["n"],
        checkpoint_mb=sum(f.stat().st_size for f in ckpts.glob("*.ckpt")) / 2**20 if ckpts.is_dir() else 0.0,
        compile_s=out["metrics"].get("time/compile_s", 0.0),
        peak_gb=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan"),
    )
    return out


_SYNC_COUNTER: list = [None]


def _the_sync_counter():
    return _SYNC_COUNTER[0]


def gpu_plain_run(cfg: DictConfig, compile_options: dict | None) -> dict:
    device = torch.device("cuda" if cfg.trainer.accelerator in ("gpu", "cuda") else "cpu")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    out = plain_run(cfg, compile_options)
    out["peak_gb"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return out


def _fresh_device(device: torch.device) -> None:
    """What the last run left, freed before the next one is measured (its peak memory is its own)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _fit_rate(r: dict, samples: int) -> float:
    """Samples per second over the fit loop, validation (and compilation) included."""
    return samples / (r["train_end"] - r["train_start"])


def gpu_lora_runs(tiny: bool, repeats: int, tmp: Path) -> dict | None:
    """GPU_LORA's backbones (TINY_LORA's with ``tiny``) fine-tuned in full and with LoRA, interleaved ``repeats``
    times; None where peft is not installed (the GPU box may lack it: the rest of the benchmark still runs)."""
    if importlib.util.find_spec("peft") is None:
        return None
    device = torch.device("cpu" if tiny else "cuda")
    results = {}
    for i, (case, (stage, extra)) in enumerate((TINY_LORA if tiny else GPU_LORA).items()):
        runs = {"full": [], "lora": []}
        for r in range(repeats):
            for variant, more in _alternate((("full", ["freeze=none"]), ("lora", LORA)), r):
                _fresh_device(device)
                runs[variant].append(
                    gpu_pretune_run(gpu_cfg(stage, extra + more, tmp / f"lora{i}-{variant}-{r}", tiny))
                )
        cfg = gpu_cfg(stage, extra, tmp / "shape", tiny)
        results[case] = dict(
            runs, samples=cfg.datamodule.batch_size * cfg.datamodule.train_batches_per_epoch * cfg.trainer.max_epochs
        )
    return results


def gpu_lora_table(results: dict | None) -> str:
    if results is None:
        return '\nLoRA against full fine-tuning: skipped, peft is not installed (pip install "pretune[lora]").\n'
    lines = [
        "",
        "freeze=lora (rank 8, targets=auto) against full fine-tuning (freeze=none) of the same backbone, pretune's"
        " run path both times, the same data and steps as above, interleaved:",
        "",
        "| backbone | full samples/s | LoRA samples/s | LoRA / full | peak GB full / LoRA | trainable full / LoRA |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for case, res in results.items():
        full, lora = res["full"], res["lora"]
        rates = [[_fit_rate(r, res["samples"]) for r in runs] for runs in (full, lora)]
        ratio = _median(b / a for a, b in zip(*rates, strict=True))
        lines.append(
            f"| {case} | {_median(rates[0]):,.0f} | {_median(rates[1]):,.0f} | **{ratio:.2f}**"
            f" | {_median(r['peak_gb'] for r in full):.2f} / {_median(r['peak_gb'] for r in lora):.2f}"
            f" | {full[-1]['metrics']['params/trainable']:,} / {lora[-1]['metrics']['params/trainable']:,} |"
        )
    return "\n".join(lines) + "\n"


def gpu_benchmark(tiny: bool = False, repeats: int = 2, peak_tflops: float | None = None, out_root: Path = OUT) -> Path:
    """The cases of GPU_CASES (TINY_CASES with ``tiny``), pretune and the hand loop interleaved, ``repeats`` times
    for eager cases and once for compiled ones, then LoRA against full fine-tuning (GPU_LORA); writes
    ``bench_gpu.md``, ``results.json`` and ``lora.json``."""
    from lightning_modules.runtime import run as run_module  # loads torch where the benchmark times it

    device = torch.device("cpu" if tiny else "cuda")
    cases = TINY_CASES if tiny else GPU_CASES
    compile_options = {"backend": "aot_eager"} if tiny else {}
    tmp, out_dir = _scratch(), out_root / (datetime.now().strftime("%Y-%m-%d_%H-%M-%S") + "_gpu")
    peak = peak_tflops or matmul_peak_tflops(device, tiny)
    results = {}
    for i, (case, (stage, extra, compiled)) in enumerate(cases.items()):
        more = ["model.compile=true"] if compiled else []
        flops = flops_per_image(gpu_cfg(stage, extra, tmp / "flops", tiny), device)
        runs = {"hand": [], "pretune": []}
        for r in range(1 if compiled else repeats):
            for loop in _alternate(("hand", "pretune"), r):
                cfg = gpu_cfg(stage, extra + more, tmp / f"case{i}-{loop}-{r}", tiny)
                _fresh_device(device)
                if loop == "hand":
                    runs[loop].append(gpu_plain_run(cfg, compile_options if compiled else None))
                    continue
                before, run_module.COMPILE_OPTIONS = run_module.COMPILE_OPTIONS, compile_options
                try:
                    runs[loop].append(gpu_pretune_run(cfg))
                finally:
                    run_module.COMPILE_OPTIONS = before
        cfg = gpu_cfg(stage, extra, tmp / "shape", tiny)
        results[case] = dict(
            runs,
            flops_per_image=flops,
            batch=cfg.datamodule.batch_size,
            steps_per_epoch=cfg.datamodule.train_batches_per_epoch,
            epochs=cfg.trainer.max_epochs,
        )
    lora = gpu_lora_runs(tiny, repeats, tmp)
    table = gpu_table(results, peak, device, tiny) + gpu_lora_table(lora)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench_gpu.md").write_text(table)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out_dir / "lora.json").write_text(json.dumps(lora, indent=1, default=str))
    print(table + f"\nwritten to {out_dir / 'bench_gpu.md'}")
    return out_dir / "bench_gpu.md"


def gpu_table(results: dict, peak: float, device: torch.device, tiny: bool) -> str:
    import pytorch_lightning as pl

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (--tiny: the logic, not a measurement)"
    first = next(iter(results.values()))
    lines = [
        f"pretune against a tuned hand loop with its data on the device: {name}, torch {torch.__version__},"
        f" Lightning {pl.__version__}, {first['epochs']} epochs of {first['steps_per_epoch']} steps, batch"
        f" {first['batch']}, {'fp32' if tiny else 'bf16-mixed, 224-px images, 128-token texts'}; medians of"
        " interleaved runs"
        f" (compiled cases: one run each). Matmul peak measured here: {peak:.3g} TFLOP/s"
        f" ({'fp32' if tiny else 'bf16'}).",
        f"`pretune bench {' '.join(sys.argv[1:])}`".rstrip(),
        "",
        "| case | hand samples/s | pretune samples/s | pretune / hand | steady state: hand / pretune samples/s"
        " | pretune TFLOP/s"
        " (MFU) | compile s: hand / pretune | peak GB: hand / pretune | checkpoints: s an epoch (MB) | host syncs"
        " in steady steps | final loss hand / pretune |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for case, res in results.items():
        hand, pre = res["hand"], res["pretune"]
        images = res["batch"] * res["steps_per_epoch"] * res["epochs"]

        rate = partial(_fit_rate, samples=images)

        hand_rate, pre_rate = _median(map(rate, hand)), _median(map(rate, pre))
        ratio = _median(rate(b) / rate(a) for a, b in zip(hand, pre, strict=True))
        steady = [_median(_steady(r, res["batch"], res["steps_per_epoch"]) for r in runs) for runs in (hand, pre)]
        tflops = res["flops_per_image"] * pre_rate / 1e12
        syncs = pre[0]["syncs"]
        where = "; ".join(sorted(set(syncs)))[:300]
        ckpt = _median(r["checkpoint_s"] for r in pre) / res["epochs"]
        lines.append(
            f"| {case} | {hand_rate:,.0f} | {pre_rate:,.0f} | **{ratio:.2f}** | {steady[0]:,.0f} / {steady[1]:,.0f}"
            f" | {tflops:.1f} ({100 * tflops / peak:.1f}%) | {_median(r['compile_s'] for r in hand):.1f} /"
            f" {_median(r['compile_s'] for r in pre):.1f} | {_median(r['peak_gb'] for r in hand):.1f} /"
            f" {_median(r['peak_gb'] for r in pre):.1f} | {ckpt:.2f} ({pre[0]['checkpoint_mb']:.0f})"
            f" | {len(syncs)} in {pre[0]['sync_steps']}{': ' + where if syncs else ''}"
            f" | {hand[-1]['loss']:.4f} / {pre[-1]['loss']:.4f} |"
        )
    lines += [
        "",
        "samples/s: training images (or texts) over the fit loop, first epoch start to last epoch end, each epoch's"
        " validation (and, for pretune, its checkpoints and logging) included; steady state: the same without the"
        " first epoch (compilation, warm-up). TFLOP/s: torch's FLOP count of one training step per sample times"
        " pretune's samples/s;"
        " MFU against the matmul peak measured above. Checkpoints: the training thread's time in"
        " Trainer.save_checkpoint per epoch (last.ckpt every epoch, best.ckpt when validation improves; the files"
        " are written by a background thread) and the files' size. Host syncs: counted with"
        " torch.cuda.set_sync_debug_mode over epoch 1's steps after its first (none on a CPU).",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__" and sys.argv[1:2] == ["--memory-child"]:  # peak_memory_mb's fresh process
    memory_child(sys.argv[2], sys.argv[3], sys.argv[4:])
