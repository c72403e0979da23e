"""Stage `score`: importance of layers, sublayers, neurons and heads, per calibration task.

Distributed: `score.num_workers` Ray actors each load the model once (on a GPU when asked) and
consume one `streaming_split` of the task's Parquet shards, accumulating float64 sums and counts
(`CalibrationRecorder`). The driver adds them up — an exact reduction, so N workers give the
single-process scores — and worker 0 turns them into scores (it holds the weights). Outputs:
`scores/<task>.safetensors` (see `modeling.importance.scores_from_stats`; generation tasks also
carry `bucket.<b>/...` per denoising-step bucket), `plots/layer_importance.png` and
`plots/neuron_overlap.png` (the paper's Figure 2).
"""

from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path
from typing import Any

import ray
import ray.data
import torch
from safetensors.torch import save_file

from unislim.modeling.importance import merge_stats


@ray.remote
class ScoreWorker:
    """Holds one copy of the model; records statistics over the shards it is handed."""

    def __init__(self, checkpoint: str, trust_remote_code: bool, use_gpu: bool, threads: int):
        from unislim.modeling.adapters import adapter_for
        from unislim.modeling.loading import load_model

        torch.set_num_threads(threads)
        self.model = load_model(checkpoint, trust_remote_code, "cuda" if use_gpu else "cpu")
        self.adapter = adapter_for(self.model)

    def record(self, shard, kind: str, batch_size: int, gen_steps: int, cfg_scale: float | None,
               buckets: int) -> tuple[dict[str, torch.Tensor], int]:
        from unislim.modeling.calibration import run_batch
        from unislim.modeling.importance import CalibrationRecorder

        rows = 0
        # an understanding task never reaches a mixture-of-transformers model's generation copies
        components = ("und",) if kind in ("und", "text") else ("und", "gen")
        with CalibrationRecorder(self.model, self.adapter, components) as recorder:
            for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy"):
                rows += run_batch(self.model, kind, batch, recorder, gen_steps=gen_steps, cfg_scale=cfg_scale,
                                  buckets=buckets)
            recorder.require_data = rows > 0  # an empty shard is fine; a silent hook despite data is not
        return recorder.stats(), rows

    def scores(self, stats: dict[str, torch.Tensor], buckets: list[str]) -> dict[str, torch.Tensor]:
        from unislim.modeling.importance import scores_from_stats

        out = scores_from_stats(stats, self.model, self.adapter)
        for b in buckets:
            out.update({f"bucket.{b}/{k}": v for k, v in
                        scores_from_stats(stats, self.model, self.adapter, prefix=f"bucket.{b}/").items()})
        return out


def run(cfg: Any, inputs: dict, ctx: Any) -> dict[str, str]:
    sc = cfg.score
    ray.data.DataContext.get_current().enable_progress_bars = False  # stage progress lines instead
    tasks = json.loads(Path(inputs["tasks"].path).read_text())
    calib = Path(inputs["calib"].path)
    datasets = {name: ray.data.read_parquet(str(calib / name)).materialize() for name in tasks}  # before the
    # actors take the CPUs, so reading never waits behind them
    workers = [ScoreWorker.options(num_cpus=sc.cpus_per_worker, num_gpus=1 if sc.use_gpu else 0).remote(
        inputs["checkpoint"].path, cfg.model.trust_remote_code, sc.use_gpu, max(1, int(sc.cpus_per_worker)))
        for _ in range(sc.num_workers)]
    out = Path(ctx.out_dir)
    (out / "scores").mkdir(parents=True)
    all_scores: dict[str, dict[str, torch.Tensor]] = {}
    for name, info in tasks.items():
        ctx.progress(f"{name}: {info['rows']} rows over {sc.num_workers} worker(s)")
        shards = datasets[name].streaming_split(sc.num_workers)
        parts = ray.get([w.record.remote(s, info["kind"], sc.batch_size, sc.gen_steps, sc.cfg_scale, sc.step_buckets)
                         for w, s in zip(workers, shards)])
        stats = merge_stats(p[0] for p in parts)
        rows = sum(p[1] for p in parts)
        assert rows == info["rows"], f"{name}: scored {rows} rows of {info['rows']}"
        buckets = [str(b) for b in range(sc.step_buckets)] if info["kind"] == "gen" else []
        scores = ray.get(workers[0].scores.remote(stats, buckets))
        save_file({k: v.contiguous() for k, v in scores.items()}, str(out / "scores" / f"{name}.safetensors"),
                  metadata={"task": name, "kind": info["kind"], "rows": str(rows)})
        all_scores[name] = scores
        ctx.progress(f"{name}: done; least important blocks {_order(scores['layer_importance.block'])[:3]}")
    for w in workers:
        ray.kill(w)

    plot_layer_importance(all_scores, out / "plots" / "layer_importance.png")
    overlap = plot_neuron_overlap(all_scores, out / "plots" / "neuron_overlap.png", sc.overlap_frac)
    metrics = {f"score/overlap/{k}": v for k, v in overlap.items()}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return {"scores": "scores", "plots": "plots"}


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
