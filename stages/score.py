"""Stage `score`: importance of layers, sublayers, neurons and heads, per calibration task.

Distributed: `score.num_workers` Ray actors each load the model once (on a GPU when asked) through
its family, and each records a fixed, contiguous slice of every task's calibration rows
(`family.calibrate` sets the token mask and step buckets; `CalibrationRecorder` accumulates float64
sums and counts). The driver adds the slices' sums up in worker order — an exact, deterministic
reduction, so N workers give the single-process scores and a forced rerun gives the same bits —
and worker 0 turns them into scores (it holds the weights). Calibration sets are small (128 rows),
so the driver reads them with pyarrow and hands each actor its rows directly.

Outputs: `scores/<task>.safetensors` (see `modeling.importance.scores_from_stats`; generation tasks
also carry `bucket.<b>/...` per denoising-step bucket), `plots/layer_importance.png` and
`plots/neuron_overlap.png` (the paper's Figure 2).
"""

from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import ray
import torch
from safetensors.torch import save_file

from unislim.modeling.importance import merge_stats


@ray.remote
class ScoreWorker:
    """Holds one copy of the model; records statistics over the rows it is handed."""

    def __init__(self, checkpoint: str, model_cfg: dict, use_gpu: bool, threads: int):
        from types import SimpleNamespace

        from unislim.modeling.families import from_model_config

        torch.set_num_threads(threads)
        self.family = from_model_config(checkpoint, SimpleNamespace(**model_cfg))
        self.model = self.family.load(checkpoint, device="cuda" if use_gpu else "cpu")
        self.adapter = self.family.adapter(self.model)

    def record(self, rows: dict[str, np.ndarray], kind: str, batch_size: int, options: dict) -> tuple[dict, int]:
        from unislim.modeling.importance import CalibrationRecorder

        n = len(next(iter(rows.values()))) if rows else 0
        done = 0
        # an understanding task never reaches a mixture-of-transformers model's generation copies
        components = ("und",) if kind in ("und", "text") else ("und", "gen")
        with CalibrationRecorder(self.model, self.adapter, components) as recorder:
            for lo in range(0, n, batch_size):
                batch = {k: v[lo:lo + batch_size] for k, v in rows.items()}
                done += self.family.calibrate(self.model, kind, batch, recorder, **options)
            recorder.require_data = done > 0  # an empty slice is fine; a silent hook despite data is not
        return recorder.stats(), done

    def scores(self, stats: dict[str, torch.Tensor], buckets: list[str]) -> dict[str, torch.Tensor]:
        from unislim.modeling.importance import scores_from_stats

        out = scores_from_stats(stats, self.model, self.adapter)
        for b in buckets:
            out.update({f"bucket.{b}/{k}": v for k, v in
                        scores_from_stats(stats, self.model, self.adapter, prefix=f"bucket.{b}/").items()})
        return out


def _read_rows(folder: Path) -> dict[str, np.ndarray]:
    """Every calibration row of a task, in shard order, column → numpy array (object for lists)."""
    import pyarrow as pa

    table = pa.concat_tables([pq.read_table(f) for f in sorted(folder.glob("*.parquet"))])
    out = {}
    for name in table.column_names:
        if str(table.schema.field(name).type).startswith(("list", "large_list")):
            values = table.column(name).to_pylist()
            out[name] = np.empty(len(values), dtype=object)  # one list per row, whatever their lengths
            for i, v in enumerate(values):
                out[name][i] = v
        else:
            out[name] = table.column(name).to_numpy(zero_copy_only=False)
    return out


def run(cfg: Any, inputs: dict, ctx: Any) -> dict[str, str]:
    sc = cfg.score
    tasks = {k: v for k, v in json.loads(Path(inputs["tasks"].path).read_text()).items() if v.get("rows")}
    calib = Path(inputs["calib"].path)
    rows = {name: _read_rows(calib / name) for name in tasks}
    model_cfg = cfg.model.model_dump()
    workers = [ScoreWorker.options(num_cpus=sc.cpus_per_worker, num_gpus=1 if sc.use_gpu else 0).remote(
        inputs["checkpoint"].path, model_cfg, sc.use_gpu, max(1, int(sc.cpus_per_worker)))
        for _ in range(sc.num_workers)]
    out = Path(ctx.out_dir)
    (out / "scores").mkdir(parents=True)
    options = {"gen_steps": sc.gen_steps, "cfg_scale": sc.cfg_scale, "buckets": sc.step_buckets, "cfg": sc.cfg}
    all_scores: dict[str, dict[str, torch.Tensor]] = {}
    for name, info in tasks.items():
        n = info["rows"]
        ctx.progress(f"{name}: {n} rows over {sc.num_workers} worker(s)")
        bounds = np.linspace(0, n, sc.num_workers + 1).round().astype(int)  # contiguous slices, fixed
        parts = ray.get([w.record.remote({k: v[lo:hi] for k, v in rows[name].items()}, info["kind"], sc.batch_size,
                                         options) for w, lo, hi in zip(workers, bounds[:-1], bounds[1:])])
        stats = merge_stats(p[0] for p in parts)  # in worker order: deterministic
        scored = sum(p[1] for p in parts)
        assert scored == n, f"{name}: scored {scored} rows of {n}"
        _check_finite(name, stats)
        buckets = [str(b) for b in range(sc.step_buckets)] if info["kind"] == "gen" else []
        scores = ray.get(workers[0].scores.remote(stats, buckets))
        save_file({k: v.contiguous() for k, v in scores.items()}, str(out / "scores" / f"{name}.safetensors"),
                  metadata={"kind": info["kind"]})  # one key: safetensors writes several in random order
        all_scores[name] = scores
        ctx.progress(f"{name}: done; least important blocks {_order(scores['layer_importance.block'])[:3]}")
    for w in workers:
        ray.kill(w)

    plot_layer_importance(all_scores, out / "plots" / "layer_importance.png")
    overlap = plot_neuron_overlap(all_scores, out / "plots" / "neuron_overlap.png", sc.overlap_frac)
    metrics = {f"score/overlap/{k}": v for k, v in overlap.items()}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return {"scores": "scores", "plots": "plots"}


def _check_finite(task: str, stats: dict[str, torch.Tensor]) -> None:
    bad = sorted(k for k, v in stats.items() if not torch.isfinite(v).all())
    if bad:
        raise ValueError(f"score: task {task!r} gave non-finite statistics ({len(bad)} of {len(stats)}, e.g. "
                         f"{bad[:3]}): the calibration rows or the model produce NaN/inf; nothing was saved")


def _order(importance: torch.Tensor) -> list[int]:
    return torch.argsort(importance).tolist()


def plot_layer_importance(all_scores: dict[str, dict[str, torch.Tensor]], path: Path) -> None:
    """Heatmaps, tasks × layers, of 1 − cos(in, out) for the block, attention and MLP (Eq. 3)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    tasks = list(all_scores)
    fig, axes = plt.subplots(3, 1, figsize=(7, 1.2 + 1.1 * 3 * max(1, len(tasks)) / 2), squeeze=False)
    for ax, part in zip(axes[:, 0], ("block", "attn", "mlp")):
        data = torch.stack([all_scores[t][f"layer_importance.{part}"] for t in tasks]).numpy()
        im = ax.imshow(data, aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(tasks)), tasks)
        ax.set_xticks(range(data.shape[1]))
        ax.set_title(f"{part}: 1 − cos(input, output)", fontsize=9)
        fig.colorbar(im, ax=ax)
    axes[-1, 0].set_xlabel("layer")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_neuron_overlap(all_scores: dict[str, dict[str, torch.Tensor]], path: Path, frac: float) -> dict[str, float]:
    """Per layer, the overlap of the top-`frac` neurons between every pair of tasks (Figure 2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from unislim.modeling.importance import top_overlap

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    summary = {}
    for a, b in combinations(all_scores, 2):
        mlps = sorted({k[: -len(".neuron")] for k in all_scores[a] if k.endswith(".neuron") and "/" not in k}
                      & {k[: -len(".neuron")] for k in all_scores[b] if k.endswith(".neuron")})
        for family in sorted({m.rsplit(".", 1)[1] for m in mlps}):  # "mlp", "mlp_moe_gen"
            names = sorted((m for m in mlps if m.endswith("." + family)), key=lambda m: int(m.split(".")[-2]))
            values = [top_overlap(all_scores[a][f"{n}.neuron"], all_scores[b][f"{n}.neuron"], frac) for n in names]
            layers = [int(n.split(".")[-2]) for n in names]
            ax.plot(layers, values, marker="o", label=f"{a} vs {b} ({family})")
            summary[f"{a}-{b}/{family}"] = sum(values) / len(values)
    ax.axhline(frac, color="grey", ls=":", label=f"chance ({frac:.0%})")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("layer")
    ax.set_ylabel(f"top-{frac:.0%} neuron overlap")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return summary
