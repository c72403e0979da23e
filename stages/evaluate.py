"""Stage `evaluate`: what any checkpoint costs and how close it stays to its source, per task.

For every family, on the held-out rows of each task (the shard stage's `heldout/<task>/`, or rows the
family draws itself):
- `nll/<task>`: mean per-token NLL of the predicted tokens (answers; for text, every next token) —
  `mse/<task>` for a continuous task (the digits model's denoising velocity);
- `agreement/<task>` and `kl/<task>`: top-1 agreement with the source model and KL(source ‖ model) on
  the same positions (`mse_to_source/<task>` for a continuous task);
- `params/total`, `params/active_<task>` (parameters a token of the task passes through) and
  `params/active` (the family's primary task's), `flops/<task>_per_sample` (counted as the model runs,
  `modeling.flops`), `latency_ms/<task>_per_sample` (median of timed rounds, this process);
plus the family's own quality metrics (the digits family: digits-MME, digits-GenEval, digits-FID,
with its decode-time FLOPs and latency, which replace the teacher-forced ones of its tasks; janus and
emu3: `exact_match/<und task>` of greedy answers and a grid of generated images, `plots/generated_<task>.png`).
`metrics.json` has flat keys (also the MLflow metric names) and `"model"`, a description that starts
with the stage that made the checkpoint. `unislim evaluate CHECKPOINT` calls `evaluate_checkpoint`
directly, without Ray or MLflow.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from unislim.modeling.evaluation import heldout_rows, task_metrics


def run(cfg: Any, inputs: dict, ctx: Any) -> dict[str, str]:
    e = cfg.evaluate
    tasks = json.loads(Path(inputs["tasks"].path).read_text()) if "tasks" in inputs else None
    metrics = evaluate_checkpoint(inputs["checkpoint"].path, source=inputs["source"].path if "source" in inputs else None,
                                  heldout=inputs["heldout"].path if "heldout" in inputs else None, tasks=tasks,
                                  model_cfg=cfg.model, n_und=e.n_und, n_gen=e.n_gen, steps=e.steps,
                                  cfg_scale=e.cfg_scale, seed=e.seed, out_dir=ctx.out_dir, progress=ctx.progress)
    headline = {k: v for k, v in metrics.items() if k.split("/")[0] in ("mme", "geneval", "fid", "nll", "agreement")
                and k.count("/") == 1 and (not k.startswith(("mme/", "geneval/")) or k.endswith("overall"))}
    ctx.progress(f"{metrics['model']}: " + "  ".join(f"{k} {v:.4g}" for k, v in headline.items()))
    return {"metrics": "metrics.json", "table": "metrics.md"}


def evaluate_checkpoint(path: str | Path, *, source: str | Path | None = None, heldout: str | Path | None = None,
                        tasks: dict | None = None, model_cfg: Any = None, n_und: int = 40, n_gen: int = 24,
                        steps: int = 20, cfg_scale: float | None = None, seed: int = 0,
                        out_dir: str | Path | None = None, max_rows: int = 256, latency_repeats: int = 3,
                        progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Load a checkpoint (and its source), evaluate it, and with `out_dir` write metrics.json,
    metrics.md and the family's plots. Without `heldout` rows, families that draw their own data
    (digits) use their held-out split; others report size and cost only."""
    from types import SimpleNamespace

    from unislim.modeling.families import from_model_config
    from unislim.modeling.loading import read_config

    path = Path(path)
    read_config(path)  # a clear error for a folder that is no checkpoint, before any weights load
    model_cfg = model_cfg or SimpleNamespace(family="auto", adapter=None, trust_remote_code=False)
    family = from_model_config(path, model_cfg)
    model = family.load(path)
    reference = model if source is None or Path(source).resolve() == path.resolve() else family.load(source)
    rows = heldout_rows(family, heldout, tasks, max_rows, seed)
    progress(f"evaluating {path} ({family.name}: tasks {sorted(rows) or 'none'}"
             + (f", against {source}" if reference is not model else "") + ")")

    metrics: dict[str, Any] = {"model": _description(path)}
    for task, (kind, task_rows) in rows.items():
        metrics.update(task_metrics(family, model, reference, task, kind, task_rows, seed, latency_repeats))
    metrics["params/total"] = float(model.num_parameters())
    for kind in family.kinds:
        metrics[f"params/active_{kind}"] = float(family.active_parameters(model, kind))
    metrics["params/active"] = metrics[f"params/active_{family.primary_task or next(iter(family.kinds))}"]
    metrics.update(family.evaluate(model, out_dir=Path(out_dir) if out_dir else None, progress=progress, n_und=n_und,
                                   n_gen=n_gen, steps=steps, cfg_scale=cfg_scale, seed=seed, rows=rows))
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
        (out / "metrics.md").write_text(metrics_table(metrics))
    return metrics


def _description(path: Path) -> str:
    meta = path / "unislim.json"
    if meta.exists():
        return json.loads(meta.read_text())["description"]
    return f"checkpoint:{path.name}"


def metrics_table(metrics: dict[str, Any]) -> str:
    """Markdown: one row per metric, grouped by prefix."""
    lines = [f"# {metrics.get('model', '')}", "", "| metric | value |", "|---|---|"]
    for k, v in metrics.items():
        if k != "model":
            lines.append(f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |")
    return "\n".join(lines) + "\n"
