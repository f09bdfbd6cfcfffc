"""Training plots (matplotlib PNG, headless)."""

from __future__ import annotations

from pathlib import Path


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
