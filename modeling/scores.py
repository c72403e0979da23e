"""One reader for the score stage's files (`scores/<task>.safetensors`)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open


def read_scores(folder: str | Path, buckets: bool = False) -> dict[str, tuple[str, dict[str, torch.Tensor]]]:
    """{task: (kind, {score name: tensor})}; step-bucket entries (`bucket.<b>/...`) only with `buckets`."""
    tasks = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            tasks[f.stem] = (st.metadata()["kind"], {k: st.get_tensor(k) for k in st.keys() if buckets or "/" not in k})
    if not tasks:
        raise FileNotFoundError(f"{folder}: no score files (*.safetensors)")
    return tasks


def calibration_scores(folder: str | Path, calibration: str, component: str) -> tuple[str, dict[str, torch.Tensor]]:
    """The scores to cut by: one task's, the sum over tasks ('all', Eq. 8), or ('auto') the task
    whose kind is `component` (the sum when there is none)."""
    tasks = read_scores(folder)
    if calibration == "auto":
        match = [name for name, (kind, _) in tasks.items() if kind == component]
        calibration = match[0] if match else "all"
    if calibration == "all":
        total: dict[str, torch.Tensor] = {}
        for _, scores in tasks.values():
            for k, v in scores.items():
                if k in total and total[k].shape == v.shape:
                    total[k] = total[k] + v
                elif k not in total:
                    total[k] = v.clone()
        return "all", total
    if calibration not in tasks:
        raise ValueError(f"calibration: no scores for task {calibration!r} (have {sorted(tasks)})")
    return calibration, tasks[calibration][1]


def by_kind(folder: str | Path, key: str) -> dict[str, torch.Tensor]:
    """One score (e.g. `layer_importance.block`) per task kind, averaged over the tasks of that kind."""
    found: dict[str, list[torch.Tensor]] = {}
    for _, (kind, scores) in read_scores(folder).items():
        found.setdefault(kind, []).append(scores[key])
    return {k: torch.stack(v).mean(0) for k, v in found.items()}
