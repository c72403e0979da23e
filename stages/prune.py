"""Stage `prune`: a physically smaller model from the scores, no training (Slim & Sparse §3).

`prune.method` × `prune.component`, with scores from `prune.calibration`, on any family:
- `neurons`: keep the top (1 − sparsity) of each MLP's neurons (Eq. 7 scores); `allocation: global`
  cuts by one threshold over every MLP instead, giving per-layer widths;
- `kv_groups`: remove the lowest-scoring GQA groups (whole KV heads with their query heads);
- `blocks`: remove the least important blocks (1 − cos of the block, Eq. 3). For `both` they are
  deleted; for one task's component, that task's tokens run past them (the other tasks keep them);
- `attention` / `mlp`: remove the least important sublayers (families that can: digits).
The checkpoint is saved in Hugging Face layout with its surgery recorded and reloaded once here
through `load_model` to prove it loads. A cut that removes nothing is an error, not a result.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from unislim.modeling.families import from_model_config
from unislim.modeling.loading import carry_files, load_model
from unislim.modeling.scores import calibration_scores
from unislim.modeling.surgery import prune as surgery
from unislim.modeling.surgery.mod.layer import skip_layers


def run(cfg: Any, inputs: dict, ctx: Any) -> dict[str, str]:
    p = cfg.prune
    family = from_model_config(inputs["checkpoint"].path, cfg.model)
    model = family.load(inputs["checkpoint"].path)
    adapter = family.adapter(model)
    family.stamp(model, adapter)
    calibration, scores = calibration_scores(Path(inputs["scores"].path), p.calibration, p.component)
    before = model.num_parameters()
    ctx.progress(f"{p.method} of {p.component} at sparsity {p.sparsity:.0%}, scores of {calibration}")
    components = ["und", "gen"] if p.component == "both" else [p.component]
    if not adapter.is_mot:
        components = components[:1]  # one weight set serves both tasks
    removed: dict[str, Any] = {}

    if p.method == "neurons":
        for c in components:
            if p.allocation == "global":
                named = {m.name: scores[f"{m.name}.neuron"] for m in adapter.mlps(model, c)}
                widths = surgery.global_widths(named, keep=1.0 - p.sparsity)
                kept = surgery.keep_neurons(model, adapter, c, scores, widths=widths)
            else:
                kept = surgery.keep_neurons(model, adapter, c, scores, keep=1.0 - p.sparsity)
            removed[c] = {"widths": {k: len(v) for k, v in kept.items()}, "kept_neurons": kept}
    elif p.method == "kv_groups":
        n_kv = adapter.attentions(model, components[0])[0].num_kv_heads
        n_drop = round(p.sparsity * n_kv)
        for c in components:
            removed[c] = {"kept_kv_groups": surgery.drop_kv_groups(model, adapter, c, scores, n_drop)}
    else:
        part = {"blocks": "block", "attention": "attn", "mlp": "mlp"}[p.method]
        n_layers = len(adapter.decoder_layers(model))
        protect = (0, n_layers - 1) if p.keep_first_last else ()
        drop = surgery.least_important(scores[f"layer_importance.{part}"], round(p.sparsity * n_layers), protect)
        removed[p.method] = drop
        if not drop:
            raise ValueError(f"prune: {p.method} at sparsity {p.sparsity} removes none of the {n_layers} layers "
                             f"(round({p.sparsity} x {n_layers}) = {round(p.sparsity * n_layers)}"
                             + (", first and last kept" if protect else "") + "): raise prune.sparsity")
        if p.method == "blocks" and p.component == "both":
            surgery.drop_layers(model, adapter, drop)
        elif p.method == "blocks":
            if p.component not in family.kinds:
                raise ValueError(f"prune.component={p.component!r}: the {family.name} family has no such task "
                                 f"(tasks {sorted(family.kinds)}); use component 'both' to delete blocks")
            skip_layers(model, adapter, p.component, drop)
        else:
            if not hasattr(family, "drop_sublayers"):
                raise ValueError(f"prune.method={p.method!r}: the {family.name} family cannot remove sublayers "
                                 "(use method 'blocks' with component 'both')")
            model = family.drop_sublayers(model, p.method, drop)

    out = Path(ctx.out_dir)
    model.save_pretrained(out / "checkpoint")
    carry_files(inputs["checkpoint"].path, out / "checkpoint")
    description = f"prune:{p.component}:{p.method}={p.sparsity:g}"
    (out / "checkpoint" / "unislim.json").write_text(json.dumps({"description": description, "stage": "prune"}))
    after = load_model(out / "checkpoint", family=family).num_parameters()  # it reloads
    if after == before and not (p.method == "blocks" and p.component != "both"):
        raise ValueError(f"prune: {description} removed nothing ({before:,} parameters before and after)")
    report = {"description": description, "calibration": calibration, "params_before": before,
              "params_after": after, "removed": removed}
    (out / "prune.json").write_text(json.dumps(report, indent=1))
    metrics = {"prune/params_before": before, "prune/params_after": after,
               "prune/params_removed_frac": round(1 - after / before, 6)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    ctx.progress(f"{description}: {before:,} → {after:,} parameters")
    return {"checkpoint": "checkpoint", "report": "prune.json"}
