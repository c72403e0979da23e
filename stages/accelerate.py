"""Stage `accelerate`: FlashU-style training-free acceleration of a checkpoint, measured.

From `accelerate.*` it builds each enabled technique alone, the `combined` ones together and all of
them together, through the checkpoint's family (`Family.accelerate`: the techniques act through the
family's own decoding loop and its per-step hook), and reports each against the unaccelerated model
measured in this process: quality, FLOPs, active parameters and latency per sample (interleaved
rounds, median of `latency_repeats`). A technique with no counterpart in a family's decoding (e.g.
a diffusion-head cache for text decoding) is reported as not applicable, with the reason.

Writes `metrics.json` (the reported variant, with `speedup/<task>`: wall-clock, and `speedup_cpu/*`:
this process's CPU time), `accelerate.json` (every variant's metrics, what each technique claims
it saved, and the techniques not applicable), `accelerate.md` (the table) and the family's plots.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from unislim.modeling.accelerate import Acceleration, CfgSchedule, HeadCache, LayerSkip, TaskPruning, TokenPruning
from unislim.modeling.families import from_model_config
from unislim.modeling.scores import read_scores


def run(cfg: Any, inputs: dict, ctx: Any) -> dict[str, str]:
    a, e = cfg.accelerate, cfg.evaluate
    out = Path(ctx.out_dir)
    family = from_model_config(inputs["checkpoint"].path, cfg.model)
    model = family.load(inputs["checkpoint"].path)
    scores = task_scores(Path(inputs["scores"].path)) if "scores" in inputs else None
    acceleration = acceleration_from_config(a)
    ctx.progress(f"{acceleration.describe()} on {inputs['checkpoint'].path} ({family.name})")
    report = family.accelerate(model, acceleration, scores, combined=a.combined,
                               evaluate={"n_und": e.n_und, "n_gen": e.n_gen, "steps": e.steps,
                                         "cfg_scale": e.cfg_scale, "seed": e.seed},
                               latency={"repeats": a.latency_repeats, "und": a.latency_und_samples,
                                        "gen": a.latency_gen_samples},
                               heldout=inputs["heldout"].path if "heldout" in inputs else None,
                               tasks=json.loads(Path(inputs["tasks"].path).read_text()) if "tasks" in inputs else None,
                               out_dir=out, progress=ctx.progress)
    rows, reported = report["rows"], report["reported"]
    metrics = {**rows[reported], "model": rows[reported]["model"]}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "accelerate.json").write_text(json.dumps({
        "checkpoint": inputs["checkpoint"].path, "rows": rows, "work": report["work"],
        "not_applicable": report["not_applicable"]}, indent=1))
    (out / "accelerate.md").write_text(report["table"] + "".join(
        f"\n- `{t}`: not applicable — {why}" for t, why in report["not_applicable"].items()) + "\n")
    speedups = "  ".join(f"{k} {v:.2f}x" for k, v in metrics.items() if k.startswith("speedup/"))
    ctx.progress(f"{metrics['model']}: {speedups}")
    return {"metrics": "metrics.json", "report": "accelerate.json", "table": "accelerate.md"}


def acceleration_from_config(a: Any) -> Acceleration:
    """The pipeline's `accelerate` section as the runtime's settings (disabled techniques are None)."""
    on = lambda section: section.enabled  # noqa: E731
    p, s, c, h, t = a.task_pruning, a.layer_skip, a.cfg_schedule, a.head_cache, a.token_pruning
    return Acceleration(
        task_pruning=TaskPruning(p.keep_und, p.keep_gen, p.full_last_steps, p.keep_text) if on(p) else None,
        layer_skip=LayerSkip(s.every, s.count) if on(s) else None,
        cfg_schedule=CfgSchedule(tuple((float(x), float(y)) for x, y in c.segments)) if on(c) else None,
        head_cache=HeadCache(h.every, h.reuse) if on(h) else None,
        token_pruning=TokenPruning(t.layer, t.keep) if on(t) else None,
    )


def task_scores(folder: Path) -> dict[str, dict]:
    """{kind: scores}: the first score file of each task kind (whole-run scores, not step buckets)."""
    out: dict[str, dict] = {}
    for _, (kind, scores) in read_scores(folder).items():
        out.setdefault(kind, scores)
    return out
