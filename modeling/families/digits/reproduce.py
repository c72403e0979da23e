"""Trains a reference model and measures what NOTES.md reports.

    python -m unislim.modeling.families.digits.reproduce --size small --variant shared --steps 3000 --out runs/reference/small-shared
    python -m unislim.modeling.families.digits.reproduce --size small --variant mot --steps 4000 --und-fraction 0.625 --out runs/reference/small-mot

Writes `<out>/final/` and `<out>/early/` (the checkpoint at 10% of training, HF layout),
`<out>/train_log.json` and `<out>/results.json`: the final model at default steps/CFG, with CFG
off (scale 1), with 2 sampling steps, and the 10% checkpoint at defaults. The training time
excludes checkpoint saving and evaluation.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from . import UniDigitsModel, evaluate_reference, reference_config, train_reference
from .scenes import UND_FRACTION


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="small")
    p.add_argument("--variant", default="shared")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--und-fraction", type=float, default=UND_FRACTION)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--eval-only", action="store_true", help="re-evaluate <out>/final and <out>/early")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(args.seed)
    model = UniDigitsModel(reference_config(args.size, args.variant))
    log_every = 50
    early_steps = max(log_every, round(args.steps / 10 / log_every) * log_every)  # a logged step

    def on_log(step: int, metrics: dict) -> None:
        print(json.dumps(metrics), flush=True)
        if step == early_steps:  # same run, same schedule, stopped at 10%
            model.save_pretrained(args.out / "early")

    if args.eval_only:
        model = UniDigitsModel.from_pretrained(args.out / "final")
        logs = json.loads((args.out / "train_log.json").read_text())
        train_s = logs[-1]["elapsed_s"]
    else:
        start = time.perf_counter()
        logs = train_reference(model, args.steps, args.batch_size, args.lr, args.seed, log_every, on_log,
                               und_fraction=args.und_fraction)  # fmt: skip
        train_s = time.perf_counter() - start
        model.save_pretrained(args.out / "final")
        (args.out / "train_log.json").write_text(json.dumps(logs, indent=1))

    results = {"args": {k: str(v) for k, v in vars(args).items()}, "train_s": train_s,
               "train_cpu_s": logs[-1].get("cpu_s")}  # fmt: skip
    results["final"] = evaluate_reference(model, seed=args.seed, out_dir=args.out / "eval-final")
    results["final_cfg1"] = evaluate_reference(model, seed=args.seed, cfg_scale=1.0)
    results["final_steps2"] = evaluate_reference(model, seed=args.seed, steps=2)
    early = UniDigitsModel.from_pretrained(args.out / "early")
    results["early"] = evaluate_reference(early, seed=args.seed, out_dir=args.out / "eval-early")
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
