"""Which layers route which task's tokens, and at what capacity (UniMoD, arXiv 2502.06474 §3).

UniMoD's analysis: how redundant a layer is differs by task (generation tokens change little in
many layers, understanding tokens more), so the capacity should be chosen per task and layer. Here
the redundancy signal is the score stage's layer importance `1 − cos(block input, block output)`
per task (Slim & Sparse Eq. 3): a layer that barely changes a task's tokens can skip many of them.

`auto_schedule`: a layer whose importance for task t exceeds `max_importance` stays dense for t;
every other (task, layer) skips a fraction of tokens inversely proportional to its importance
raised to `sharpness`, `1 − c = min(1 − min_capacity, λ / importance^sharpness)`, with λ set
(bisection) so the token-weighted mean capacity over tasks and layers equals `budget`
(sharpness 0: every routed pair skips alike; 1: a layer half as important skips twice as much). `shared=True` gives the task-agnostic baseline:
the task-weighted mean importance stands for every task, so each layer has one capacity for all.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def _mean_capacity(caps: dict[str, torch.Tensor], weights: dict[str, float]) -> float:
    return sum(weights[t] * float(caps[t].mean()) for t in caps)


def auto_schedule(importance: dict[str, torch.Tensor], *, budget: float, weights: dict[str, float] | None = None,
                  min_capacity: float = 0.25, max_importance: float = 0.3, sharpness: float = 1.0,
                  shared: bool = False) -> dict[str, list[float]]:
    """importance: task → (L,) layer importance; weights: task → share of training tokens (sum 1).

    Returns task → (L,) capacities in [min_capacity, 1]. Raises if `budget` cannot be reached.
    """
    tasks = sorted(importance)
    weights = weights or {t: 1.0 / len(tasks) for t in tasks}
    imp = {t: importance[t].double().clamp(min=1e-6) for t in tasks}
    if shared:
        mean = sum(weights[t] * imp[t] for t in tasks)
        imp = {t: mean for t in tasks}
    routed = {t: imp[t] <= max_importance for t in tasks}  # (L,) bool

    def capacities(lam: float) -> dict[str, torch.Tensor]:
        skip = {t: (lam / imp[t] ** sharpness).clamp(max=1.0 - min_capacity) for t in tasks}
        return {t: torch.where(routed[t], 1.0 - skip[t], torch.ones_like(skip[t])) for t in tasks}

    floor = _mean_capacity(capacities(1e9), weights)
    if budget < floor - 1e-9:
        raise ValueError(f"mod budget {budget} is below the {floor:.3f} reachable with min_capacity {min_capacity} "
                         f"on the routed layers {({t: routed[t].nonzero().flatten().tolist() for t in tasks})}")
    lo, hi = 0.0, 1.0
    while _mean_capacity(capacities(hi), weights) > budget:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _mean_capacity(capacities(mid), weights) > budget else (lo, mid)
    return {t: [round(float(c), 4) for c in capacities(hi)[t]] for t in tasks}


def mean_capacity(schedule: dict[str, list[float]], weights: dict[str, float]) -> float:
    """Token-weighted mean capacity of a schedule (what equal-FLOPs comparisons match)."""
    return _mean_capacity({t: torch.tensor(c) for t, c in schedule.items()}, weights)


def write_schedule(schedule: dict[str, list[float]], folder: Path, *, routing: str, info: dict) -> None:
    """`schedule.json` and `plots/schedule.png` (capacity per task and layer, annotated)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    (folder / "plots").mkdir(parents=True, exist_ok=True)
    (folder / "schedule.json").write_text(json.dumps({"routing": routing, "capacity": schedule, **info}, indent=1))
    tasks = sorted(schedule)
    grid = torch.tensor([schedule[t] for t in tasks])  # (tasks, L)
    fig, ax = plt.subplots(figsize=(1.2 + 0.8 * grid.shape[1], 0.8 + 0.6 * len(tasks)))
    ax.imshow(grid.numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for (i, j), c in zip(torch.cartesian_prod(torch.arange(len(tasks)), torch.arange(grid.shape[1])).tolist(),
                         grid.flatten().tolist()):
        ax.text(j, i, f"{c:.2f}", ha="center", va="center", color="white" if c < 0.6 else "black", fontsize=8)
    ax.set_yticks(range(len(tasks)), tasks)
    ax.set_xticks(range(grid.shape[1]))
    ax.set_xlabel("layer")
    ax.set_title(f"MoD capacity ({routing} routing)", fontsize=9)
    fig.tight_layout()
    fig.savefig(folder / "plots" / "schedule.png", dpi=120)
    plt.close(fig)


def plot_token_keep(keep: dict[tuple[str, int, int], torch.Tensor], samples: dict[tuple[str, int, int], int],
                    folder: Path) -> list[str]:
    """`plots/token_keep_<task>.png`: for each task, layers × positions, how often a position was
    processed (from `RoutingRecord`, at the most frequent sequence length of that task)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder) / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for task in sorted({k[0] for k in keep}):
        lengths = {}
        for (t, _, T), n in samples.items():
            if t == task:
                lengths[T] = lengths.get(T, 0) + n
        T = max(lengths, key=lengths.get)
        layers = sorted(l for t, l, t_len in keep if t == task and t_len == T)
        grid = torch.stack([keep[(task, l, T)] / samples[(task, l, T)] for l in layers])  # (L, T)
        fig, ax = plt.subplots(figsize=(2 + 0.15 * T, 1 + 0.4 * len(layers)))
        im = ax.imshow(grid.numpy(), vmin=0, vmax=1, cmap="magma", aspect="auto")
        ax.set_yticks(range(len(layers)), [f"layer {l}" for l in layers])
        ax.set_xlabel("token position")
        ax.set_title(f"{task}: share of samples in which each token is processed (T={T})", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.03)
        fig.tight_layout()
        name = f"token_keep_{task}.png"
        fig.savefig(folder / name, dpi=120)
        plt.close(fig)
        written.append(f"plots/{name}")
    return written
