"""Every key a user can set is checked: each leaf of every composed config (every group option, not just the
defaults) has a rule in ``config/rules/`` or is declared as passed through to a library that checks it.
A new key without either fails here, with the line to add."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lightning_modules.config import rules as schema
from lightning_modules.config.check import UNKNOWN, keys, value
from lightning_modules.config.kinds import (
    Choice,
    Custom,
    ExistingPath,
    Flag,
    ListOf,
    Rule,
    Section,
    Text,
    Together,
)
from lightning_modules.config.rules import PASSED_THROUGH, RULES, STUDY_RULES, passed_through, rule_for
from lightning_modules.core.errors import ConfigError
from tests.conftest import CONF

GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name not in ("hydra", "paths", "hparams_search"))
PRETRAIN_OBJECTIVES = {"mae", "simclr", "byol", "dino", "vicreg", "mlm", "clm", "clip"}  # the others fine-tune


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _stage_of(group: str, option: str) -> str:
    return "pretrain" if group == "objective" and option in PRETRAIN_OBJECTIVES else "finetune"


def composed() -> list[tuple[str, object, dict]]:
    """(what was composed, the config, its rule table): both stages with their defaults, every option of
    every group, and the transfer study. Composed once per session (Hydra's compose takes ~0.1 s)."""
    if not hasattr(composed, "cache"):
        out = []
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            for stage in ("pretrain", "finetune"):
                out.append((stage, compose(config_name=stage), RULES))
            for group in GROUPS:
                for option in _options(group):
                    stage = _stage_of(group, option)
                    cfg = compose(config_name=stage, overrides=[f"{group}={option}"])
                    out.append((f"{stage} {group}={option}", cfg, RULES))
            families = (("image", "image.TimmBackbone"), ("text", "text.TransformersBackbone"))
            for tower, family in families:  # a dual encoder's towers take any preset of their family
                for option in _options("model"):  # (model@model.image=resnet_micro)
                    if (
                        f"_target_: lightning_modules.backbones.{family}"
                        not in (CONF / "model" / f"{option}.yaml").read_text()
                    ):
                        continue
                    overrides = ["datamodule=image_text", f"model@model.{tower}={option}"]
                    out.append((f"pretrain {' '.join(overrides)}", compose("pretrain", overrides=overrides), RULES))
            for task in ("zero_shot", "retrieval"):
                out.append((f"evaluate {task}", compose(config_name="evaluate", overrides=[f"task={task}"]), RULES))
            for script in ("predict", "export"):  # scripts/predict.py, scripts/export.py
                out.append((script, compose(config_name=script), RULES))
            for study in ("transfer_study", "transfer_study_full", "transfer_study_text", "transfer_study_text_full"):
                out.append((study, compose(config_name=study), STUDY_RULES))
        composed.cache = out
    return composed.cache


def _suggestion(key: str, default) -> str:
    """The line to add for ``key``, from its default value's type (bounds and words are the author's to set)."""
    if isinstance(default, bool):
        rule = "Flag()"
    elif isinstance(default, int):
        rule = "Rule(int, low=0)"
    elif isinstance(default, float):
        rule = "Rule(float, low=0)"
    elif isinstance(default, str):
        rule = f'Choice({default!r}, ...)  or  Text(r"<pattern>", "<what it is>")  or  ExistingPath("file")'
    elif isinstance(default, list):
        rule = "ListOf(<the rule of an item>, min_len=1)"
    else:
        rule = "Rule(int, low=0, nullable=True)  (or whichever kind fits)"
    return (
        f"  {key} (default {default!r}): add to RULES in lightning_modules/config/rules/<group>.py\n"
        f'      "{key}": {rule},\n'
        f"    or, if a library validates it when built, to PASSED_THROUGH:\n"
        f'      "{key}": "<the library, e.g. Lightning\'s Trainer>",'
    )


def test_every_key_has_a_rule_or_is_passed_through_to_a_library():
    missing = {}
    for label, cfg, rules in composed():
        for key in keys(cfg, rules):
            if rule_for(key, rules) is None and passed_through(key) is None and key not in missing:
                raw = OmegaConf.select(cfg, key, throw_on_missing=False)
                default = OmegaConf.to_container(raw) if OmegaConf.is_config(raw) else raw
                missing[key] = f"{_suggestion(key, default)}\n      (found in: {label})"
    assert not missing, "keys with no rule and no library that checks them:\n" + "\n".join(missing.values())


def test_every_rule_is_for_a_key_some_config_has():
    """A rule left behind by a renamed key would silently check nothing."""
    seen = {root: set() for root in ("stage", "study")}
    for _label, cfg, rules in composed():
        for key in keys(cfg, rules):
            if rule_for(key, rules) is not None:
                seen["study" if rules is STUDY_RULES else "stage"].add(key)
    for root, table in (("stage", RULES), ("study", STUDY_RULES)):
        stale = [p for p in table if not any(schema._match(p.split("."), k.split(".")) for k in seen[root])]
        assert not stale, f"rules in schema.py for keys no {root} config has: {stale}"


def test_the_shipped_defaults_obey_their_rules(tmp_path):
    for label, cfg, rules in composed():
        for key in keys(cfg, rules):
            rule = rule_for(key, rules)
            if rule is None or key in ("paths.output_dir", "datamodule.root"):  # set by Hydra / the user
                continue
            if isinstance(rule, (ExistingPath, Custom)):
                continue  # paths that exist only on the user's machine
            found = OmegaConf.select(cfg, key) if isinstance(rule, Section) else value(cfg, key)
            if found is not UNKNOWN:  # (what only the Hydra app resolves)
                rule.check(key, found)
            assert label  # (the label names the config in a failure's traceback)


def test_the_rule_words_agree_with_the_code():
    from lightning_modules.training.optim import OPTIMIZERS, SCHEDULES

    assert set(RULES["optimizer.name"].words) == set(OPTIMIZERS)
    assert set(RULES["scheduler.name"].words) == set(SCHEDULES)


def test_passed_through_names_a_library_for_each_prefix():
    assert all(isinstance(v, str) and v for v in PASSED_THROUGH.values())
    assert passed_through("trainer.strategy.sharding_strategy").startswith("Lightning")
    assert passed_through("model.kwargs.depth").startswith("timm")
    assert passed_through("model.name") is None and passed_through("trainerx") is None


# --- the rule kinds --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "good", "bad", "says"),
    [
        (Rule(int, low=1), [1, 7], [0, 1.5, True, "3", None, float("nan")], "an integer >= 1"),
        (Rule(float, low=0, high=1, low_open=True), [0.5, 1], [0, 1.5, float("inf"), float("nan")], "(0, 1]"),
        (Rule(int, low=0, words=("all",)), [0, "all"], ["most", -1], "or 'all'"),
        (Choice("skip", "fail"), ["skip"], ["Skip", "", None, 1], "allowed are 'skip', 'fail'"),
        (Choice(1, 3), [1, 3], [True, 2, 1.0], "allowed are 1, 3"),
        (Flag(), [True, False], [0, "true", None], "allowed are true, false"),
        (Text(r"[a-z]+", "a lowercase word"), ["abc"], ["", "ABC", 3, None], "a lowercase word"),
        (ListOf(Rule(float, low=0), 2, 2, True), [[0.1, 0.2], (1, 1)], [[0.2, 0.1], [1], "a", [-1]], "allowed"),
        (ListOf(Text(), min_len=1, nullable=True), [["a"], None], [[], [""], [1]], "allowed is a"),
    ],
)
def test_rule_kinds(rule, good, bad, says):
    for v in good:
        assert rule.check("k", v) == v
    for v in bad:
        with pytest.raises(ConfigError, match=r"^k(\[\d\])?=") as err:
            rule.check("k", v)
        assert says in str(err.value) and "\n" not in str(err.value)


def test_existing_path_and_custom(tmp_path):
    (tmp_path / "f").write_text("x")
    assert ExistingPath("file").check("k", str(tmp_path / "f"))
    assert ExistingPath("dir", words=("last",)).check("k", "last") == "last"
    with pytest.raises(ConfigError, match=r"k=.*/nope: no such dir"):
        ExistingPath("dir").check("k", str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="no such file"):
        ExistingPath("file").check("k", str(tmp_path))

    def even(key, value):
        if value % 2:
            raise ConfigError(f"{key}={value} is odd")
        return value

    assert Custom(even, "an even number").check("k", 2) == 2
    with pytest.raises(ConfigError, match="k=3 is odd"):
        Custom(even, "an even number").check("k", 3)


def test_together_and_patterns():
    rule = Together(("a.x", "a.y"), lambda x, y: x + y < 1, "x + y must be below 1")
    rule.check({"a.x": 0.2, "a.y": 0.3})
    with pytest.raises(ConfigError, match=r"^a.x=0.5, a.y=0.5: x \+ y must be below 1$"):
        rule.check({"a.x": 0.5, "a.y": 0.5})
    table = {"a.*.lr": Rule(float), "**._target_": Text(), "a.b.lr": Rule(int)}
    assert rule_for("a.b.lr", table) == Rule(int)  # its own entry first
    assert rule_for("a.c.lr", table) == Rule(float)
    assert rule_for("x.y.z._target_", table) == Text() and rule_for("_target_", table) is None
    assert rule_for("a.c.d.lr", table) is None


def test_a_value_from_a_reference_is_blamed_on_where_it_was_set(tmp_path):
    from lightning_modules.config.check import check_config
    from tests.conftest import make_cfg

    with pytest.raises(ConfigError, match=r"^seed=-1 is out of range"):  # not datamodule.label_seed (${seed})
        check_config(make_cfg("finetune", ["seed=-1"], tmp_path))
    with pytest.raises(ConfigError, match=r"^optimizer.lr=\$\{nope\} cannot be resolved"):
        check_config(make_cfg("finetune", ["optimizer.lr=${nope}"], tmp_path))
