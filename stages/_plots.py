"""Plots several stages draw (training curves)."""

from __future__ import annotations

from pathlib import Path


def plot_history(history: dict[str, list[dict]], path: Path, title: str) -> None:
    """Training loss curves, one line per loss key (`loss`, `<task>_loss`, auxiliary losses) and
    phase, phases laid end to end on the step axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    offset = 0
    for phase, entries in history.items():
        if not entries:
            continue
        keys = [k for k in entries[-1] if k == "loss" or k.endswith("_loss")]
        for k in keys:
            values = [(offset + e["step"], e[k]) for e in entries if e.get(k) is not None and e[k] > 0]
            if values:
                ax.plot(*zip(*values), "-" if k == "loss" else "--", label=f"{phase} {k}" if len(history) > 1 else k)
        offset += entries[-1]["step"]
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
