"""The transfer study's report: each strategy at its best validation LR, compared with scratch,
at each label fraction."""

from __future__ import annotations

import csv
import io
import statistics
from pathlib import Path

from lightning_modules.core.results import write_atomic


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _choose(rows: list[dict]) -> tuple[float, list[dict]]:
    """The LR with the best mean validation accuracy over seeds. Test accuracy never influences the
    choice: that is what keeps the comparison honest."""
    by_lr: dict[float, list[dict]] = {}
    for r in rows:
        by_lr.setdefault(r["lr"], []).append(r)
    return max(by_lr.items(), key=lambda item: statistics.fmean(r["val_acc"] for r in item[1]))


def _mb(value) -> str:
    return "—" if value in ("", None) else f"{float(value):.1f}"


def select_and_summarise(rows: list[dict], baseline: str) -> list[dict]:
    """One entry per (label fraction, strategy), with its paired gain over ``baseline``."""
    summary = []
    for fraction in dict.fromkeys(r["label_fraction"] for r in rows):
        entries = []
        for name in dict.fromkeys(r["strategy"] for r in rows if r["label_fraction"] == fraction):
            lr, chosen = _choose([r for r in rows if r["label_fraction"] == fraction and r["strategy"] == name])
            forgetting = [r["forgetting"] for r in chosen if r.get("forgetting") not in ("", None)]
            test_mean, test_std = _mean_std([r["test_acc"] for r in chosen])
            entries.append(
                {
                    "label_fraction": fraction,
                    "strategy": name,
                    "pretrained": chosen[0]["pretrained"],
                    "start": chosen[0].get("start") or ("pre-trained" if chosen[0]["pretrained"] else "random"),
                    "lr": lr,
                    "seeds": len(chosen),
                    "val_acc": statistics.fmean(r["val_acc"] for r in chosen),
                    "test_acc": test_mean,
                    "test_std": test_std,
                    "test_min": min(r["test_acc"] for r in chosen),
                    "test_max": max(r["test_acc"] for r in chosen),
                    "per_seed": {r["seed"]: r["test_acc"] for r in chosen},
                    "trainable": chosen[0]["trainable"],
                    "train_state_mb": chosen[0].get("train_state_mb", ""),
                    "frozen_groups": chosen[0].get("frozen_groups", ""),
                    "forgetting": _mean_std(forgetting) if forgetting else None,
                }
            )
        base = next(e for e in entries if e["strategy"] == baseline)
        for e in entries:
            # Paired by seed: the same labeled subset and fine-tuning seed on both sides.
            e["gain_per_seed"] = {k: v - base["per_seed"][k] for k, v in e["per_seed"].items() if k in base["per_seed"]}
            diffs = list(e["gain_per_seed"].values())
            e["gain"], e["gain_std"] = _mean_std(diffs)
            e["gain_min"] = min(diffs)
        summary += entries
    return summary


def _accuracy_range(entries: list[dict]) -> tuple[float, float]:
    """The y range that shows the spread: every seed and whisker, with room for the labels above (percent)."""
    low = min(min(100 * (e["test_acc"] - e["test_std"]), *(100 * v for v in e["per_seed"].values())) for e in entries)
    high = max(_top(e) for e in entries)
    span = max(high - low, 2.0)
    return max(0.0, low - 0.08 * span), min(101.5, high + 0.14 * span)  # accuracy ends at 100: no room above


def _top(e: dict) -> float:
    """Where an entry's marks end above (its upper whisker or its best seed), in percent."""
    return max(100 * (e["test_acc"] + e["test_std"]), *(100 * v for v in e["per_seed"].values()))


def _spread(n: int, width: float) -> list[float]:
    """Offsets of n seed dots around their strategy's x, so that equal values stay visible."""
    return [0.0] if n == 1 else [width * (k / (n - 1) - 0.5) for k in range(n)]


def _plot(summary: list[dict], path: Path, title: str) -> None:
    """Two panels: test accuracy per strategy (mean ± std, each seed a dot, on a range that shows the spread, not
    0-100) and, for the pre-trained strategies, the gain over scratch paired by seed (a bar from zero, each seed's
    own gain a dot). Each label sits above its whiskers and dots; the legend sits outside both panels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    fractions = list(dict.fromkeys(s["label_fraction"] for s in summary))
    names = list(dict.fromkeys(s["strategy"] for s in summary))
    gained = [n for n in names if any(s["strategy"] == n and s["pretrained"] for s in summary)]
    colors = plt.get_cmap("tab10").colors
    width = 0.8 / len(fractions)
    fig, (acc_ax, gain_ax) = plt.subplots(
        1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [len(names) + 1, len(gained) + 1]}
    )

    def entry(fraction, name):
        return next((s for s in summary if s["label_fraction"] == fraction and s["strategy"] == name), None)

    low, high = _accuracy_range(summary)
    pad = 0.015 * (high - low)
    for j, fraction in enumerate(fractions):
        shift, color = (j - (len(fractions) - 1) / 2) * width, colors[j % len(colors)]
        for i, name in enumerate(names):
            e = entry(fraction, name)
            if e is None:
                continue
            x, mean = i + shift, 100 * e["test_acc"]
            seeds = [100 * v for v in e["per_seed"].values()]
            acc_ax.scatter([x + d for d in _spread(len(seeds), width / 2)], seeds, color=color, s=10, alpha=0.6)
            acc_ax.errorbar(x, mean, yerr=100 * e["test_std"], fmt="o", color=color, capsize=4, markersize=6)
            acc_ax.text(x, _top(e) + pad, f"{mean:.1f}", ha="center", va="bottom", fontsize=8)
        for i, name in enumerate(gained):
            e = entry(fraction, name)
            if e is None or not e["pretrained"]:
                continue
            x, gain = i + shift, 100 * e["gain"]
            seeds = [100 * v for v in e["gain_per_seed"].values()]
            gain_ax.bar(x, gain, width * 0.9, color=color, alpha=0.75)
            gain_ax.scatter([x + d for d in _spread(len(seeds), width / 2)], seeds, color="black", s=8, zorder=3)
            end = max(gain, *seeds) if gain >= 0 else min(gain, *seeds)
            gain_ax.text(
                x,
                end + (pad if gain >= 0 else -pad),
                f"{gain:+.1f}",
                ha="center",
                va="bottom" if gain >= 0 else "top",
                fontsize=8,
            )
    acc_ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    acc_ax.set_ylim(low, high)
    acc_ax.set_ylabel("test accuracy (%)")
    acc_ax.set_title("test accuracy: mean ± std, dots: each seed", fontsize=10)
    acc_ax.grid(axis="y", alpha=0.3)
    gain_ax.axhline(0, color="black", linewidth=0.8)
    gain_ax.set_xticks(range(len(gained)), gained, rotation=20, ha="right")
    gain_ax.set_ylabel("points over scratch")
    gain_ax.set_title("gain over scratch, paired by seed (dots: each seed)", fontsize=10)
    gain_ax.grid(axis="y", alpha=0.3)
    gain_ax.margins(y=0.15)
    handles = [Patch(color=colors[j % len(colors)], label=f"{100 * f:g}% labels") for j, f in enumerate(fractions)]
    fig.suptitle(title)
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), bbox_to_anchor=(0.5, 0.95), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def _plot_depth(summary: list[dict], path: Path) -> bool:
    """Test accuracy against the number of frozen layer groups (strategies that declare ``frozen_groups``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [s for s in summary if s.get("frozen_groups") not in ("", None)]
    if len(points) < 2:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for fraction in dict.fromkeys(s["label_fraction"] for s in points):
        series = [s for s in points if s["label_fraction"] == fraction]
        order = sorted(series, key=lambda s: 10**9 if s["frozen_groups"] == "all" else int(s["frozen_groups"]))
        ax.errorbar(
            [str(s["frozen_groups"]) for s in order],
            [100 * s["test_acc"] for s in order],
            yerr=[100 * s["test_std"] for s in order],
            marker="o",
            capsize=4,
            label=f"{100 * fraction:g}% labels",
        )
    ax.set_xlabel("frozen layer groups (freeze.layers), input side first")
    ax.set_ylabel("test accuracy (%)")
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return True


def headline(summary: list[dict]) -> list[str]:
    """Per label fraction and start (the study's own pre-training, ImageNet weights ...): its best strategy (by
    validation) against scratch."""
    lines = []
    for fraction in dict.fromkeys(s["label_fraction"] for s in summary):
        entries = [s for s in summary if s["label_fraction"] == fraction]
        scratch = next(s for s in entries if not s["pretrained"])
        for start in dict.fromkeys(s.get("start", "pre-trained") for s in entries if s["pretrained"]):
            best = max(
                (s for s in entries if s["pretrained"] and s.get("start", "pre-trained") == start),
                key=lambda s: s["val_acc"],
            )
            lines.append(
                f"- **{100 * fraction:g}% labels:** {best['strategy']} (best {start} strategy on validation)"
                f" {100 * best['test_acc']:.1f}% vs scratch {100 * scratch['test_acc']:.1f}% test accuracy:"
                f" **{100 * best['gain']:+.1f} ± {100 * best['gain_std']:.1f} points** (paired over"
                f" {best['seeds']} seeds, smallest per-seed gain {100 * best['gain_min']:+.1f})"
            )
    return lines


def monitored(metrics: dict) -> str:
    """What the feature monitor measured at the end of pre-training (callbacks/feature_monitor.py), if it ran."""
    names = {"val/knn_acc": "k-NN top-1", "val/probe_acc": "online linear probe"}
    return "".join(f", {name} {100 * metrics[key]:.1f}%" for key, name in names.items() if key in metrics)


def write_report(study_dir: Path, cfg, rows: list[dict], summary: list[dict], pretrain: dict, seconds: float) -> Path:
    study_dir = Path(study_dir)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(study_dir / "results.csv", buf.getvalue())

    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    _plot(summary, study_dir / "transfer.png", f"Test accuracy over {len(cfg.seeds)} seeds (dots: each seed)")
    lines = [
        "# Transfer study: what pre-training bought",
        "",
        *headline(summary),
        "",
        (
            f"Pre-training: `{' '.join([*cfg.common, *cfg.pretrain])}` (final val/loss {pretrain['val/loss']:.3f}"
            f"{monitored(pretrain)}, {pretrain['time/run_s']:.0f}s). "
            if pretrain
            else "No pre-training (no strategy starts from it). "
        )
        + f"Fine-tuning: `{' '.join(cfg.finetune)}`; seeds {list(cfg.seeds)}"
        " (each seed draws its own labeled subset and fine-tuning init; every strategy sees the same subsets and"
        " augmentation, and this step budget unless its overrides below change it). Each strategy uses the learning"
        " rate with the best mean validation"
        " accuracy among its candidates; test accuracy is reported for that choice only.",
        "",
        "| labels | strategy | init | trainable params | training state MB | lr (chosen on val) | val acc |"
        " test acc (mean ± std) | min–max | gain over scratch (paired) | forgetting (pre-training loss increase) |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summary:
        gain = "—" if not s["pretrained"] else f"{100 * s['gain']:+.1f} ± {100 * s['gain_std']:.1f}"
        forget = "—" if s["forgetting"] is None else f"{s['forgetting'][0]:+.3f} ± {s['forgetting'][1]:.3f}"
        lines.append(
            f"| {100 * s['label_fraction']:g}% | {s['strategy']} | {s.get('start', 'pre-trained')}"
            f" | {s['trainable']:,} | {_mb(s['train_state_mb'])} | {s['lr']:g} | {pct(s['val_acc'])}"
            f" | {pct(s['test_acc'])} ± {pct(s['test_std'])}"
            f" | {pct(s['test_min'])}–{pct(s['test_max'])} | {gain} |"
            f" {forget} |"
        )
    lines += [
        "",
        "Training state MB: the parameters, their gradients and the optimizer's state at their peak in the run"
        " (`memory/train_state_mb`); activations are not in it (the benchmark's peak RSS has them).",
        "",
        "![test accuracy by strategy](transfer.png)",
        "",
        *(
            ["![test accuracy against freezing depth](freeze_depth.png)", ""]
            if _plot_depth(summary, study_dir / "freeze_depth.png")
            else []
        ),
        "Each strategy's own overrides, after the fine-tuning ones above:",
        "",
        *(f"- {name}: `{' '.join(strategy.overrides)}`" for name, strategy in cfg.strategies.items()),
        "",
        f"All {len(rows)} fine-tuning runs (every LR and seed) are in `results.csv`; each has its own run"
        f" directory under `finetune/`. Study wall time: {seconds:.0f}s.",
        "",
    ]
    path = study_dir / "report.md"
    write_atomic(path, "\n".join(lines))
    return path
