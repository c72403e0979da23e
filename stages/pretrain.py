"""Stage `pretrain`: train the embedded reference model (digits) from scratch with Ray Train.

The one training loop (`pipelines/training.py`) over `pretrain.num_workers` workers in a DeepSpeed
engine (`pretrain.zero_stage`, 0 = plain data parallel), reading the shard stage's `train/und` and
`train/gen` rows through `get_dataset_shard` in the proportions of `pretrain.mix` (default: the
data weights). Rank 0 logs the loss to MLflow and writes a resumable checkpoint every
`checkpoint_every` steps, plus snapshots of the weights at `pretrain.snapshots` fractions of
training; the final weights leave the stage as a Hugging Face folder (`checkpoint/`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from unislim.pipelines import training
from ._plots import plot_history


def run(cfg: Any, inputs: dict, ctx: Any) -> dict[str, str]:
    p, m = cfg.pretrain, cfg.model
    spec = training.recipe(p, cfg.seed, cfg.mix, family="digits", new={"size": m.size, "variant": m.variant},
                           steps=p.steps, log_prefix="train",
                           snapshot_steps=sorted({max(1, round(f * p.steps)) for f in p.snapshots}))
    ctx.progress(f"training reference-{m.size}-{m.variant} for {p.steps} steps, global batch {p.batch_size}, "
                 f"mix {cfg.mix}")
    folder, state = training.train(ctx, spec, inputs, p)

    out = Path(ctx.out_dir)
    shutil.copytree(folder / "model", out / "checkpoint")
    description = f"reference-{m.size}-{m.variant}"
    (out / "snapshots").mkdir()
    if (folder / "snapshots").exists():
        for snap in sorted((folder / "snapshots").glob("step-*")):
            shutil.copytree(snap, out / "snapshots" / snap.name)
            (out / "snapshots" / snap.name / "unislim.json").write_text(json.dumps(
                {"description": f"{description}@{snap.name}", "stage": "pretrain"}))
    shutil.rmtree(folder, ignore_errors=True)
    (out / "checkpoint" / "unislim.json").write_text(json.dumps({"description": description, "stage": "pretrain"}))
    history = state["history"]
    (out / "history.json").write_text(json.dumps({"history": history, "resumed_from": state["resumes"],
                                                  "data": state.get("data", {})}))
    plot_history({"pretrain": history}, out / "plots" / "loss.png", f"pretrain {description}")
    last = history[-1]
    metrics = {"pretrain/final_loss": last["loss"], "pretrain/final_und_loss": last.get("und_loss"),
               "pretrain/final_gen_loss": last.get("gen_loss"), "pretrain/steps": last["step"],
               "pretrain/train_time_s": round(sum(h["time_s"] for h in history), 2)}
    (out / "metrics.json").write_text(json.dumps({k: v for k, v in metrics.items() if v is not None}, indent=2))
    ctx.progress(f"final loss {last['loss']:.4f}")
    return {"checkpoint": "checkpoint", "history": "history.json", "snapshots": "snapshots"}
