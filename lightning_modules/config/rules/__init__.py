"""Every config key's rule, one module per config group, as ``conf/`` has one folder per group: the run's own keys
(``run``), ``model``, ``datamodule``, ``objective``, ``freeze``, ``optimizer``, ``scheduler``, ``trainer``,
``callbacks`` (and loggers), ``evaluate`` (``scripts/evaluate.py``), ``predict`` (``scripts/predict.py`` and
``scripts/export.py``) and ``study`` (the transfer study). The kinds
of rule are ``config/kinds.py``.

Every key a user can set is either in ``RULES`` (checked by ``config/check.py`` on the composed config before
anything heavy is imported, and by the component itself through ``check(key, value)`` when built from Python) or
in ``PASSED_THROUGH``, which names the library that validates it when the component is built (its error then
becomes the same one line: ``config/library.py``). ``tests/test_config_coverage.py`` walks every composed config
and fails on a key that is in neither, naming the line to add.

Adding a rule is one line in its group's module; a key may be a pattern (``*`` is one segment, ``**`` one or
more); a rule over several keys is one ``Together`` entry in that module's ``TOGETHER``.
"""

from __future__ import annotations

from lightning_modules.config.kinds import Together
from lightning_modules.config.rules import (
    callbacks,
    datamodule,
    evaluate,
    freeze,
    model,
    objective,
    optimizer,
    predict,
    run,
    scheduler,
    study,
    trainer,
)

GROUPS = (run, model, datamodule, objective, freeze, optimizer, scheduler, trainer, callbacks, evaluate, predict)
RULES: dict[str, object] = {key: rule for group in GROUPS for key, rule in group.RULES.items()}
PASSED_THROUGH: dict[str, str] = {k: v for group in GROUPS for k, v in getattr(group, "PASSED_THROUGH", {}).items()}
TOGETHER: list[Together] = [rule for group in GROUPS for rule in getattr(group, "TOGETHER", [])]
REQUIRED_GROUPS = run.REQUIRED_GROUPS
STUDY_RULES = study.RULES


def _match(pattern: list[str], key: list[str]) -> bool:
    if not pattern:
        return not key
    if not key:
        return False
    head = pattern[0]
    if head == "**":
        return any(_match(pattern[1:], key[i:]) for i in range(1, len(key) + 1))
    return (head == "*" or head == key[0]) and _match(pattern[1:], key[1:])


def rule_for(key: str, rules: dict | None = None):
    """The rule for ``key``: its own entry, else the most specific pattern that matches; None if none."""
    rules = RULES if rules is None else rules
    if key in rules:
        return rules[key]
    parts = key.split(".")
    matches = [p for p in rules if "*" in p and _match(p.split("."), parts)]
    if not matches:
        return None
    return rules[max(matches, key=lambda p: sum(s not in ("*", "**") for s in p.split(".")))]


def passed_through(key: str) -> str | None:
    """Which library validates ``key`` (it or a parent is in PASSED_THROUGH); None if none."""
    parts = key.split(".")
    for prefix, library in PASSED_THROUGH.items():
        n = len(prefix.split("."))
        if _match(prefix.split("."), parts[:n]):
            return library
    return None


def check(key: str, value):
    """``value`` if it obeys ``key``'s rule, else a ConfigError naming both."""
    rule = rule_for(key)
    if rule is None:
        raise KeyError(f"no rule for {key} in lightning_modules/config/rules/")
    return rule.check(key, value)


def check_together(values: dict) -> None:
    """Apply every TOGETHER rule whose keys are all in ``values`` (key -> value)."""
    for rule in TOGETHER:
        if all(k in values for k in rule.keys):
            rule.check(values)
