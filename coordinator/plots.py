"""metrics.png: accuracy and bytes per round, for a person to look at rather than read."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_metrics(report: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = report.get("rounds", [])
    xs = [0] + [r["round"] for r in rounds]
    acc = [report.get("initial", {}).get("accuracy")] + [r.get("accuracy") for r in rounds]
    fig, (ax_acc, ax_bytes) = plt.subplots(1, 2, figsize=(11, 4))
    if any(a is not None for a in acc):
        ax_acc.plot(xs, [a * 100 if a is not None else None for a in acc], marker="o")
    ax_acc.set(title="Held-out accuracy", xlabel="round (0 = before federation)", ylabel="top-1 accuracy (%)")
    ax_acc.grid(alpha=0.3)
    width = 0.4
    ax_bytes.bar([r["round"] - width / 2 for r in rounds], [r["bytes_up"] / 1024 for r in rounds], width, label="up")
    ax_bytes.bar(
        [r["round"] + width / 2 for r in rounds], [r["bytes_down"] / 1024 for r in rounds], width, label="down"
    )
    ax_bytes.set(title="Adapter traffic per round", xlabel="round", ylabel="KiB")
    ax_bytes.legend(loc="lower right")
    ax_bytes.grid(alpha=0.3, axis="y")
    fig.suptitle(
        f"run {report.get('run_id', '')}: {report.get('recipe', '')} on {Path(str(report.get('model', ''))).name}"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
