"""Stage `mod`: task-aware Mixture-of-Depths routers (UniMoD, arXiv 2502.06474) inserted into a
trained checkpoint and trained on Ray Train with DeepSpeed.

1. **Schedule.** `mod.schedule=auto` derives each task's per-layer capacity from the score stage's
   layer importance (1 − block cosine, per task; `modeling/mod/schedule.py`) under a budget (the
   token-weighted mean capacity); `table` takes `mod.table` as given. `schedule.json` and
   `plots/schedule.png` record it.
2. **Routing.** `mod.routing=task`: one router per task in each routed layer (UniMoD); `shared`:
   the task-agnostic baseline, one router and one capacity per layer for every task, at the same
   budget; `none`: the dense control, fine-tuned with the same recipe and no routers.
3. **Training.** Every worker converts the checkpoint (routers start at weight ~1, ranking tokens
   by a least-squares fit of how much each layer changes them: `mod.router_init`), wraps it in a
   DeepSpeed ZeRO engine (fp32 on CPU over gloo, bf16 on GPU) and draws batches seeded by (seed,
   rank, step), so a resumed run sees the batches the interrupted one would have. Rank 0 logs
   losses and step times to MLflow and reports resumable checkpoints.
4. **Cost.** FLOPs are counted from the tokens each layer actually processed (`count_flops` hooks
   on every linear and attention call): per training step (3 × the forward of one global batch:
   backward ≈ 2 × forward) and per inference sample (one answer with its greedy decode, one
   image with all denoising steps and both CFG passes), each beside the dense model's.
   `plots/token_keep_<task>.png` shows which positions each layer processes at inference.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from unislim.modeling.loading import load_model
from unislim.modeling.families.digits import UniDigitsModModel, fit_routers
from unislim.modeling.surgery.mod.schedule import auto_schedule, mean_capacity, plot_token_keep, write_schedule
from unislim.modeling.families.digits import make_batch, make_optimizer
from unislim.modeling.families.digits.evaluate import count_flops
from unislim.modeling.families.digits.scenes import ANSWER_LEN, PROMPT_LEN, QUESTION_LEN
from unislim.pipelines import training


def run(cfg: Any, inputs: dict, ctx: Any) -> dict[str, str]:
    m = cfg.mod
    source = Path(inputs["checkpoint"].path)
    dense = load_model(source)
    out = Path(ctx.out_dir)
    fields, info = mod_fields(m, dense.config, Path(inputs["scores"].path) if "scores" in inputs else None)
    if fields is not None:
        write_schedule(fields["mod_capacity"], out, routing=m.routing, info=info)
        ctx.progress(f"{m.routing} routing, capacities {fields['mod_capacity']}")
    description = f"mod:{m.routing}" + (f":budget={info['mean_capacity']:.3g}" if fields is not None else "")

    loop_config = {
        "source": str(source), "fields": fields, "steps": m.steps, "seed": cfg.seed, "lr": m.lr,
        "router_lr": m.router_lr, "router_init": m.router_init, "warmup_steps": m.warmup_steps,
        "batch_size": m.batch_size, "und_fraction": m.und_fraction, "zero_stage": m.zero_stage,
        "log_every": m.log_every, "checkpoint_every": m.checkpoint_every, "threads": max(1, int(m.cpus_per_worker)),
    }
    result = training.fit(train_loop, loop_config, ctx, num_workers=m.num_workers, use_gpu=m.use_gpu,
                          cpus_per_worker=m.cpus_per_worker, max_failures=m.max_failures)
    with result.checkpoint.as_directory() as ckpt:
        shutil.copytree(Path(ckpt) / "model", out / "checkpoint")
        state = json.loads((Path(ckpt) / "state.json").read_text())
    (out / "checkpoint" / "unislim.json").write_text(json.dumps({"description": description, "stage": "mod"}))
    (out / "history.json").write_text(json.dumps({"history": state["history"], "resumed_from": state["resumes"]}))
    model = load_model(out / "checkpoint")  # reloads with from_pretrained

    metrics = {"mod/steps": m.steps, **{f"mod/final_{k}": v for k, v in state["history"][-1].items()
                                         if k.endswith("loss")}}
    times = [h["time_s"] / h["steps"] for h in state["history"]]
    metrics["mod/step_time_s"] = round(sum(times) / len(times), 4)
    metrics.update(cost(dense, model, m.batch_size, m.und_fraction, seed=cfg.seed))
    if isinstance(model, UniDigitsModModel):
        record = routing_record(model, seed=cfg.seed)
        metrics.update({f"mod/keep/{k}": round(v, 4) for k, v in record.keep_fraction().items()})
        plot_token_keep(record.keep, record.samples, out)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    ctx.progress(f"{description}: training FLOPs saved {metrics['mod/train_flops_saved']:.1%}, "
                 f"{metrics['mod/step_time_s']:.3f}s/step")
    return {"checkpoint": "checkpoint", "history": "history.json"}


def mod_fields(m: Any, config, scores: Path | None) -> tuple[dict | None, dict]:
    """The `UniDigitsModConfig` fields for `mod.routing` (None for the dense control) and what
    the schedule was derived from."""
    if m.routing == "none":
        return None, {}
    layers = config.num_hidden_layers
    n_img = config.num_image_tokens
    tokens = {"und": m.und_fraction * (n_img + QUESTION_LEN + ANSWER_LEN),
              "gen": (1 - m.und_fraction) * (PROMPT_LEN + n_img)}  # per training sample
    weights = {t: n / sum(tokens.values()) for t, n in tokens.items()}
    info: dict[str, Any] = {"weights": weights}
    if m.schedule == "table":
        capacity = {t: [float(c) for c in m.table.get(t, [1.0] * layers)] for t in ("und", "gen")}
        bad = {t: len(c) for t, c in capacity.items() if len(c) != layers}
        if bad:
            raise ValueError(f"mod.table: the model has {layers} layers, the table gives {bad}")
    else:
        importance = layer_importance(scores)
        info["importance"] = {t: v.tolist() for t, v in importance.items()}
        capacity = auto_schedule(importance, budget=m.budget, weights=weights, min_capacity=m.min_capacity,
                                 max_importance=m.max_importance, sharpness=m.sharpness,
                                 shared=m.routing == "shared")
    info["mean_capacity"] = mean_capacity(capacity, weights)
    fields = {"mod_capacity": capacity, "mod_routing": m.routing, "mod_keep_last": {"und": m.und_keep_last},
              "mod_causal_tasks": ["und"] if m.causal_und else [], "mod_aux_weight": m.aux_weight}
    return fields, info


def layer_importance(scores: Path) -> dict[str, torch.Tensor]:
    """`layer_importance.block` (L,) of the score stage, per task kind (`und`, `gen`), averaged
    over the calibration tasks of that kind."""
    found: dict[str, list[torch.Tensor]] = {}
    for f in sorted(Path(scores).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            found.setdefault(st.metadata()["kind"], []).append(st.get_tensor("layer_importance.block"))
    missing = [k for k in ("und", "gen") if k not in found]
    if missing:
        raise ValueError(f"mod.schedule=auto needs scores of an und and a gen task; {scores} lacks {missing}")
    return {k: torch.stack(found[k]).mean(0) for k in ("und", "gen")}


# ------------------------------------------------------------------------------------ workers


def train_loop(config: dict) -> None:
    """One Ray Train worker: convert, wrap in DeepSpeed, resume, train, report."""
    torch.set_num_threads(config["threads"])
    rank, world_size = training.world()
    ctx, steps = config["ctx"], config["steps"]
    model = load_model(config["source"])
    if config["fields"] is not None:
        model = UniDigitsModModel.from_dense(model, **config["fields"])
        if config["router_init"] == "fit":  # same batches on every rank: identical routers
            batches = [make_batch(config["batch_size"], torch.Generator().manual_seed(config["seed"] + 7919 + i),
                                  und_fraction=config["und_fraction"]) for i in range(2)]
            fit = fit_routers(model, batches)
            if rank == 0:
                ctx.progress(f"routers fitted to each layer's per-token update (R² {fit})")
    model.train()
    optimizer, scheduler = _optimizer(model, config["lr"], config["router_lr"], steps, config["warmup_steps"])
    local_batch = config["batch_size"] // world_size
    engine, start, history, resumes = training.resume_deepspeed(model, optimizer, scheduler, zero_stage=config["zero_stage"],
                                                                micro_batch_size=local_batch)
    if start and rank == 0:
        ctx.progress(f"resumed from step {start}")
    dtype = next(engine.module.parameters()).dtype

    keys = ("loss", "und_loss", "gen_loss", "mod_aux_loss")
    sums, busy, last_log = dict.fromkeys(keys, 0.0), 0.0, start
    for step in range(start, steps):
        seed = (config["seed"] * 1_000_003 + rank) * 10_000_019 + step
        batch = make_batch(local_batch, torch.Generator().manual_seed(seed), und_fraction=config["und_fraction"])
        batch = {k: v.to(engine.device, dtype if v.is_floating_point() else None) for k, v in batch.items()}
        t0 = time.perf_counter()
        out = engine(**batch)
        engine.backward(out.loss)
        engine.step()
        busy += time.perf_counter() - t0  # forward + backward + optimizer only, not batch synthesis
        for k in keys:
            value = getattr(out, k, None)
            sums[k] += float(value) if value is not None else 0.0

        done = step + 1
        if done % config["log_every"] == 0 or done == steps:
            n = done - last_log
            entry = {"step": done, **{k: v / n for k, v in sums.items()}, "lr": scheduler.get_last_lr()[0],
                     "time_s": round(busy, 4), "steps": n}
            history.append(entry)
            sums, busy, last_log = dict.fromkeys(keys, 0.0), 0.0, done
            if rank == 0:
                ctx.log_metrics({f"train/{k}": v for k, v in entry.items() if k not in ("step", "steps")}, step=done)
                ctx.progress(f"step {done}/{steps}  loss {entry['loss']:.4f}  {entry['time_s'] / n:.3f}s/step")
        if done % config["checkpoint_every"] == 0 or done == steps:
            training.report({"step": done, "loss": history[-1]["loss"] if history else float("nan")},
                            write=lambda f: training.save_deepspeed(f, engine, model, done, history, resumes),
                            all_ranks=True)


def _optimizer(model, lr: float, router_lr: float, steps: int, warmup_steps: int):
    """The reference recipe (AdamW, warmup, cosine) with the routers and predictors at `router_lr`:
    they start from zero and have a few hundred steps to learn."""
    routers = [p for n, p in model.named_parameters() if ".mod_" in n]
    for p in routers:
        p.requires_grad_(False)
    optimizer, scheduler = make_optimizer(model, lr, steps, warmup_frac=warmup_steps / steps)
    for p in routers:
        p.requires_grad_(True)
    if routers:
        optimizer.add_param_group({"params": routers, "lr": router_lr, "weight_decay": 0.0})
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, scheduler.lr_lambdas[0])  # now over every group
    return optimizer, scheduler


# ------------------------------------------------------------------------------------ cost


def _flops(model, fn) -> int:
    with count_flops(model) as total:
        fn()
    return total["flops"]


@torch.no_grad()
def cost(dense, model, batch_size: int, und_fraction: float = 0.5, seed: int = 0) -> dict[str, float]:
    """Training FLOPs per step (3 × forward of one global batch, in training mode: top-k routing
    and the predictors' loss) and inference FLOPs per sample, of `model` and of `dense`."""
    from unislim.modeling.families.digits.scenes import make_und_batch

    batch = make_batch(batch_size, torch.Generator().manual_seed(seed), und_fraction=und_fraction)
    und, _ = make_und_batch(["which"], torch.Generator().manual_seed(seed), "heldout")
    images, question = und["und_images"], und["und_input_ids"][:, :-ANSWER_LEN]
    prompt = batch["gen_prompt_ids"][-1:]
    out: dict[str, float] = {}
    for name, net in (("dense", dense), ("mod", model)):
        was_training = net.training
        net.train()
        out[f"{name}/train"] = 3 * _flops(net, lambda: net(**batch))
        net.eval()
        out[f"{name}/und"] = _flops(net, lambda: net.answer(images, question, max_new_tokens=ANSWER_LEN))
        out[f"{name}/gen"] = _flops(net, lambda: net.generate_images(
            prompt, steps=net.config.sample_steps, generator=torch.Generator().manual_seed(seed)))
        net.train(was_training)
    return {
        "mod/train_flops_per_step": out["mod/train"], "mod/dense_train_flops_per_step": out["dense/train"],
        "mod/train_flops_saved": round(1 - out["mod/train"] / out["dense/train"], 6),
        "mod/und_flops_per_sample": out["mod/und"], "mod/gen_flops_per_sample": out["mod/gen"],
        "mod/und_flops_saved": round(1 - out["mod/und"] / out["dense/und"], 6),
        "mod/gen_flops_saved": round(1 - out["mod/gen"] / out["dense/gen"], 6),
    }


@torch.no_grad()
def routing_record(model: UniDigitsModModel, n: int = 64, seed: int = 0):
    """Which tokens each layer processes at inference, on a held-out batch of both tasks."""
    batch = make_batch(n, torch.Generator().manual_seed(seed + 1), "heldout", cfg_dropout=0.0)
    model.eval()
    with model.record_routing() as record:
        model(**batch)
    return record
