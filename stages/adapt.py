"""Stage `adapt`: train a partitioned MoE model back to quality on Ray Train with DeepSpeed
(Slim & Sparse §4.2, Table 4).

Two phases, each its own resumable Ray Train run (`adapt-<key>-eft`, `adapt-<key>-moe`):
1. **Expert-Frozen Tuning** (`eft_steps`): expert weights frozen (no gradients, not in the
   optimizer); routers, attention, norms and the rest train;
2. **MoE adaptation** (`moe_steps`): everything trains.
A dense checkpoint (the `adapt-dense` baseline: the pruned dense model of the same active size)
trains everything for `eft_steps + moe_steps`. Every worker wraps the model in a DeepSpeed ZeRO
engine (`adapt.zero_stage`; fp32 on CPU over gloo, bf16 on GPU) and draws its batches from a
generator seeded by (seed, rank, step counted over both phases), so a resumed run sees the batches the interrupted one
would have. Rank 0 logs losses and router load to MLflow; the stage driver plots the loss curves,
the router load per expert and the expert-activation heatmap over denoising steps (Figure 3).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from unislim.modeling.loading import load_model
from unislim.modeling.families.digits import make_batch, make_optimizer
from unislim.pipelines import training

MOE_TYPE = "unidigits_moe"


def run(cfg: Any, inputs: dict, ctx: Any) -> dict[str, str]:
    a = cfg.adapt
    source = Path(inputs["checkpoint"].path)
    is_moe = json.loads((source / "config.json").read_text())["model_type"] == MOE_TYPE
    phases = [("eft", a.eft_steps), ("moe", a.moe_steps)] if is_moe else [("dense", a.eft_steps + a.moe_steps)]
    phases = [(name, steps) for name, steps in phases if steps > 0]
    out = Path(ctx.out_dir)
    history: dict[str, list] = {}
    resumed: dict[str, list] = {}  # phase -> steps it was resumed from (after a failure or a rerun)
    init = source
    for i, (phase, steps) in enumerate(phases):
        last = i == len(phases) - 1
        ctx.progress(f"phase {phase}: {steps} steps from {init.name}")
        loop_config = phase_config(a, cfg.seed, init, phase, steps, step_offset=sum(s for _, s in phases[:i]),
                                   fail_at_step=a.fail_at_step if last else None)
        result = training.fit(train_loop, loop_config, ctx, num_workers=a.num_workers, use_gpu=a.use_gpu,
                              cpus_per_worker=a.cpus_per_worker, max_failures=a.max_failures, name_suffix=phase)
        folder = out / ("checkpoint" if last else f"checkpoint-{phase}")
        with result.checkpoint.as_directory() as ckpt:
            shutil.copytree(Path(ckpt) / "model", folder)
            state = json.loads((Path(ckpt) / "state.json").read_text())
            history[phase], resumed[phase] = state["history"], state["resumes"]
        description = f"adapt:{phase}:{_source_description(source)}"
        (folder / "unislim.json").write_text(json.dumps({"description": description, "stage": "adapt"}))
        init = folder

    (out / "history.json").write_text(json.dumps({"history": history, "resumed_from": resumed}))
    model = load_model(out / "checkpoint")  # reloads with from_pretrained
    _plot_losses(history, out / "plots" / "loss.png")
    metrics = {f"adapt/{phase}_final_loss": h[-1]["loss"] for phase, h in history.items() if h}
    metrics["adapt/steps"] = sum(steps for _, steps in phases)
    metrics["adapt/params_active"] = model.num_active_parameters()
    if is_moe:
        heat = expert_activation_by_step(model)
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


def phase_config(a: Any, seed: int, init: Path, phase: str, steps: int, *, step_offset: int = 0,
                 fail_at_step: int | None = None) -> dict:
    """The `train_loop` config of one phase (also what a `search` trial fits)."""
    return {
        "init": str(init), "phase": phase, "steps": steps, "seed": seed, "lr": a.lr,
        "warmup_steps": a.warmup_steps, "batch_size": a.batch_size, "und_fraction": a.und_fraction,
        "zero_stage": a.zero_stage, "log_every": a.log_every, "checkpoint_every": a.checkpoint_every,
        "threads": max(1, int(a.cpus_per_worker)), "fail_at_step": fail_at_step, "step_offset": step_offset,
    }


# ------------------------------------------------------------------------------------ workers


def train_loop(config: dict) -> None:
    """One Ray Train worker: load, (freeze experts), wrap in DeepSpeed, resume, train, report."""
    from unislim.modeling.families.digits import freeze_experts

    torch.set_num_threads(config["threads"])
    rank, world_size = training.world()
    ctx, phase, steps = config["ctx"], config["phase"], config["steps"]
    model = load_model(config["init"]).train()
    if phase == "eft":
        frozen = freeze_experts(model, True)
        if rank == 0:
            ctx.progress(f"Expert-Frozen Tuning: {frozen:,} expert parameters frozen")
    optimizer, scheduler = make_optimizer(model, config["lr"], steps, warmup_frac=config["warmup_steps"] / steps)
    local_batch = config["batch_size"] // world_size
    engine, start, history, resumes = training.resume_deepspeed(model, optimizer, scheduler, zero_stage=config["zero_stage"],
                                                                micro_batch_size=local_batch)
    if start and rank == 0:
        ctx.progress(f"{phase}: resumed from step {start}")
    dtype = next(engine.module.parameters()).dtype
    moe = dict(model.moe_mlps()) if hasattr(model, "moe_mlps") else {}

    keys = ("loss", "und_loss", "gen_loss", "aux_loss")
    sums, t_log, last_log = dict.fromkeys(keys, 0.0), time.time(), start
    for step in range(start, steps):
        if step == config["fail_at_step"] and rank == world_size - 1 and start == 0:
            # An injected worker death (adapt.fail_at_step), only before any resume. The Ray Train
            # controller collects reported checkpoints by polling: wait as a real step would.
            time.sleep(5)
            os._exit(1)
        seed = (config["seed"] * 1_000_003 + rank) * 10_000_019 + config["step_offset"] + step  # global step
        batch = make_batch(local_batch, torch.Generator().manual_seed(seed), und_fraction=config["und_fraction"])
        batch = {k: v.to(engine.device, dtype if v.is_floating_point() else None) for k, v in batch.items()}
        out = engine(**batch)
        engine.backward(out.loss)
        engine.step()
        for k in keys:
            value = getattr(out, k, None)
            sums[k] += float(value.detach()) if value is not None else 0.0

        done = step + 1
        if done % config["log_every"] == 0 or done == steps:
            entry = {"step": done, **{k: v / (done - last_log) for k, v in sums.items()},
                     "lr": scheduler.get_last_lr()[0], "time_s": round(time.time() - t_log, 3)}
            if moe:  # routed tokens per expert in the last forward, max over mean (1 = balanced)
                load = torch.stack([m.last_load.double().cpu() for m in moe.values()])
                entry["router_load_max_over_mean"] = float((load.max(1).values / load.mean(1).clamp(min=1e-9)).mean())
            history.append(entry)
            sums, t_log, last_log = dict.fromkeys(keys, 0.0), time.time(), done
            if rank == 0:
                offset = config["step_offset"]
                ctx.log_metrics({f"{phase}/{k}": v for k, v in entry.items() if k != "step"}, step=offset + done)
                ctx.progress(f"{phase} step {done}/{steps}  loss {entry['loss']:.4f}")
        if done % config["checkpoint_every"] == 0 or done == steps:
            training.report({"step": done, "loss": history[-1]["loss"] if history else float("nan")},
                            write=lambda f: training.save_deepspeed(f, engine, model, done, history, resumes),
                            all_ranks=True)


def _source_description(source: Path) -> str:
    meta = source / "unislim.json"
    return json.loads(meta.read_text())["description"] if meta.exists() else source.name


# ------------------------------------------------------------------------------------ analysis


@torch.no_grad()
def expert_activation_by_step(model, n_prompts: int = 24, steps: int = 20, seed: int = 0) -> dict[str, torch.Tensor]:
    """Share of routed slots each expert gets at each denoising step (the paper's Figure 3).

    Samples `n_prompts` held-out prompts (all GenEval categories) with the model's sampler and
    records every MoE layer's routed-token counts per step: {layer name: (steps, routed experts)}.
    """
    from unislim.modeling.families.digits.scenes import GEN_CATEGORIES, encode_prompt, sample_prompt

    model.eval()
    g = torch.Generator().manual_seed(seed)
    prompts = [sample_prompt(GEN_CATEGORIES[i % len(GEN_CATEGORIES)], g) for i in range(n_prompts)]
    ids = torch.tensor([encode_prompt(p.prompt) for p in prompts])
    moe = dict(model.moe_mlps())
    counts = {name: torch.zeros(steps, m.num_routed, dtype=torch.long) for name, m in moe.items()}
    current = {"step": 0}

    def on_step(step) -> None:
        current["step"] = step.index

    def hook(name):
        def record(module, inputs, output):
            counts[name][current["step"]] += module.last_load.cpu()
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in moe.items()]
    try:
        model.generate_images(ids, steps=steps, generator=torch.Generator().manual_seed(seed), step_callback=on_step)
    finally:
        for h in handles:
            h.remove()
    return counts


def _plot_losses(history: dict[str, list], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    offset = 0
    for phase, h in history.items():
        if not h:
            continue
        for k, style in (("und_loss", "-"), ("gen_loss", "--")):
            ax.plot([offset + e["step"] for e in h], [e[k] for e in h], style, label=f"{phase} {k}")
        offset += h[-1]["step"]
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title("adapt: training loss per phase")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
