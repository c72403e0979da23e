"""Stage `mod`: task-aware Mixture-of-Depths routers (UniMoD, arXiv 2502.06474) inserted into a
trained checkpoint of any family and trained on Ray Train with DeepSpeed.

1. **Schedule.** `mod.schedule=auto` derives each task's per-layer capacity from the score stage's
   layer importance (1 − block cosine, per task kind; `modeling/surgery/mod/schedule.py`) under a
   budget (the token-weighted mean capacity); `table` takes `mod.table` as given. `schedule.json` and
   `plots/schedule.png` record it.
2. **Routing.** `mod.routing=task`: one router per task in each routed layer (UniMoD); `shared`:
   the task-agnostic baseline, one router and one capacity per layer for every task, at the same
   budget; `none`: the dense control, fine-tuned with the same recipe and no routers.
3. **Training.** The one training loop: every worker inserts the routers (`modeling/surgery/mod`;
   they start at weight ~1, ranking tokens by a least-squares fit of how much each layer changes them:
   `mod.router_init`), reads the training shards and trains under a DeepSpeed ZeRO engine; the
   predictors' BCE (MoD §3.5) is added to the family's loss.
4. **Cost.** FLOPs counted as the routed model actually runs (`modeling.flops`): per training step
   (3 × the forward of one global batch: backward ≈ 2 × forward) and per sample of each task
   (teacher-forced), each beside the dense model's. `plots/token_keep_<task>.png` shows which
   positions each layer processes at inference.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch

from unislim.modeling.families import from_model_config
from unislim.modeling.loading import carry_files
from unislim.modeling.flops import count_flops
from unislim.modeling.scores import by_kind
from unislim.modeling.surgery.mod.layer import route_state, routed_layers
from unislim.modeling.surgery.mod.schedule import auto_schedule, mean_capacity, plot_token_keep, write_schedule
from unislim.modeling.surgery.mod.layer import RoutingRecord
from unislim.pipelines import training


def run(cfg: Any, inputs: dict, ctx: Any) -> dict[str, str]:
    m = cfg.mod
    source = Path(inputs["checkpoint"].path)
    family = from_model_config(source, cfg.model)
    dense = family.load(source)
    tasks = json.loads(Path(inputs["tasks"].path).read_text())
    kinds = {name: tasks[name]["kind"] for name in cfg.mix}
    out = Path(ctx.out_dir)
    prepare, info = mod_prepare(m, family, dense, kinds, cfg.mix, Path(inputs["scores"].path) if "scores" in inputs else None)
    if prepare is not None:
        write_schedule(prepare["capacity_by_layer"], out, routing=m.routing, info=info)
        ctx.progress(f"{m.routing} routing, capacities {prepare['capacity_by_layer']}")
    description = f"mod:{m.routing}" + (f":budget={info['mean_capacity']:.3g}" if prepare is not None else "")

    spec = training.recipe(m, cfg.seed, cfg.mix, family=family.name, adapter=cfg.model.adapter, init=str(source),
                           steps=m.steps, router_lr=m.router_lr, log_prefix="train",
                           prepare={"mod": prepare} if prepare is not None else {})
    folder, state = training.train(ctx, spec, inputs, m)
    shutil.move(str(folder / "model"), out / "checkpoint")
    shutil.rmtree(folder, ignore_errors=True)
    carry_files(source, out / "checkpoint")
    (out / "checkpoint" / "unislim.json").write_text(json.dumps({"description": description, "stage": "mod"}))
    (out / "history.json").write_text(json.dumps({"history": state["history"], "resumed_from": state["resumes"]}))
    model = family.load(out / "checkpoint")  # reloads through its family, routers rebuilt

    metrics = {"mod/steps": m.steps, **{f"mod/final_{k}": v for k, v in state["history"][-1].items()
                                         if k.endswith("loss")}}
    times = [h["busy_s"] / h["steps"] for h in state["history"]]
    metrics["mod/step_time_s"] = round(sum(times) / len(times), 4)
    rows = _first_rows(Path(inputs["train"].path), kinds, m.batch_size)
    metrics.update(cost(family, dense, model, rows, kinds, cfg.mix, m.batch_size, seed=cfg.seed))
    if routed_layers(model):
        record = routing_record(family, model, rows, kinds)
        metrics.update({f"mod/keep/{k}": round(v, 4) for k, v in record.keep_fraction().items()})
        plot_token_keep(record.keep, record.samples, out)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    ctx.progress(f"{description}: training FLOPs saved {metrics['mod/train_flops_saved']:.1%}, "
                 f"{metrics['mod/step_time_s']:.3f}s/step")
    return {"checkpoint": "checkpoint", "history": "history.json"}


def mod_prepare(m: Any, family, model, kinds: dict[str, str], mix: dict[str, float],
                scores: Path | None) -> tuple[dict | None, dict]:
    """The router insertion the training loop applies (None for the dense control) and what the
    schedule was derived from. Routing is per task kind (what the family's task scope names): the
    training tasks' mix shares and `mod.*` task keys are mapped to their kinds."""
    if m.routing == "none":
        return None, {}
    by_kind_of = {}
    for task, kind in kinds.items():
        by_kind_of.setdefault(kind, []).append(task)
    shared = {k: v for k, v in by_kind_of.items() if len(v) > 1}
    if shared:
        raise ValueError(f"mod: routers are per task kind, and training tasks {shared} share one; give each kind "
                         "one training task")
    adapter = family.adapter(model)
    layers = len(adapter.decoder_layers(model))
    tokens = {kinds[t]: mix[t] * family.tokens_per_sample(kinds[t], model.config) for t in mix}
    weights = {k: n / sum(tokens.values()) for k, n in tokens.items()}
    info: dict[str, Any] = {"weights": weights}
    if m.schedule == "table":
        capacity = {kinds[t]: [float(c) for c in m.table.get(t, [1.0] * layers)] for t in mix}
        bad = {k: len(c) for k, c in capacity.items() if len(c) != layers}
        if bad:
            raise ValueError(f"mod.table: the model has {layers} layers, the table gives {bad}")
    else:
        importance = by_kind(scores, "layer_importance.block")
        missing = sorted(set(weights) - set(importance))
        if missing:
            raise ValueError(f"mod.schedule=auto needs scores of every training task's kind; {scores} lacks {missing}")
        importance = {k: importance[k] for k in weights}
        info["importance"] = {k: v.tolist() for k, v in importance.items()}
        capacity = auto_schedule(importance, budget=m.budget, weights=weights, min_capacity=m.min_capacity,
                                 max_importance=m.max_importance, sharpness=m.sharpness,
                                 shared=m.routing == "shared")
    info["mean_capacity"] = mean_capacity(capacity, weights)
    causal = ([kinds[t] for t in m.causal_tasks] if m.causal_tasks is not None
              else [k for k in weights if k in family.causal_kinds])
    keep_last = ({kinds[t]: n for t, n in m.keep_last.items()} if m.keep_last is not None
                 else {k: n for k, n in family.mod_keep_last.items() if k in weights})
    prepare = {"capacity": {k: {str(i): c for i, c in enumerate(caps)} for k, caps in capacity.items()},
               "capacity_by_layer": capacity, "routing": m.routing, "causal_tasks": causal, "keep_last": keep_last,
               "aux_weight": m.aux_weight, "router_init": m.router_init}
    return prepare, info


def _first_rows(train: Path, kinds: dict[str, str], batch_size: int) -> dict[str, dict]:
    """The first `batch_size` training rows of each task (a fixed batch for the cost counts)."""
    import numpy as np

    out = {}
    for task in kinds:
        table = pq.read_table(sorted((train / task).glob("*.parquet"))[0]).slice(0, batch_size)
        out[task] = {}
        for name in table.column_names:
            values = table.column(name).to_pylist()
            column = np.empty(len(values), dtype=object)
            for i, v in enumerate(values):
                column[i] = v
            out[task][name] = column if isinstance(values[0], list) else np.array(values)
    return out


@torch.no_grad()
def cost(family, dense, model, rows: dict[str, dict], kinds: dict[str, str], mix: dict[str, float],
         batch_size: int, seed: int = 0) -> dict[str, float]:
    """Training FLOPs per step (3 × the forward of one global batch, in training mode: top-k routing
    and the predictors' loss) and teacher-forced FLOPs per sample of each task, of `model` and `dense`."""
    counts = training.local_counts(mix, batch_size)
    batch_rows = {kinds[t]: {k: v[:counts[t]] for k, v in rows[t].items()} for t in mix}
    batch = family.collate(batch_rows, torch.Generator().manual_seed(seed), dense.config)
    out: dict[str, float] = {}
    for name, net in (("dense", dense), ("mod", model)):
        was_training = net.training
        net.train()
        out[f"{name}/train"] = 3 * count_flops(lambda: family.loss(net, batch))
        net.eval()
        for task in mix:
            n = len(next(iter(rows[task].values())))
            out[f"{name}/{task}"] = count_flops(lambda: family.eval_batch(
                net, kinds[task], rows[task], torch.Generator().manual_seed(seed))) / n
        net.train(was_training)
    metrics = {"mod/train_flops_per_step": out["mod/train"], "mod/dense_train_flops_per_step": out["dense/train"],
               "mod/train_flops_saved": round(1 - out["mod/train"] / out["dense/train"], 6)}
    for task in mix:
        metrics[f"mod/{task}_flops_per_sample"] = out[f"mod/{task}"]
        metrics[f"mod/{task}_flops_saved"] = round(1 - out[f"mod/{task}"] / out[f"dense/{task}"], 6)
    return metrics


@torch.no_grad()
def routing_record(family, model, rows: dict[str, dict], kinds: dict[str, str]) -> RoutingRecord:
    """Which tokens each layer processes at inference, on a batch of every task."""
    model.eval()
    state = route_state(model)
    state.record = RoutingRecord()
    try:
        for task, r in rows.items():
            family.eval_batch(model, kinds[task], r, torch.Generator().manual_seed(1))
        return state.record
    finally:
        state.record = None
