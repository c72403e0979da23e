"""Held-out metrics any family gets: NLL (or MSE), agreement and KL with the source, FLOPs, latency.

`task_metrics(family, model, reference, task, kind, rows)` runs `family.eval_batch` on both models
over the same rows and reduces the outputs; `heldout_rows` reads a shard stage's `heldout/` folder
(or lets a family that draws its own data draw it).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

EVAL_BATCH = 16


def heldout_rows(family, heldout: str | Path | None, tasks: dict | None, max_rows: int,
                  seed: int) -> dict[str, tuple[str, dict]]:
    """task → (kind, rows as column arrays), at most `max_rows` per task."""
    out = {}
    if heldout is not None:
        import json

        import pyarrow as pa
        import pyarrow.parquet as pq

        listing = Path(heldout).parent / "tasks.json"  # beside a shard stage's heldout/: the task kinds
        if tasks is None and listing.is_file():
            tasks = json.loads(listing.read_text())

        for folder in sorted(p for p in Path(heldout).iterdir() if p.is_dir()):
            kind = (tasks or {}).get(folder.name, {}).get("kind", folder.name)
            table = pa.concat_tables([pq.read_table(f) for f in sorted(folder.glob("*.parquet"))]).slice(0, max_rows)
            out[folder.name] = (kind, columns(table))
        return out
    for kind in family.kinds:
        try:
            drawn = family.reference_rows(kind, min(max_rows, 64), seed + 17, "heldout", targets=True)
        except ValueError:
            return {}
        import pyarrow as pa

        out[kind] = (kind, columns(pa.Table.from_pylist(drawn)))
    return out


def columns(table) -> dict[str, np.ndarray]:
    out = {}
    for name in table.column_names:
        values = table.column(name).to_pylist()
        if values and isinstance(values[0], (list, bytes)):
            column = np.empty(len(values), dtype=object)
            for i, v in enumerate(values):
                column[i] = v
            out[name] = column
        else:
            out[name] = np.array(values)
    return out


@torch.no_grad()
def task_metrics(family, model, reference, task: str, kind: str, rows: dict, seed: int,
                 latency_repeats: int = 3) -> dict[str, float]:
    """Held-out NLL (or MSE), agreement and KL with `reference`, FLOPs and latency per sample."""
    from unislim.modeling.families import TokenOutputs
    from unislim.modeling.flops import count_flops

    n = len(next(iter(rows.values())))
    nll = agree = kl = mse = to_source = 0.0
    positions = 0
    for lo in range(0, n, EVAL_BATCH):
        batch = {k: v[lo:lo + EVAL_BATCH] for k, v in rows.items()}
        out = family.eval_batch(model, kind, batch, torch.Generator().manual_seed(seed + lo))
        ref = out if reference is model else family.eval_batch(reference, kind, batch,
                                                                torch.Generator().manual_seed(seed + lo))
        if isinstance(out, TokenOutputs):
            logp, ref_logp = F.log_softmax(out.logits.double(), -1), F.log_softmax(ref.logits.double(), -1)
            nll += float(F.nll_loss(logp, out.targets.to(logp.device), reduction="sum"))
            agree += float((out.logits.argmax(-1) == ref.logits.argmax(-1)).sum())
            kl += float((ref_logp.exp() * (ref_logp - logp)).sum())
            positions += len(out.targets)
        else:
            mse += float(((out.prediction.double() - out.target.double()) ** 2).mean(-1).sum())
            to_source += float(((out.prediction.double() - ref.prediction.double()) ** 2).mean(-1).sum())
            positions += out.prediction[..., 0].numel()
    if positions == 0:
        raise ValueError(f"evaluate: task {task!r} has no predicted positions in its {n} held-out rows")
    metrics = {}
    if family.kinds[kind].loss == "nll":
        metrics.update({f"nll/{task}": nll / positions, f"agreement/{task}": agree / positions,
                        f"kl/{task}": max(0.0, kl / positions)})
    else:
        metrics.update({f"mse/{task}": mse / positions, f"mse_to_source/{task}": to_source / positions})
    sample = {k: v[:min(n, EVAL_BATCH)] for k, v in rows.items()}
    m = len(next(iter(sample.values())))
    call = lambda: family.eval_batch(model, kind, sample, torch.Generator().manual_seed(seed))  # noqa: E731
    metrics[f"flops/{task}_per_sample"] = count_flops(call) / m
    times = []
    for _ in range(latency_repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    metrics[f"latency_ms/{task}_per_sample"] = 1000 * statistics.median(times) / m
    return metrics


