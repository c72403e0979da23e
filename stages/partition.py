"""Stage `partition`: dense MLPs → shared + routed experts, no training (Slim & Sparse §4.2).

For each chosen MLP of the generation path, neurons are ranked by their cumulative importance
over the calibration tasks (`S_i = Σ_t s_i^(t)`, Eq. 8); the top `num_shared` experts' worth become
the shared experts and the rest are dealt to the routed experts by rank, so every routed expert
gets a similar mix of important and unimportant neurons (`modeling/moe/partition.py`). Expert
weights are slices of the dense weights: with every expert active the model is the dense one.

Writes `checkpoint/` (the MoE model, Hugging Face layout), `partition.json` (neuron → expert per
layer) and `plots/expert_scores.png` (each expert's share of its layer's importance).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from unislim.modeling.families import from_model_config
from unislim.modeling.loading import carry_files, load_model
from unislim.modeling.scores import calibration_scores
from unislim.modeling.surgery.moe.convert import convert_to_moe


def run(cfg: Any, inputs: dict, ctx: Any) -> dict[str, str]:
    p = cfg.partition
    family = from_model_config(inputs["checkpoint"].path, cfg.model)
    model = family.load(inputs["checkpoint"].path)
    adapter = family.adapter(model)
    family.stamp(model, adapter)
    calibration, scores = calibration_scores(Path(inputs["scores"].path), p.calibration, p.component)
    mlps = adapter.mlps(model, p.component)
    n_layers = len(adapter.decoder_layers(model))
    layers = p.layers if p.layers is not None else list(range(1, n_layers - 1))
    neuron_scores = {m.name: scores[f"{m.name}.neuron"] for m in mlps if m.layer in layers and f"{m.name}.neuron" in scores}
    # the tasks whose tokens run these MLPs dense: every task but the one the sparse path serves (one MLP
    # for both tasks: understanding stays dense; a mixture-of-transformers' generation copy sees gen only)
    sparse = family.primary_task if family.primary_task in family.kinds else next(iter(family.kinds))
    dense_tasks = [] if adapter.is_mot else [k for k in family.kinds if k != sparse]
    ctx.progress(f"{len(neuron_scores)} MLP(s) → {p.num_experts} experts ({p.num_shared} shared, top-{p.top_k} "
                 f"routed), neurons ranked by {calibration!r} scores; dense for {dense_tasks or 'no task'}")
    before = family.active_parameters(model, sparse)
    partition = convert_to_moe(model, adapter, neuron_scores, layers=layers, num_experts=p.num_experts,
                               num_shared=p.num_shared, top_k=p.top_k, component=p.component, impl=p.impl,
                               aux_loss_coef=p.aux_loss_coef, dense_tasks=dense_tasks, frozen_dense=p.und_frozen)

    out = Path(ctx.out_dir)
    model.save_pretrained(out / "checkpoint")
    carry_files(inputs["checkpoint"].path, out / "checkpoint")
    description = f"partition:{p.component}:E={p.num_experts},S={p.num_shared},k={p.top_k}"
    (out / "checkpoint" / "unislim.json").write_text(json.dumps({"description": description, "stage": "partition"}))
    reloaded = load_model(out / "checkpoint", family=family)  # it reloads, before we say so
    (out / "partition.json").write_text(json.dumps({
        "calibration": calibration, "num_experts": p.num_experts, "num_shared": p.num_shared, "top_k": p.top_k,
        "layers": layers, "dense_tasks": dense_tasks, "experts": partition}))
    _plot_expert_scores(neuron_scores, partition, p.num_shared, out / "plots" / "expert_scores.png")
    active = family.active_parameters(reloaded, sparse)
    metrics = {"partition/params_total": reloaded.num_parameters(), "partition/params_dense_active": before,
               "partition/params_active": active, "partition/top_k": p.top_k}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    ctx.progress(f"{description}: {active:,} of {metrics['partition/params_total']:,} parameters active per "
                 f"{sparse} token")
    return {"checkpoint": "checkpoint", "partition": "partition.json"}


def _plot_expert_scores(scores: dict[str, torch.Tensor], partition: dict[str, list[list[int]]], num_shared: int,
                        path: Path) -> None:
    """One row per layer: each expert's share of the layer's total neuron importance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(partition, key=_layer_of)
    shares = torch.stack([
        torch.stack([scores[n].double()[torch.tensor(idx)].sum() for idx in partition[n]]) / scores[n].double().sum()
        for n in names])  # (layers, experts)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(min(14, 2 + 0.15 * shares.shape[1]), 1 + 0.5 * len(names)))
    im = ax.imshow(shares.numpy(), aspect="auto", cmap="viridis")
    ax.axvline(num_shared - 0.5, color="white", lw=1)
    ax.set_yticks(range(len(names)), [f"layer {_layer_of(n)}" for n in names])
    ax.set_xlabel(f"expert (left of the line: {num_shared} shared; right: routed, dealt by rank)")
    ax.set_title("share of each layer's neuron importance held by each expert")
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _layer_of(name: str) -> int:
    """The decoder layer index in a qualified MLP name (`model.layers.3.mlp` → 3)."""
    return next(int(part) for part in name.split(".") if part.isdigit())
