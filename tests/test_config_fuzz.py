"""The config surface fuzzed: seeded draws of overrides over every key of the composed configs (wrong types,
negatives, zero, huge values, empty strings, NaN, paths that do not exist, combinations of two).

Every draw is checked in-process (milliseconds: the check runs before anything heavy): it is refused with one
line naming a key it set, or accepted. A sample of the accepted ones runs for real with tiny limits, in-process
and a few through the scripts: each either trains or exits non-zero with exactly one line on stderr and no
traceback, never leaves a metrics.json claiming success for a run that failed, and writes nothing outside its
run dir. ``pytest -m fuzz`` runs a larger draw.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from lightning_modules.config.check import check_config
from lightning_modules.core.errors import ConfigError
from tests.conftest import CONF, FAST, ROOT

SEED = 16
# Tiny runs: a couple of batches, no progress bar, CPU. The fuzzed overrides come after these and win.
TINY = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.log_every_n_steps=1",
    "datamodule.batch_size=16",
    "datamodule.eval_batch_size=64",
]
# name -> (stage, overrides, whether a sample of its accepted draws runs for real: True, False, or "large" for
# the larger draw only). Between them every option of every group; DDP (it starts processes) and W&B (it
# writes outside the run dir) are checked, not run.
BASES = {
    "pretrain-mae-vit": ("pretrain", ["objective=mae", "model=vit_micro"], True),
    "pretrain-simclr-mnist": (
        "pretrain",
        ["objective=simclr", "model=resnet_micro", "datamodule=mnist5k", "optimizer=sgd", "scheduler=step"]
        + ["callbacks=early_stopping", "logger=tensorboard", "trainer=cpu"],
        True,
    ),
    "pretrain-simclr-folder": (
        "pretrain",
        ["objective=simclr", "model=vit_micro", "datamodule=image_folder", "datamodule.root={folder}"]
        + ["scheduler=plateau", "callbacks=none", "logger=none"],
        True,
    ),
    # The self-supervised objectives with photo augmentations; the EMA of weights (callbacks=ema).
    "pretrain-byol-ema": ("pretrain", ["objective=byol", "model=resnet_micro", "callbacks=ema"], True),
    "pretrain-dino-vit": ("pretrain", ["objective=dino", "model=vit_micro"], True),
    "pretrain-vicreg": ("pretrain", ["objective=vicreg", "model=resnet_micro", "datamodule=mnist5k"], True),
    "finetune-resnet": ("finetune", ["model=resnet_micro"], True),
    "finetune-gradual-mnist": (
        "finetune",
        ["model=vit_micro", "freeze=gradual", "optimizer=sgd", "scheduler=step", "datamodule=mnist5k"]
        + ["callbacks=early_stopping", "logger=tensorboard"],
        True,
    ),
    # a probe shorter than TINY's one epoch: a longer one would only probe, which the config check refuses
    "finetune-lpft": (
        "finetune",
        ["model=resnet_micro", "freeze=lp_ft", "freeze.probe_epochs=0", "scheduler=plateau", "logger=csv"],
        True,
    ),
    "finetune-lora": ("finetune", ["model=vit_micro", "freeze=lora"], True),
    "finetune-probe-folder": (
        "finetune",
        ["model=resnet_micro", "freeze=linear_probe", "scheduler=none", "datamodule=image_folder"]
        + ["datamodule.root={folder}", "callbacks=none"],
        True,
    ),
    "finetune-timm": ("finetune", ["model=timm", "freeze=none", "debug=limit"], True),
    # CLIP trains its caption tokenizer first (seconds); other presets as its image tower are checked, not run.
    "pretrain-clip": ("pretrain", ["datamodule=image_text"], "large"),
    "pretrain-clip-resnet-tower": ("pretrain", ["datamodule=image_text", "model@model.image=resnet_micro"], False),
    "pretrain-clip-lite0-tower": (
        "pretrain",
        ["datamodule=image_text", "model@model.image=efficientnet_lite0_imagenet"],
        False,
    ),
    # Prepared shards (a directory the check finds; reading it is the datamodule's, not run here).
    "pretrain-shards": ("pretrain", ["objective=mae", "datamodule=shards", "datamodule.path={folder}"], False),
    # scripts/evaluate.py needs a CLIP pre-training run: checked, not run.
    "evaluate-zero-shot": ("evaluate", ["task=zero_shot", "model.init={clip}"], False),
    "evaluate-retrieval": ("evaluate", ["task=retrieval", "datamodule=image_text", "model.init={clip}"], False),
    # scripts/predict.py and export.py need a fine-tune run: checked, not run (tests/test_model_export.py runs them).
    "predict": ("predict", ["run_dir={clip}", "input={folder}"], False),
    "export": ("export", ["run_dir={clip}"], False),
    "finetune-gpu": ("finetune", ["trainer=gpu", "trainer.accelerator=gpu", "model=resnet_micro"], True),
    "finetune-lite0": ("finetune", ["model=efficientnet_lite0_imagenet", "model.input_size=32"], "large"),
    "pretrain-fsdp": ("pretrain", ["trainer=fsdp", "objective=mae", "model=vit_micro"], False),
    "finetune-ddp-wandb": ("finetune", ["trainer=ddp", "logger=wandb", "model=resnet_micro"], False),
    # Text trains a tokenizer first (seconds): run in the larger draw only. The parsed corpus is a cache shared
    # by runs on purpose (datamodule.cache_dir), kept outside the run dirs.
    "pretrain-mlm-text": (
        "pretrain",
        ["datamodule=text_corpus", "model=bert_micro", "objective=mlm", "datamodule.cache_dir={cache}"],
        "large",
    ),
    "pretrain-clm-text": (
        "pretrain",
        ["datamodule=text_corpus", "model=gpt_micro", "objective=clm", "datamodule.cache_dir={cache}"],
        "large",
    ),
    "finetune-text": (
        "finetune",
        ["datamodule=text_classification", "model=gpt_micro", "datamodule.families=4", "datamodule.cache_dir={cache}"],
        "large",
    ),
}
COSTLY = {"model.compile": True}  # accepted values that cost minutes (torch.compile), not run here
# own dirs (a logger's, the checkpoints', a shared cache): outside the run dir where the user says
MOVES_OUTPUTS = (".save_dir", ".dirpath", ".cache_dir")


# --- the draw ----------------------------------------------------------------------------------------------


def _typed(default) -> list[str]:
    """Override values aimed at a key whose default is ``default``."""
    if isinstance(default, bool):
        return ["false", "true", "0", "1", "yes", "''"]
    if isinstance(default, int):
        return ["-1", "0", "1", "2", str(default * 2), str(max(default // 2, 1)), "2.5", "1000000", "-inf", "3"]
    if isinstance(default, float):
        return ["-0.5", "0", "1", "1.5", "1e-12", repr(default * 2), repr(default / 2), "-inf", "0.999", "0.5"]
    if isinstance(default, str):
        return ["''", "' '", "abc", "/no/such/path", "x" * 300, "'a b'", "42", "'${nope}'"]
    if isinstance(default, list):
        items = [repr(v) if not isinstance(v, str) else f"'{v}'" for v in default]
        return ["[]", "[nan]", f"[{items[0]}]" if items else "[1]", f"[{','.join(items * 2)}]", "[a,b]", "[-1,-1]"]
    if isinstance(default, dict):
        return ["null", "{}", "5", "abc"]
    return ["0", "1", "0.5", "abc", "-1", "true", "[1,2]"]  # null by default


COMMON = ["null", "''", "abc", "nan", "inf", "-1", "0", "1e30", "99999999999999999999", "[]", "[abc]", "{a: 1}"]
COMMON += ["true", "/no/such/path"]


def _keys(cfg: DictConfig, prefix: str = "") -> dict:
    """Every key of ``cfg`` (dicts too, so a whole node can be set to null) -> its default."""
    out = {}
    for name in cfg.keys():
        key, node = f"{prefix}{name}", cfg._get_node(name)
        if isinstance(node, DictConfig) and not node._is_none() and not node._is_interpolation():
            out[key] = {}
            out.update(_keys(node, f"{key}."))
        else:
            raw = node._value()
            out[key] = OmegaConf.to_container(node) if isinstance(node, ListConfig) and not node._is_none() else raw
    return out


@dataclass
class Case:
    base: str
    overrides: list[str]
    keys: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        return f"[{self.base}] {' '.join(self.overrides)}"


def draw(bases: dict, n: int, seed: int) -> list[Case]:
    """``n`` cases: first every key of every base once, then keys at random; a quarter set two keys."""
    rng = random.Random(seed)
    pool = [(b, k, d) for b, (_cfg, keys) in bases.items() for k, d in keys.items()]
    order = rng.sample(pool, len(pool)) + [rng.choice(pool) for _ in range(max(0, n - len(pool)))]
    cases = []
    for base, key, default in order[:n]:
        picks = [(key, default)]
        if rng.random() < 0.25:
            other = rng.choice([(k, d) for k, d in bases[base][1].items() if k != key])
            picks.append(other)
        overrides = [f"{k}={rng.choice(_typed(d) if rng.random() < 0.7 else COMMON)}" for k, d in picks]
        cases.append(Case(base, overrides, [k for k, _ in picks]))
    return cases


# --- one case ----------------------------------------------------------------------------------------------


PARSER = OverridesParser.create()


def apply(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """``cfg`` with the overrides applied as Hydra applies a ``key=value`` override (OmegaConf.update, merge).
    Raises what Hydra would turn into its own message (an override it cannot apply)."""
    cfg = copy.deepcopy(cfg)
    for text in overrides:
        override = PARSER.parse_override(text)
        OmegaConf.update(cfg, override.key_or_group, override.value(), merge=True)
    return cfg


def check_case(cfg: DictConfig, case: Case) -> str:
    """'refused' (one line naming a key the case set), 'accepted', or 'hydra' (Hydra's own refusal)."""
    try:
        cfg = apply(cfg, case.overrides)
    except Exception:
        return "hydra"
    try:
        check_config(cfg)
    except ConfigError as err:
        line = str(err)
        assert "\n" not in line, f"{case}: more than one line: {line}"
        assert any(k in line for k in case.keys), f"{case}: the line names none of {case.keys}: {line}"
        return "refused"
    return "accepted"


def _number(text: str):
    try:
        return float(text)
    except ValueError:
        return None


def runnable(case: Case, bases_spec: dict, keys: dict, large: bool = False) -> bool:
    """Whether an accepted case is cheap enough to run: a runnable base, no costly value, numbers at most
    twice their default (or 64), nothing that moves the run dir or a part of it elsewhere."""
    runs = bases_spec[case.base][2]
    if not (runs is True or runs == "large" and large):
        return False
    for text, key in zip(case.overrides, case.keys, strict=True):
        value = text.split("=", 1)[1]
        if key.startswith(("paths.", "hydra.")) or key.endswith(MOVES_OUTPUTS):  # written where the user says
            return False
        if key in COSTLY and PARSER.parse_override(text).value() == COSTLY[key]:
            return False
        number, default = _number(value), keys.get(key)
        if number is not None and math.isfinite(number):
            limit = max(64, 2 * abs(default)) if isinstance(default, (int, float)) else 64
            if abs(number) > limit:
                return False
    return True


def assert_one_line_or_trained(case: Case, code, out: str, err: str, run_dir: Path, work: Path) -> str:
    """The contract of a real run; returns 'trained' or the error line."""
    metrics = run_dir / "metrics.json"
    status = json.loads(metrics.read_text())["status"] if metrics.is_file() else None
    assert "Traceback" not in out + err, f"{case}: a traceback:\n{err[-3000:]}"
    leftovers = sorted(p.name for p in work.iterdir() if p != run_dir)
    assert not leftovers, f"{case}: wrote outside the run dir: {leftovers}"
    if code in (0, None):
        assert status == "ok", f"{case}: exit 0 but metrics.json says {status}"
        return "trained"
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), f"{case}: stderr is not one line:\n{err[-3000:]}"
    assert code == 2 or "train/loss became" in lines[0], f"{case}: exit {code} (a bug): {lines[0]}"
    assert status != "ok", f"{case}: failed (exit {code}) but metrics.json says ok"
    assert status == "failed" or not run_dir.exists(), f"{case}: failed without a metrics.json saying so"
    return lines[0]


# --- the fixtures ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    from tests.test_datamodules import _write_images

    root = tmp_path_factory.mktemp("images")
    _write_images(root, "train", ["a", "b", "c"], n=14, size=16)
    return root


def _clip_run(folder: Path) -> Path:
    """A run dir whose backbone/ the config check finds (never loaded: the evaluate bases are checked, not run)."""
    from lightning_modules.core.locations import CONFIG, WEIGHTS

    run = folder.parent / "clip_run"
    (run / "backbone").mkdir(parents=True, exist_ok=True)
    for name in (CONFIG, WEIGHTS):
        (run / "backbone" / name).touch()
    return run


@pytest.fixture(scope="module")
def bases(folder) -> dict:
    """base name -> (composed config with TINY, its keys and defaults). Composed once (Hydra's compose is slow)."""
    out = {}
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for name, (stage, overrides, _run) in BASES.items():
            filled = [o.format(folder=folder, cache=folder.parent / "cache", clip=_clip_run(folder)) for o in overrides]
            tiny = {"evaluate": [*filled, "logger=none"], "predict": filled, "export": filled}.get(  # train nothing
                stage, [*FAST, *filled, *TINY]
            )
            cfg = compose(config_name=stage, overrides=[*tiny, f"paths.output_dir={folder.parent}/out"])
            out[name] = (cfg, {k: d for k, d in _keys(cfg).items() if not k.startswith("paths.output_dir")})
    return out


def _fuzz(bases, n_cases: int, n_runs: int, n_scripts: int, tmp_path, capsys, monkeypatch, large: bool = False):
    from lightning_modules.runtime.cli import main

    started = time.perf_counter()
    cases = draw(bases, n_cases, SEED)
    outcomes = {case_id: check_case(bases[c.base][0], c) for case_id, c in enumerate(cases)}
    counts = {k: sum(v == k for v in outcomes.values()) for k in ("refused", "accepted", "hydra")}
    with capsys.disabled():  # shown with -s
        print(f"\n{len(cases)} cases: {counts}, checked in {time.perf_counter() - started:.1f}s")
    accepted = [c for i, c in enumerate(cases) if outcomes[i] == "accepted"]
    to_run = [c for c in accepted if runnable(c, BASES, bases[c.base][1], large)]

    results = []
    for i, case in enumerate(to_run[:n_runs]):
        work = tmp_path / f"run{i}"
        work.mkdir()
        monkeypatch.chdir(work)  # anything written relative to the cwd would show up here
        cfg = apply(bases[case.base][0], case.overrides)
        with open_dict(cfg):
            cfg.paths.output_dir = str(work / "out")
        capsys.readouterr()
        try:
            code = main(cfg)
            code = 0
        except SystemExit as exit_:
            code = exit_.code
        out, err = capsys.readouterr()
        results.append((case, assert_one_line_or_trained(case, code, out, err, work / "out", work)))

    print(f"{len(results)} runs in-process: {time.perf_counter() - started:.1f}s so far")
    # Through the real scripts: one refused draw, then accepted ones.
    refused = [c for i, c in enumerate(cases) if outcomes[i] == "refused" and BASES[c.base][2] is True]
    for i, case in enumerate((refused[:1] + to_run[n_runs:])[:n_scripts]):
        work = tmp_path / f"script{i}"
        (work / "tmp").mkdir(parents=True)
        stage, overrides, _ = BASES[case.base]
        folder = Path(bases["pretrain-simclr-folder"][0].datamodule.root)
        filled = [o.format(folder=folder, cache=folder.parent / "cache") for o in overrides]
        args = [*FAST, *filled, *TINY, *case.overrides]
        env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
        env.update(TMPDIR=str(work / "tmp"), OMP_NUM_THREADS="1")
        proc = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / f"{stage}.py"), *args, f"hydra.run.dir={work / 'out'}"],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert not any((work / "tmp").iterdir()), f"{case}: wrote into the temp dir"
        (work / "tmp").rmdir()
        results.append(
            (case, assert_one_line_or_trained(case, proc.returncode, proc.stdout, proc.stderr, work / "out", work))
        )
    print(f"and through the scripts: {time.perf_counter() - started:.1f}s in all")
    for case, result in results:
        print(f"  {case}: {result}")
    return counts, results


def test_fuzzed_overrides_are_refused_in_one_line_or_train(bases, tmp_path, capsys, monkeypatch):
    counts, results = _fuzz(bases, 400, 12, 2, tmp_path, capsys, monkeypatch)
    assert counts["refused"] > 200 and counts["accepted"] > 20  # the draw reaches both sides of the rules
    assert len(results) == 14


@pytest.mark.fuzz
def test_fuzzed_overrides_larger_draw(bases, tmp_path, capsys, monkeypatch, request):
    if "fuzz" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("the larger draw runs with: pytest -m fuzz tests/test_config_fuzz.py")
    n = int(os.environ.get("PRETUNE_FUZZ_CASES", "4000"))
    _fuzz(bases, n, n // 40, 8, tmp_path, capsys, monkeypatch, large=True)


def test_fuzzed_study_overrides_are_refused_in_one_line_or_accepted(tmp_path):
    """conf/transfer_study.yaml's own keys: every draw checked against STUDY_RULES (milliseconds); a few
    accepted ones also through check_study, which composes every stage config the study would run."""
    from lightning_modules.config.check import check_values
    from lightning_modules.config.rules import STUDY_RULES
    from pretune.commands.transfer_study import check_study

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        base = compose(config_name="transfer_study", overrides=[f"paths.output_dir={tmp_path}"])
        keys = {k: d for k, d in _keys(base).items() if not k.startswith("paths.")}
        cases, counts, composed = draw({"study": (base, keys)}, 150, SEED), {}, 0
        for case in cases:
            try:
                cfg = apply(base, case.overrides)
            except Exception:
                counts["hydra"] = counts.get("hydra", 0) + 1
                continue
            try:
                check_values(cfg, STUDY_RULES)
                if composed < 4:  # the stage configs, composed: ~0.1 s each
                    composed += 1
                    check_study(cfg, tmp_path / "study")
                counts["accepted"] = counts.get("accepted", 0) + 1
            except ConfigError as err:
                line = str(err)
                assert "\n" not in line, f"{case}: more than one line: {line}"
                stage = line.split(":", 1)[0]  # check_study's lines start with the stage they composed
                named = any(k in line for k in case.keys) or stage == "pretrain" or stage.startswith("strategies.")
                assert named, f"{case}: the line names none of {case.keys}: {line}"
                counts["refused"] = counts.get("refused", 0) + 1
    print(f"\n{len(cases)} study cases: {counts}")  # shown with -s
    assert counts.get("refused", 0) > 50 and counts.get("accepted", 0) > 10, counts


def test_the_bases_reach_every_key(bases):
    """Every key of every composed config (tests/test_config_coverage.py) is in some base, so the draw reaches
    it: a new group option with keys of its own needs a base here."""
    from lightning_modules.config.check import keys
    from lightning_modules.config.rules import RULES
    from tests.test_config_coverage import composed

    every = {k for _label, cfg, rules in composed() if rules is RULES for k in keys(cfg, rules)}
    reached = {k for _cfg, base_keys in bases.values() for k in base_keys}
    missing = sorted(k for k in every - reached if not k.startswith(("paths.", "hydra.")))
    assert not missing, f"no base in BASES (tests/test_config_fuzz.py) has {missing}: add one with their option"
