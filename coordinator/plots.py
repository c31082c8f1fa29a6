"""metrics.png: accuracy, loss, participants, traffic and LoRA aggregation error per round."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _series(rounds: list[dict[str, Any]], key: str, scale: float = 1.0) -> list[float | None]:
    return [None if r.get(key) is None else r[key] * scale for r in rounds]


def plot_metrics(report: dict[str, Any], path: Path) -> Path:
    """Write the figure atomically (a reader never sees half a PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = report.get("rounds", [])
    xs = [r["round"] for r in rounds]
    initial = report.get("initial") or {}
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    (ax_acc, ax_loss, ax_people), (ax_bytes, ax_error, ax_text) = axes

    accuracy = [initial.get("accuracy")] + [r.get("accuracy") for r in rounds]
    if any(a is not None for a in accuracy):
        ax_acc.plot([0, *xs], [None if a is None else a * 100 for a in accuracy], marker="o")
    ax_acc.set(title="Held-out accuracy", xlabel="round (0 = before federation)", ylabel="top-1 (%)")

    ax_loss.plot(xs, _series(rounds, "loss"), marker="o", label="held-out loss")
    ax_loss.plot(xs, _series(rounds, "train_loss"), marker="s", label="clients' train loss")
    ax_loss.set(title="Loss", xlabel="round")
    ax_loss.legend()

    ax_people.plot(xs, _series(rounds, "selected"), marker="o", label="selected")
    ax_people.plot(xs, _series(rounds, "participants"), marker="s", label="accepted")
    ax_people.set(title="Clients per round", xlabel="round")
    ax_people.set_ylim(bottom=0)
    ax_people.legend()

    width = 0.4
    ax_bytes.bar([x - width / 2 for x in xs], _series(rounds, "bytes_up", 1 / 1024), width, label="up")
    ax_bytes.bar([x + width / 2 for x in xs], _series(rounds, "bytes_down", 1 / 1024), width, label="down")
    ax_bytes.set(title="Adapter traffic", xlabel="round", ylabel="KiB")
    ax_bytes.legend(loc="lower right")

    ax_error.plot(xs, _series(rounds, "aggregation_error"), marker="o", color="tab:red")
    ax_error.set(title="Naive-averaging error ||Σw·BA − (Σw·B)(Σw·A)||", xlabel="round", ylabel="Frobenius norm")

    ax_text.axis("off")
    rejections = report.get("rejections") or {}
    strategy = report.get("strategy") or {}  # Strategy.describe(); a bare name in reports before it
    strategy_name = strategy.get("name", "") if isinstance(strategy, dict) else strategy
    lines = [
        f"run: {report.get('run_id', '')}",
        f"model: {Path(str(report.get('model', ''))).name}",
        f"recipe: {report.get('recipe', '')}   strategy: {strategy_name}",
        f"rounds: {len(rounds)} of {report.get('rounds_planned', '?')}",
        "rejected updates: " + (", ".join(f"{k} {v}" for k, v in sorted(rejections.items())) or "none"),
    ]
    ax_text.text(0.0, 0.9, "\n".join(lines), va="top", family="monospace", fontsize=10)
    for ax in axes.flat[:5]:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path
