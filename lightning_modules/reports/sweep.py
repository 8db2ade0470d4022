"""Turn a sweep (or any set of run directories) into a table, the best configuration and plots.

Each run is read from what it wrote: ``.hydra/overrides.yaml`` (what was set on the command line),
``config.yaml`` (the resolved config) and ``metrics.json``. Swept keys are the overrides whose
values differ between runs. Runs still missing their metrics are listed, not dropped.
"""

from __future__ import annotations

import csv
import io
import json
import os
import statistics
from pathlib import Path

import yaml

from lightning_modules.core.errors import ConfigError
from lightning_modules.core.results import METRICS_FILE, write_atomic
from lightning_modules.runtime.wandb_runs import log_report, run_label

METRIC_PREFIXES = ("train/", "val/", "test/", "params/")


def find_runs(paths: list[Path]) -> list[Path]:
    """Run directories under the given paths: any folder holding a ``.hydra/`` or a metrics.json."""
    runs = []
    for path in paths:
        if not path.is_dir():
            raise ConfigError(f"report: {path} is not a directory")
        candidates = [path, *sorted(p for p in path.rglob("*") if p.is_dir())]
        runs += [p for p in candidates if (p / ".hydra").is_dir() or (p / METRICS_FILE).is_file()]
    if not runs:
        raise ConfigError(f"report: no run directories (with .hydra/ or {METRICS_FILE}) under {paths}")
    return sorted(dict.fromkeys(runs), key=lambda p: (len(p.parts), p.name.zfill(6), str(p)))


def _overrides(run: Path) -> dict:
    path = run / ".hydra" / "overrides.yaml"
    items = yaml.safe_load(path.read_text()) if path.is_file() else []
    return dict(item.split("=", 1) for item in items or [] if "=" in item and not item.startswith("hydra."))


def read_run(run: Path) -> dict:
    row = {"run": str(run), "overrides": _overrides(run)}
    metrics_path = run / METRICS_FILE
    if not metrics_path.is_file():
        row["status"] = "missing"
        return row
    try:
        metrics = json.loads(metrics_path.read_text())
    except (OSError, ValueError) as err:  # not what a run writes (it writes atomically): say so in the table
        row["status"], row["error"] = "unreadable", f"{METRICS_FILE}: {err}"
        return row
    row["status"] = metrics.get("status", "ok")
    row["error"] = metrics.get("error", "")
    row["metrics"] = {k: v for k, v in metrics.items() if k.startswith(METRIC_PREFIXES) and isinstance(v, (int, float))}
    config = run / "config.yaml"
    row["config"] = yaml.safe_load(config.read_text()) if config.is_file() else {}
    return row


def swept_keys(rows: list[dict]) -> list[str]:
    keys = dict.fromkeys(k for r in rows for k in r["overrides"])
    return [k for k in keys if len({r["overrides"].get(k) for r in rows}) > 1]


def _number(value: str):
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


def _ordered(values) -> list:
    """Swept values in a sensible axis order: numbers ascending, then anything else by name."""
    return sorted(set(values), key=lambda v: (0, _number(v), "") if isinstance(_number(v), float) else (1, 0, str(v)))


def best_run(rows: list[dict], metric: str, mode: str) -> dict | None:
    scored = [r for r in rows if r["status"] == "ok" and metric in r.get("metrics", {})]
    if not scored:
        return None
    return (max if mode == "max" else min)(scored, key=lambda r: r["metrics"][metric])


def _plot_param(rows, key, metric, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict = {}
    for r in rows:
        if r["status"] == "ok" and metric in r["metrics"]:
            groups.setdefault(r["overrides"].get(key), []).append(r["metrics"][metric])
    values = _ordered(groups)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    numbers = [_number(v) for v in values]
    if len(values) > 8 and all(isinstance(n, float) for n in numbers):
        # Sampled, not gridded (e.g. Optuna's log-uniform LR): one point per run on a real axis.
        for v, n in zip(values, numbers, strict=True):
            ax.scatter([n] * len(groups[v]), groups[v], color="tab:blue", s=14)
        if min(numbers) > 0 and max(numbers) / min(numbers) >= 20:
            ax.set_xscale("log")
        ax.set_ylabel(metric)
    else:
        means = [statistics.fmean(groups[v]) for v in values]
        stds = [statistics.stdev(groups[v]) if len(groups[v]) > 1 else 0.0 for v in values]
        xs = range(len(values))
        ax.errorbar(xs, means, yerr=stds, marker="o", capsize=4)
        for x, v in zip(xs, values, strict=True):
            ax.scatter([x] * len(groups[v]), groups[v], color="gray", s=10, zorder=3)
        ax.set_xticks(list(xs), [str(v) for v in values])
        ax.set_ylabel(f"{metric} (mean ± std over the other keys)")
    ax.set_xlabel(key)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_heatmap(rows, keys, metric, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a, b = keys
    cells: dict = {}
    for r in rows:
        if r["status"] == "ok" and metric in r["metrics"]:
            cells.setdefault((r["overrides"].get(a), r["overrides"].get(b)), []).append(r["metrics"][metric])
    av, bv = _ordered(k[0] for k in cells), _ordered(k[1] for k in cells)
    grid = [[statistics.fmean(cells[(x, y)]) if (x, y) in cells else float("nan") for y in bv] for x in av]
    fig, ax = plt.subplots(figsize=(5, 4))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(bv)), bv)
    ax.set_yticks(range(len(av)), av)
    ax.set_xlabel(b)
    ax.set_ylabel(a)
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            if v == v:
                ax.text(j, i, f"{v:.3f}", ha="center", va="center", color="white", fontsize=8)
    fig.colorbar(im, label=metric)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_history(rows, metric, mode, path: Path) -> None:
    """Optuna's optimization history: each trial's value in launch order, and the best so far."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trials = [(i, r["metrics"][metric]) for i, r in enumerate(rows) if r["status"] == "ok" and metric in r["metrics"]]
    pick = max if mode == "max" else min
    best = [pick(v for _, v in trials[: k + 1]) for k in range(len(trials))]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.scatter([i for i, _ in trials], [v for _, v in trials], s=14, label="trial")
    ax.step([i for i, _ in trials], best, where="post", color="tab:red", label="best so far")
    failed = [i for i, r in enumerate(rows) if r["status"] != "ok"]
    if failed:
        ax.scatter(failed, [min(v for _, v in trials)] * len(failed), marker="x", color="gray", label="failed")
    ax.set_xlabel("trial")
    ax.set_ylabel(metric)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _is_optuna(rows) -> bool:
    for r in rows:
        hydra = Path(r["run"]) / ".hydra" / "hydra.yaml"
        if hydra.is_file():
            return "optuna" in str((yaml.safe_load(hydra.read_text()) or {}).get("hydra", {}).get("sweeper", {}))
    return False


def write_sweep_report(paths: list[Path], out_dir: Path | None = None, wandb: bool = False) -> Path:
    """Write report.md, runs.csv and the plots; with ``wandb``, also log them as a W&B report run."""
    paths = [Path(p) for p in paths]
    rows = [read_run(r) for r in find_runs(paths)]
    out_dir = Path(out_dir or paths[0] / "report")
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = swept_keys(rows)
    first = next((r["config"] for r in rows if r.get("config")), {})
    metric, mode = first.get("optimized_metric", "val/acc"), first.get("optimized_mode", "max")
    sort_metric = f"{metric}_best" if any(f"{metric}_best" in r.get("metrics", {}) for r in rows) else metric
    metric_cols = list(dict.fromkeys(k for r in rows for k in r.get("metrics", {})))

    root = Path(os.path.commonpath([str(p.resolve()) for p in paths]))
    table = [
        {
            "run": str(Path(r["run"]).resolve().relative_to(root)) if Path(r["run"]).resolve() != root else ".",
            **{k: r["overrides"].get(k, "") for k in keys},
            "status": r["status"],
            **{m: r.get("metrics", {}).get(m, "") for m in metric_cols},
            "error": r.get("error", ""),
        }
        for r in rows
    ]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(table[0]))
    writer.writeheader()
    writer.writerows(table)
    write_atomic(out_dir / "runs.csv", buf.getvalue())

    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    cols = ["run", *keys, "status", *[m for m in metric_cols if not m.startswith("params/")]]
    lines = [
        "# Sweep report",
        "",
        f"{len(rows)} runs from {', '.join(str(p) for p in paths)};"
        f" swept: {', '.join(keys) or 'nothing'}; ranked by `{sort_metric}` ({mode}).",
        "",
    ]
    best = best_run(rows, sort_metric, mode)
    if best is not None:
        setting = " ".join(f"{k}={best['overrides'][k]}" for k in keys) or "(no swept key)"
        lines += [
            f"**Best:** `{setting}` — {sort_metric} = {fmt(best['metrics'][sort_metric])} ({best['run']})",
            "",
        ]
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        lines += [f"{len(failed)} run(s) failed or are still missing their metrics (marked below).", ""]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for t in table:
        cells = [fmt(_number(t[c]) if c in keys else t[c]) for c in cols]
        if t["status"] not in ("ok",):
            cells[cols.index("status")] = f"**{t['status']}** {t['error'][:80]}".strip()
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for key in keys:
        name = f"{key.replace('/', '_')}.png"
        _plot_param(rows, key, sort_metric, out_dir / name)
        lines.append(f"![{sort_metric} against {key}]({name})")
    gridded = [k for k in keys if len({r["overrides"].get(k) for r in rows}) <= 8]  # not sampled values
    if len(gridded) >= 2:
        _plot_heatmap(rows, gridded[:2], sort_metric, out_dir / "heatmap.png")
        lines.append(f"![{sort_metric} over {gridded[0]} × {gridded[1]}](heatmap.png)")
    if _is_optuna(rows) and best is not None:
        _plot_history(rows, sort_metric, mode, out_dir / "optimization_history.png")
        lines.append(f"![Optuna optimization history of {sort_metric}](optimization_history.png)")
    path = out_dir / "report.md"
    write_atomic(path, "\n".join(lines) + "\n")
    if wandb:
        # The runs' own W&B project and group when they logged there; else the sweep dir names the group.
        wandb_cfg = next((r["config"]["logger"]["wandb"] for r in rows if "wandb" in _loggers_of(r)), {})
        log_dir = (first.get("paths") or {}).get("log_dir", "outputs")
        wandb_cfg = {"group": run_label(root, log_dir), **{k: v for k, v in wandb_cfg.items() if v is not None}}
        log_report(out_dir, out_dir / "runs.csv", sorted(out_dir.glob("*.png")), wandb_cfg)
    return path


def _loggers_of(row: dict) -> dict:
    return (row.get("config") or {}).get("logger") or {}
