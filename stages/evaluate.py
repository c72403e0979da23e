"""Stage `evaluate`: digits-MME, digits-GenEval, digits-FID, size, FLOPs and latency of a checkpoint.

Works on any checkpoint of the reference family that a stage produced (or a user path). Writes
`metrics.json` with the flat keys of DESIGN.md "Contracts" (also the MLflow metric names), a
markdown table, and the generated-scene grid. `unislim evaluate CHECKPOINT` calls
`evaluate_checkpoint` directly, without Ray or MLflow.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable



def run(cfg: Any, inputs: dict, ctx: Any) -> dict[str, str]:
    e = cfg.evaluate
    metrics = evaluate_checkpoint(inputs["checkpoint"].path, n_und=e.n_und, n_gen=e.n_gen, steps=e.steps,
                                  cfg_scale=e.cfg_scale, seed=e.seed, out_dir=ctx.out_dir, progress=ctx.progress)
    ctx.progress(f"{metrics['model']}: mme {metrics['mme/overall']:.3f}  geneval {metrics['geneval/overall']:.3f}  "
                 f"fid {metrics['fid/gen']:.3f}")
    return {"metrics": "metrics.json", "table": "metrics.md"}


def evaluate_checkpoint(path: str | Path, *, n_und: int = 40, n_gen: int = 24, steps: int = 20,
                        cfg_scale: float | None = None, seed: int = 0, out_dir: str | Path | None = None,
                        progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Load a checkpoint, evaluate it, and (with `out_dir`) write metrics.json, metrics.md, plots."""
    from transformers import AutoConfig

    from unislim.modeling.loading import load_model
    from unislim.modeling.families.digits import DigitJudge, UniDigitsConfig, evaluate_reference

    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"evaluate: {path} is not a Hugging Face checkpoint folder (no config.json)")
    config = AutoConfig.from_pretrained(path, trust_remote_code=False)  # checked before any weights load
    if not isinstance(config, UniDigitsConfig):
        raise ValueError(f"evaluate: {path} holds a {config.model_type!r} model; digits-MME/GenEval evaluate the "
                         f"reference model family ({UniDigitsConfig.model_type!r}) and what stages derive from it")
    model = load_model(path)
    progress(f"evaluating {path} ({n_und} samples per question type, {n_gen} prompts per category, {steps} steps)")
    DigitJudge.get()  # trained once per process, with gradients on
    metrics: dict[str, Any] = {"model": _description(path)}
    metrics.update(evaluate_reference(model, n_und=n_und, n_gen=n_gen, steps=steps, cfg_scale=cfg_scale,
                                      seed=seed, out_dir=out_dir))
    if out_dir is not None:
        out = Path(out_dir)
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
