"""Wall-clock per training step: dense vs task-agnostic MoD vs task-aware MoD, interleaved.

One process, one thread by default. The three models are built from the same checkpoint (the MoD
ones with the `mod` stage's schedule at the same budget) and take training steps in turn on the
same batch (forward + backward + AdamW step; the order rotates every step), so load from other
jobs on the machine falls on all three alike. Plain torch, not DeepSpeed: this measures the
model's compute, not the engine's overhead. FLOPs per step are counted from the tokens each layer
processed (`count_flops`, 3 × forward).

    python bench/mod_step_time.py CHECKPOINT SCORES [--budget 0.8] [--steps 60] [--threads 1] [--set k=v]

Prints a table and writes bench/results/mod-step-time-<variant>.json.
"""

from __future__ import annotations

from pathlib import Path
import sys

# bench/accelerate.py is named like the `accelerate` package, which transformers imports when it is on the path;
# take bench/ (sys.path[0] for a script, inherited by Ray workers) off the path before anything imports it.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import json
import platform
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("scores")
    parser.add_argument("--budget", type=float, default=0.8)
    parser.add_argument("--steps", type=int, default=60, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per model first")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], help="another mod.* field, e.g. --set sharpness=0.5")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import copy

    from unislim.config import ModConfig
    from unislim.modeling.families import get_family
    from unislim.modeling.families.digits import make_batch
    from unislim.modeling.loading import load_model
    from unislim.modeling.surgery.mod.layer import add_mod
    from unislim.pipelines.training import make_optimizer
    from unislim.stages.mod import mod_prepare

    import yaml

    from unislim.modeling.flops import count_flops

    extra = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in args.set)}
    mix = extra.pop("mix", None) or {"und": 0.5, "gen": 0.5}
    und_fraction = mix["und"] / sum(mix.values())
    torch.set_num_threads(args.threads)
    family = get_family("digits")
    dense = load_model(args.checkpoint).train()
    models = {"dense": dense}
    for name, routing in (("task-agnostic", "shared"), ("task-aware", "task")):
        m = ModConfig(enabled=True, routing=routing, budget=args.budget, **extra)
        prepare, _ = mod_prepare(m, family, dense, {"und": "und", "gen": "gen"}, mix, Path(args.scores))
        model = copy.deepcopy(dense)
        adapter = family.adapter(model)
        family.stamp(model, adapter)
        add_mod(model, adapter, {t: {int(i): c for i, c in caps.items()} for t, caps in prepare["capacity"].items()},
                routing_mode=prepare["routing"], causal_tasks=tuple(prepare["causal_tasks"]),
                keep_last=prepare["keep_last"], aux_weight=prepare["aux_weight"])
        models[name] = model.train()
    optimizers = {n: make_optimizer(model, 1e-4, args.warmup + args.steps, args.warmup)[0] for n, model in models.items()}
    fixed = make_batch(args.batch_size, torch.Generator().manual_seed(0), und_fraction=und_fraction)
    flops = {n: 3 * count_flops(lambda m=model: family.loss(m, fixed)) for n, model in models.items()}

    times: dict[str, list[float]] = {n: [] for n in models}
    names = list(models)
    for step in range(args.warmup + args.steps):
        batch = make_batch(args.batch_size, torch.Generator().manual_seed(step), und_fraction=und_fraction)
        for name in names[step % 3:] + names[: step % 3]:
            model, opt = models[name], optimizers[name]
            t0 = time.perf_counter()
            loss, _ = family.loss(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step >= args.warmup:
                times[name].append(time.perf_counter() - t0)

    rows = {}
    base = statistics.median(times["dense"])
    for name in names:
        med = statistics.median(times[name])
        rows[name] = {"median_s": round(med, 4), "mean_s": round(statistics.mean(times[name]), 4),
                      "vs_dense": round(med / base, 3), "train_flops_per_step": flops[name],
                      "flops_saved": round(1 - flops[name] / flops["dense"], 4)}
    print(f"{'model':<15} {'median s/step':>13} {'mean':>8} {'vs dense':>9} {'FLOPs/step':>12} {'saved':>7}")
    for name, r in rows.items():
        print(f"{name:<15} {r['median_s']:>13.4f} {r['mean_s']:>8.4f} {r['vs_dense']:>9.3f} "
              f"{r['train_flops_per_step']:>12.3e} {r['flops_saved']:>7.1%}")
    variant = dense.config.variant
    out = Path(args.out or Path(__file__).parent / "results" / f"mod-step-time-{variant}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"checkpoint": args.checkpoint, "budget": args.budget, "mod": extra, "steps": args.steps,
                               "batch_size": args.batch_size, "threads": args.threads, "machine": platform.node(),
                               "processor": platform.processor(), "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
