"""Stage `adapt`: train a partitioned MoE model back to quality on Ray Train with DeepSpeed
(Slim & Sparse §4.2, Table 4), on any family.

Two phases of the one training loop (`pipelines/training.py`) in one resumable Ray Train run
(`adapt-<key>`; the phases share its workers, so the second pays no start-up):
1. **Expert-Frozen Tuning** (`eft_steps`): expert weights frozen (no gradients, not in the
   optimizer); routers, attention, norms and the rest train;
2. **MoE adaptation** (`moe_steps`): everything trains.
A dense checkpoint (the `adapt-dense` baseline: the pruned dense model of the same active size)
trains everything for `eft_steps + moe_steps`. Every worker reads the shard stage's training rows
(`get_dataset_shard`), the family supplies the loss, and the MoE load-balancing loss is added.
Rank 0 logs losses and router load to MLflow; the stage driver plots the loss curves and how the
routed tokens spread over the experts (per task on held-out rows; for the digits model also over
the denoising steps, the paper's Figure 3).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from unislim.modeling.families import from_model_config
from unislim.modeling.loading import carry_files
from unislim.modeling.surgery.record import ops
from unislim.pipelines import training

from ._plots import plot_history


def run(cfg: Any, inputs: dict, ctx: Any) -> dict[str, str]:
    a = cfg.adapt
    source = Path(inputs["checkpoint"].path)
    family = from_model_config(source, cfg.model)
    from unislim.modeling.loading import read_config

    is_moe = any(op["op"] == "moe" for op in ops(read_config(source)))
    phases = [("eft", a.eft_steps), ("moe", a.moe_steps)] if is_moe else [("dense", a.eft_steps + a.moe_steps)]
    phases = [(name, steps) for name, steps in phases if steps > 0]
    out = Path(ctx.out_dir)
    ctx.progress("phases: " + ", then ".join(f"{phase} {steps} steps" for phase, steps in phases))
    spec = training.recipe(a, cfg.seed, cfg.mix, family=family.name, adapter=cfg.model.adapter, init=str(source),
                           phases=[phase_fields(phase, steps, step_offset=sum(s for _, s in phases[:i]),
                                                fail_at_step=a.fail_at_step if i == len(phases) - 1 else None)
                                   for i, (phase, steps) in enumerate(phases)])
    folder, state = training.train(ctx, spec, inputs, a)  # one Ray Train run: the phases share its workers
    records = training.phase_states(state)
    trained = {name: Path(r["model"]) for name, r in records.items() if "model" in r} | {phases[-1][0]: folder / "model"}
    for phase, model_dir in trained.items():
        target = out / ("checkpoint" if phase == phases[-1][0] else f"checkpoint-{phase}")
        # the last phase's model is the run's temp copy: moved; an earlier phase's stays beside the run
        (shutil.move if phase == phases[-1][0] else shutil.copytree)(str(model_dir), target)
        carry_files(source, target)
        (target / "unislim.json").write_text(json.dumps({"description": f"adapt:{phase}:{_source_description(source)}",
                                                         "stage": "adapt"}))
    shutil.rmtree(folder, ignore_errors=True)
    history = {name: r["history"] for name, r in records.items()}
    resumed = {name: r["resumes"] for name, r in records.items()}  # steps each phase was resumed from
    data = {name: r.get("data", {}) for name, r in records.items()}  # rows per step, fingerprints of the first rows

    (out / "history.json").write_text(json.dumps({"history": history, "resumed_from": resumed, "data": data}))
    model = family.load(out / "checkpoint")  # reloads through its family
    plot_history(history, out / "plots" / "loss.png", "adapt: training loss per phase")
    metrics = {f"adapt/{phase}_final_loss": h[-1]["loss"] for phase, h in history.items() if h}
    metrics["adapt/steps"] = sum(steps for _, steps in phases)
    metrics["adapt/params_active"] = family.active_parameters(model, family.primary_task)
    if is_moe and hasattr(family, "expert_activation_by_step"):
        heat = family.expert_activation_by_step(model)
        _plot_heatmaps(heat, out / "plots" / "expert_activation.png")
        (out / "expert_activation.json").write_text(json.dumps({k: v.tolist() for k, v in heat.items()}))
        load = torch.stack([v.sum(0) for v in heat.values()]).double()  # (layers, routed experts)
        load = load / load.sum(1, keepdim=True)
        metrics["adapt/router_load_max_over_mean"] = round(float((load.max(1).values * load.shape[1]).mean()), 4)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    outputs = {"checkpoint": "checkpoint", "history": "history.json"}
    if is_moe and a.eft_steps > 0 and a.moe_steps > 0:
        outputs["checkpoint_eft"] = "checkpoint-eft"
    elif is_moe and a.eft_steps > 0:
        outputs["checkpoint_eft"] = "checkpoint"  # EFT was the only phase
    return outputs


def phase_fields(phase: str, steps: int, *, step_offset: int = 0, fail_at_step: int | None = None) -> dict:
    """What one phase sets in the training-loop spec: EFT freezes the experts."""
    return {"log_prefix": phase, "steps": steps, "prepare": {"freeze_experts": phase == "eft"},
            "step_offset": step_offset, "fail_at_step": fail_at_step}


def phase_spec(a: Any, seed: int, mix: dict, family, adapter: dict | None, init: Path, phase: str, steps: int, *,
               step_offset: int = 0) -> dict:
    """The training-loop spec of one phase on its own (what a `search` trial trains, phase by phase)."""
    return training.recipe(a, seed, mix, family=family.name, adapter=adapter, init=str(init),
                           **phase_fields(phase, steps, step_offset=step_offset))


def _source_description(source: Path) -> str:
    meta = source / "unislim.json"
    return json.loads(meta.read_text())["description"] if meta.exists() else source.name


def _plot_heatmaps(counts: dict[str, torch.Tensor], path: Path) -> None:
    """One panel per MoE layer: denoising step × routed expert, share of the step's routed slots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(counts)
    fig, axes = plt.subplots(len(names), 1, figsize=(9, 2.2 * len(names)), squeeze=False)
    for ax, name in zip(axes[:, 0], names):
        share = counts[name].double()
        share = share / share.sum(1, keepdim=True).clamp(min=1)
        im = ax.imshow(share.numpy(), aspect="auto", cmap="magma")
        ax.set_ylabel("step (noisy → clean)", fontsize=8)
        ax.set_title(name, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.02)
    axes[-1, 0].set_xlabel("routed expert")
    fig.suptitle("expert activation over denoising steps (Figure 3)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
