"""The transfer study's report: each strategy at its best validation LR, compared with scratch."""

from __future__ import annotations

import csv
import io
import statistics
from pathlib import Path

from lightning_modules.results import write_atomic


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def select_and_summarise(rows: list[dict], baseline: str) -> list[dict]:
    """Per strategy, the LR with the best mean validation accuracy over seeds, and its test accuracy.

    Test accuracy never influences the choice: that is what keeps the comparison honest.
    """
    summary = []
    for name in dict.fromkeys(r["strategy"] for r in rows):
        by_lr: dict[float, list[dict]] = {}
        for r in rows:
            if r["strategy"] == name:
                by_lr.setdefault(r["lr"], []).append(r)
        lr, chosen = max(by_lr.items(), key=lambda item: statistics.fmean(r["val_acc"] for r in item[1]))
        test_mean, test_std = _mean_std([r["test_acc"] for r in chosen])
        summary.append(
            {
                "strategy": name,
                "pretrained": chosen[0]["pretrained"],
                "lr": lr,
                "seeds": len(chosen),
                "val_acc": statistics.fmean(r["val_acc"] for r in chosen),
                "test_acc": test_mean,
                "test_std": test_std,
                "test_min": min(r["test_acc"] for r in chosen),
                "test_max": max(r["test_acc"] for r in chosen),
                "per_seed": {r["seed"]: r["test_acc"] for r in chosen},
                "trainable": chosen[0]["trainable"],
                "frozen": chosen[0]["frozen"],
            }
        )
    base = next(s for s in summary if s["strategy"] == baseline)
    for s in summary:
        # Paired by seed: the same labeled subset and fine-tuning seed on both sides.
        diffs = [s["per_seed"][k] - base["per_seed"][k] for k in s["per_seed"] if k in base["per_seed"]]
        s["gain"], s["gain_std"] = _mean_std(diffs) if diffs else (0.0, 0.0)
        s["gain_min"] = min(diffs) if diffs else 0.0
    return summary


def _plot(summary: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    names = [s["strategy"] for s in summary]
    means = [100 * s["test_acc"] for s in summary]
    stds = [100 * s["test_std"] for s in summary]
    colors = ["#999999" if not s["pretrained"] else "#3b75af" for s in summary]
    ax.bar(names, means, yerr=stds, capsize=5, color=colors)
    for i, s in enumerate(summary):
        ax.scatter([i] * len(s["per_seed"]), [100 * v for v in s["per_seed"].values()], color="black", s=12, zorder=3)
        ax.text(i, means[i] + stds[i] + 1, f"{means[i]:.1f}", ha="center")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def write_report(study_dir: Path, cfg, rows: list[dict], summary: list[dict], pretrain: dict, seconds: float) -> Path:
    study_dir = Path(study_dir)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(study_dir / "results.csv", buf.getvalue())

    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    title = f"{len(cfg.seeds)} seeds, {pct(cfg.label_fraction)}% of training labels"
    _plot(summary, study_dir / "transfer.png", title)
    best = max((s for s in summary if s["pretrained"]), key=lambda s: s["test_acc"])
    lines = [
        "# Transfer study: what pre-training bought",
        "",
        f"Pre-training: `{' '.join(cfg.pretrain)}` (final val/loss {pretrain['val/loss']:.3f},"
        f" {pretrain['time/run_s']:.0f}s). Fine-tuning: `{' '.join(cfg.finetune)}` with"
        f" {pct(cfg.label_fraction)}% of the training labels; seeds {list(cfg.seeds)} (each seed draws its"
        " own labeled subset and fine-tuning init). Each strategy uses the learning rate with the best mean"
        " validation accuracy; test accuracy is reported for that choice only.",
        "",
        "| strategy | init | trainable params | lr (chosen on val) | val acc | test acc (mean ± std) | min–max |"
        " gain over scratch (paired) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summary:
        gain = "—" if not s["pretrained"] else f"{100 * s['gain']:+.1f} ± {100 * s['gain_std']:.1f}"
        lines.append(
            f"| {s['strategy']} | {'pre-trained' if s['pretrained'] else 'random'} | {s['trainable']:,} |"
            f" {s['lr']:g} | {pct(s['val_acc'])} | {pct(s['test_acc'])} ± {pct(s['test_std'])} |"
            f" {pct(s['test_min'])}–{pct(s['test_max'])} | {gain} |"
        )
    lines += [
        "",
        f"**Best pre-trained strategy: {best['strategy']}, {pct(best['test_acc'])}% test accuracy,"
        f" {100 * best['gain']:+.1f} points over scratch (paired over {best['seeds']} seeds; smallest per-seed"
        f" gain {100 * best['gain_min']:+.1f}).**",
        "",
        "![test accuracy by strategy](transfer.png)",
        "",
        f"All {len(rows)} fine-tuning runs (every LR and seed) are in `results.csv`; each has its own run"
        f" directory under `finetune/`. Study wall time: {seconds:.0f}s.",
        "",
    ]
    path = study_dir / "report.md"
    write_atomic(path, "\n".join(lines))
    return path
