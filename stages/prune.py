"""Stage `prune`: a physically smaller model from the scores, no training (Slim & Sparse §3).

`prune.method` × `prune.component`, with scores from `prune.calibration`:
- `neurons`: keep the top (1 − sparsity) of each MLP's neurons (Eq. 7 scores);
- `kv_groups`: remove the lowest-scoring GQA groups (whole KV heads with their query heads);
- `blocks`: remove the least important blocks (1 − cos of the block, Eq. 3). For `both` they are
  deleted; for one component of the reference model that component skips them (the other keeps them);
- `attention` / `mlp`: remove the least important sublayers (reference model; every token).
The checkpoint is saved in Hugging Face layout and reloaded once here to prove it loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from unislim.modeling.surgery import prune as surgery
from unislim.modeling.adapters import adapter_for
from unislim.modeling.loading import load_model


def run(cfg: Any, inputs: dict, ctx: Any) -> dict[str, str]:
    p = cfg.prune
    model = load_model(inputs["checkpoint"].path, cfg.model.trust_remote_code)
    adapter = adapter_for(model)
    calibration, scores = calibration_scores(Path(inputs["scores"].path), p.calibration, p.component)
    before = model.num_parameters()
    ctx.progress(f"{p.method} of {p.component} at sparsity {p.sparsity:.0%}, scores of {calibration}")
    components = ["und", "gen"] if p.component == "both" else [p.component]
    if not adapter.is_mot:
        components = components[:1]  # one weight set serves both tasks
    removed: dict[str, Any] = {}

    if p.method == "neurons":
        for c in components:
            kept = surgery.keep_neurons(model, adapter, c, scores, keep=1.0 - p.sparsity)
            if adapter.is_mot:  # per-component widths (the reference model's config carries both)
                width = len(next(iter(kept.values())))
                setattr(model.config, "intermediate_size" if c == "und" else "intermediate_size_gen", width)
            removed[c] = {"kept_neurons": kept}
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
        if p.method == "blocks" and p.component == "both":
            surgery.drop_layers(model, adapter, drop)
        else:
            _reference_only(model, p.method, p.component)
            attr = {"blocks": f"skip_layers_{p.component}", "attention": "drop_attention_layers",
                    "mlp": "drop_mlp_layers"}[p.method]
            setattr(model.config, attr, drop)
            if p.method != "blocks":
                model = _rebuild(model)  # sublayers listed in the config are not built

    out = Path(ctx.out_dir)
    model.save_pretrained(out / "checkpoint")
    description = f"prune:{p.component}:{p.method}={p.sparsity:g}"
    (out / "checkpoint" / "unislim.json").write_text(json.dumps({"description": description, "stage": "prune"}))
    after = load_model(out / "checkpoint", cfg.model.trust_remote_code).num_parameters()  # it reloads
    report = {"description": description, "calibration": calibration, "params_before": before,
              "params_after": after, "removed": removed}
    (out / "prune.json").write_text(json.dumps(report, indent=1))
    metrics = {"prune/params_before": before, "prune/params_after": after,
               "prune/params_removed_frac": round(1 - after / before, 6)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    ctx.progress(f"{description}: {before:,} → {after:,} parameters")
    return {"checkpoint": "checkpoint", "report": "prune.json"}


def calibration_scores(folder: Path, calibration: str, component: str) -> tuple[str, dict[str, torch.Tensor]]:
    """The scores to prune by: one task's, or the sum over tasks ('all', Eq. 8)."""
    tasks = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            tasks[f.stem] = (st.metadata()["kind"], {k: st.get_tensor(k) for k in st.keys() if "/" not in k})
    if calibration == "auto":
        wanted = {"und": "und", "gen": "gen"}.get(component)
        match = [name for name, (kind, _) in tasks.items() if kind == wanted]
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
        raise ValueError(f"prune.calibration: no scores for task {calibration!r} (have {sorted(tasks)})")
    return calibration, tasks[calibration][1]


def _reference_only(model, method: str, component: str) -> None:
    if model.config.model_type != "unidigits":
        raise ValueError(f"prune.method={method!r} with component={component!r} needs per-task layer skipping, which "
                         f"the reference model has and {model.config.model_type!r} checkpoints do not "
                         "(use method 'blocks' with component 'both')")


def _rebuild(model):
    """Re-create the model from its (edited) config and copy the weights that still exist."""
    fresh = type(model)(model.config)
    state = {k: v for k, v in model.state_dict().items() if k in fresh.state_dict()}
    fresh.load_state_dict(state, strict=False)
    missing = set(fresh.state_dict()) - set(state)
    assert not missing, f"rebuilt model has weights the original lacks: {sorted(missing)[:5]}"
    return fresh.eval()
