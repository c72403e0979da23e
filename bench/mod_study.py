"""The RESULTS.md MoD table: dense control vs task-agnostic MoD vs task-aware MoD on one checkpoint.

Runs the `mod` stage (Ray Train + DeepSpeed, a local Ray with one CPU) three times from the same
trained checkpoint and score-stage scores — `routing` none (dense fine-tune, same recipe), shared
(one router and capacity for all tasks) and task (a router and a schedule per task), the two MoD
runs at the same budget — then evaluates each checkpoint with the `evaluate` stage's function.

    python bench/mod_study.py CHECKPOINT SCORES SHARD --out DIR [--steps 300] [--budget 0.8] [--set key=value ...]

SHARD is the shard stage's output folder (`runs/shard/<key>`): the mod stage trains on its rows.

Writes DIR/<routing>/ (the stage outputs) and DIR/study.json; prints the table.
"""

from __future__ import annotations

from pathlib import Path
import sys

# bench/accelerate.py is named like the `accelerate` package, which transformers imports when it is on the path;
# take bench/ (sys.path[0] for a script, inherited by Ray workers) off the path before anything imports it.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import json
import time
from types import SimpleNamespace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint")
    parser.add_argument("scores")
    parser.add_argument("shard", help="the shard stage's output folder (training rows)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--budget", type=float, default=0.8)
    parser.add_argument("--routings", default="none,shared,task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", action="append", default=[], help="another mod.* field, e.g. --set lr=1e-4")
    args = parser.parse_args()

    import ray
    import yaml

    from unislim.config import ModConfig, ModelConfig
    from unislim.pipelines.context import StageContext
    from unislim.stages import mod as mod_stage
    from unislim.stages.evaluate import evaluate_checkpoint

    out = Path(args.out)
    extra = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in args.set)}
    mix = extra.pop("mix", None) or {"und": 0.5, "gen": 0.5}
    mix = {k: v / sum(mix.values()) for k, v in mix.items()}
    ray.init(num_cpus=1, include_dashboard=False)
    shard = Path(args.shard)
    inputs = {"checkpoint": SimpleNamespace(path=args.checkpoint), "scores": SimpleNamespace(path=args.scores),
              "train": SimpleNamespace(path=str(shard / "train")), "tasks": SimpleNamespace(path=str(shard / "tasks.json"))}
    rows = {}
    for routing in args.routings.split(","):
        m = ModConfig(enabled=True, routing=routing, steps=args.steps, budget=args.budget, **extra)
        folder = out / routing
        folder.mkdir(parents=True, exist_ok=True)
        key = "-".join(["study", Path(args.checkpoint).parent.name, routing, str(args.steps), str(args.budget), *args.set])
        ctx = StageContext(stage="mod", key=key, out_dir=folder, runs_dir=out)
        if not (folder / "metrics.json").exists():
            t0 = time.time()
            mod_stage.run(SimpleNamespace(seed=args.seed, mod=m, model=ModelConfig(), mix=mix), inputs, ctx)
            (folder / "stage_time.json").write_text(json.dumps({"wall_s": round(time.time() - t0, 1)}))
        if not (folder / "eval" / "metrics.json").exists():
            evaluate_checkpoint(folder / "checkpoint", n_und=40, n_gen=24, steps=20, out_dir=folder / "eval")
        if not (folder / "heldout_loss.json").exists():
            (folder / "heldout_loss.json").write_text(json.dumps(heldout_loss(folder / "checkpoint")))
        rows[routing] = {**json.loads((folder / "metrics.json").read_text()),
                         **json.loads((folder / "eval" / "metrics.json").read_text()),
                         **json.loads((folder / "heldout_loss.json").read_text())}
        (out / "study.json").write_text(json.dumps(rows, indent=1))
    keys = ("mod/train_flops_saved", "mod/step_time_s", "mme/overall", "geneval/overall", "fid/gen",
            "heldout/und_loss", "heldout/gen_loss",
            "mod/und_flops_saved", "mod/gen_flops_saved")
    print("| routing | " + " | ".join(keys) + " |")
    for routing, r in rows.items():
        print(f"| {routing} | " + " | ".join(f"{r.get(k, float('nan')):.4g}" for k in keys) + " |")
    ray.shutdown()


def heldout_loss(checkpoint: Path, batches: int = 8, batch_size: int = 64) -> dict[str, float]:
    """Understanding CE and generation flow-matching MSE on held-out batches, inference routing
    (eval mode): a lower-noise quality signal than 240 questions / 144 prompts."""
    import torch

    from unislim.modeling.families import get_family
    from unislim.modeling.families.digits import make_batch
    from unislim.modeling.loading import load_model

    model, family = load_model(checkpoint).eval(), get_family("digits")
    sums = {"und_loss": 0.0, "gen_loss": 0.0}
    with torch.no_grad():
        for i in range(batches):
            _, parts = family.loss(model, make_batch(batch_size, torch.Generator().manual_seed(10_000 + i), "heldout",
                                                     cfg_dropout=0.0))
            for k in sums:
                sums[k] += float(parts[k]) / batches
    return {f"heldout/{k}": round(v, 5) for k, v in sums.items()}


if __name__ == "__main__":
    main()
