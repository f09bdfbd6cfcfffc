"""Plots (matplotlib PNG, headless): training curves, and eval's per-task scores and router confusion."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .eval_types import system_rank


def plot_training_curves(
    train_curves: dict[str, list[tuple[int, float]]],
    val_curves: dict[str, list[tuple[int, float]]],
    path: Path,
    smooth: int = 10,
) -> Path:
    """Train loss (moving average over ``smooth`` steps) and val loss per expert vs. global step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (name, points) in enumerate(sorted(train_curves.items())):
        if not points:
            continue
        color = f"C{i % 10}"
        steps = [s for s, _ in points]
        losses = [v for _, v in points]
        window = max(1, min(smooth, len(losses)))
        averaged = [
            sum(losses[max(0, j - window + 1) : j + 1]) / len(losses[max(0, j - window + 1) : j + 1])
            for j in range(len(losses))
        ]
        ax_train.plot(steps, averaged, color=color, label=name, linewidth=1.2)
        val = val_curves.get(name) or []
        if val:
            ax_val.plot([s for s, _ in val], [v for _, v in val], "o-", color=color, label=name)
    ax_train.set(title=f"train loss (moving avg {smooth})", xlabel="global step", ylabel="loss")
    ax_val.set(title="validation loss", xlabel="global step", ylabel="loss")
    for ax in (ax_train, ax_val):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_scores(tasks: dict[str, Any], title: str, path: Path) -> bool:
    """Grouped bars, one per system, for each task; False (nothing written) without scores."""
    import matplotlib.pyplot as plt

    systems = sorted({s for t in tasks.values() for s in t["systems"]}, key=system_rank)
    if not tasks or not systems:
        return False
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(tasks)), 4))
    width = 0.8 / len(systems)
    for k, system in enumerate(systems):
        values = [tasks[t]["systems"].get(system, {}).get("score", 0.0) for t in tasks]
        ax.bar([i + k * width for i in range(len(tasks))], values, width, label=system)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(tasks))], list(tasks), rotation=20)
    ax.set_ylabel("headline score")
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_reports(report: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Per-task grouped bars (one bar per system; also for unseen wordings) and the router confusion
    matrix, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = {}
    tasks = {**report["tasks"], **report["general"]}
    if _plot_scores(tasks, "per-task score by system", out_dir / "eval_scores.png"):
        paths["scores_png"] = out_dir / "eval_scores.png"
    unseen = report.get("unseen") or {}
    target = out_dir / "eval_unseen_scores.png"
    if unseen.get("tasks") and _plot_scores(unseen["tasks"], "per-task score, unseen wordings", target):
        paths["unseen_scores_png"] = target
    router = report["router"]
    if router["rows"]:
        fig, ax = plt.subplots(figsize=(1.2 * len(router["columns"]) + 2, 0.8 * len(router["rows"]) + 1.5))
        ax.imshow(router["confusion"], cmap="Blues")
        ax.set_xticks(range(len(router["columns"])), router["columns"], rotation=30)
        ax.set_yticks(range(len(router["rows"])), router["rows"])
        for r, counts in enumerate(router["confusion"]):
            for c, value in enumerate(counts):
                ax.text(c, r, str(value), ha="center", va="center", fontsize=9)
        ax.set_xlabel("routed to")
        ax.set_ylabel("true task")
        ax.set_title("router confusion (test split)")
        fig.tight_layout()
        paths["confusion_png"] = out_dir / "eval_confusion.png"
        fig.savefig(paths["confusion_png"], dpi=120)
        plt.close(fig)
    return paths


def plot_sweep(rows: list[dict[str, Any]], chosen: dict[str, int], path: Path) -> Path:
    """A sweep's best validation loss per trial, one panel per expert, the winner highlighted (sweep.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in rows})
    fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(max(5, 4.5 * len(tasks)), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=False):
        trials = [r for r in rows if r["task"] == task]
        losses = [r["best_val_loss"] if r["best_val_loss"] is not None else float("nan") for r in trials]
        colors = ["C2" if chosen.get(task) == r["trial"] else "C0" for r in trials]
        ax.bar(range(len(trials)), losses, color=colors)
        ax.set_xticks(range(len(trials)))
        ax.set_xticklabels([f"lr {r['lr']:.2g}\nr {r['r']}\n{r['steps']} st" for r in trials], fontsize=7)
        ax.set(title=f"{task} (green: winner)", ylabel="best validation loss")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
