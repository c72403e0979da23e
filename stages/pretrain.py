"""Stage `pretrain`: train the embedded reference model (digits) with Ray Train.

Data parallel over `pretrain.num_workers` workers (DDP over gloo on CPU, NCCL on GPU). Every
worker draws its own batches from a generator seeded by (seed, rank, step), so training is
deterministic and a resumed run sees exactly the batches the interrupted one would have. Rank 0
logs the loss to MLflow and writes a resumable checkpoint every `checkpoint_every` steps; the
final weights leave the stage as a Hugging Face folder (`checkpoint/`) that reloads with
`AutoModel.from_pretrained` once `unislim.modeling.families.digits` is imported.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from unislim.modeling.families.digits import UniDigitsModel, make_batch, make_optimizer, reference_config
from unislim.pipelines import training


def run(cfg: Any, inputs: dict, ctx: Any) -> dict[str, str]:
    p, m = cfg.pretrain, cfg.model
    loop_config = {
        "size": m.size, "variant": m.variant, "seed": cfg.seed, "steps": p.steps, "lr": p.lr,
        "warmup_steps": p.warmup_steps, "batch_size": p.batch_size, "und_fraction": p.und_fraction, "log_every": p.log_every,
        "checkpoint_every": p.checkpoint_every, "threads": max(1, int(p.cpus_per_worker)),
        "snapshot_steps": sorted({max(1, round(f * p.steps)) for f in p.snapshots}),
    }
    ctx.progress(f"training reference-{m.size}-{m.variant} for {p.steps} steps, global batch {p.batch_size}")
    result = training.fit(train_loop, loop_config, ctx, num_workers=p.num_workers, use_gpu=p.use_gpu,
                          cpus_per_worker=p.cpus_per_worker, max_failures=p.max_failures)

    out = Path(ctx.out_dir)
    with result.checkpoint.as_directory() as folder:
        shutil.copytree(Path(folder) / "model", out / "checkpoint")
        history = json.loads((Path(folder) / "history.json").read_text())
        if (Path(folder) / "snapshots").exists():
            shutil.copytree(Path(folder) / "snapshots", out / "snapshots")
    description = f"reference-{m.size}-{m.variant}"
    (out / "snapshots").mkdir(exist_ok=True)
    for snap in sorted((out / "snapshots").glob("step-*")):
        (snap / "unislim.json").write_text(json.dumps({"description": f"{description}@{snap.name}",
                                                       "stage": "pretrain"}))
    (out / "checkpoint" / "unislim.json").write_text(json.dumps({"description": description, "stage": "pretrain"}))
    (out / "history.json").write_text(json.dumps(history))
    _plot_loss(history, out / "plots" / "loss.png", description)
    last = history[-1]
    metrics = {"pretrain/final_loss": last["loss"], "pretrain/final_und_loss": last["und_loss"],
               "pretrain/final_gen_loss": last["gen_loss"], "pretrain/steps": last["step"],
               "pretrain/train_time_s": round(sum(h["time_s"] for h in history), 2)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    ctx.progress(f"final loss {last['loss']:.4f} (und {last['und_loss']:.4f}, gen {last['gen_loss']:.4f})")
    return {"checkpoint": "checkpoint", "history": "history.json", "snapshots": "snapshots"}


def train_loop(config: dict) -> None:
    """One Ray Train worker: build, resume, train, report."""
    torch.set_num_threads(config["threads"])
    rank, world_size = training.world()
    ctx = config["ctx"]
    torch.manual_seed(config["seed"])  # identical init on every rank
    model = UniDigitsModel(reference_config(config["size"], config["variant"]))
    optimizer, scheduler = make_optimizer(model, config["lr"], config["steps"],
                                          warmup_frac=config["warmup_steps"] / config["steps"])
    start, history = 0, []
    snapshots = Path(tempfile.mkdtemp(prefix="unislim-snapshots-"))  # early weights, carried in checkpoints
    with training.latest_checkpoint() as folder:
        if folder is not None:
            start, history = _load_state(folder, model, optimizer, scheduler)
            if (folder / "snapshots").exists():
                shutil.copytree(folder / "snapshots", snapshots, dirs_exist_ok=True)
            if rank == 0:
                ctx.progress(f"resumed from step {start}")
    ddp_model = training.prepare_model(model)
    local_batch = config["batch_size"] // world_size

    sums, t_log, last_log = {"loss": 0.0, "und_loss": 0.0, "gen_loss": 0.0}, time.time(), start
    for step in range(start, config["steps"]):
        generator = torch.Generator().manual_seed((config["seed"] * 1_000_003 + rank) * 10_000_019 + step)
        batch = make_batch(local_batch, generator, und_fraction=config["und_fraction"])
        out = ddp_model(**batch)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        for k in sums:
            sums[k] += getattr(out, k).item()

        done = step + 1
        if done in config["snapshot_steps"] and rank == 0:
            model.save_pretrained(snapshots / f"step-{done}")
        if done % config["log_every"] == 0 or done == config["steps"]:
            entry = {"step": done, **{k: v / (done - last_log) for k, v in sums.items()},
                     "lr": scheduler.get_last_lr()[0], "time_s": round(time.time() - t_log, 3)}
            history.append(entry)
            sums, t_log, last_log = dict.fromkeys(sums, 0.0), time.time(), done
            if rank == 0:
                ctx.log_metrics({f"train/{k}": v for k, v in entry.items() if k != "step"}, step=done)
                ctx.progress(f"step {done}/{config['steps']}  loss {entry['loss']:.4f}")
        if done % config["checkpoint_every"] == 0 or done == config["steps"]:
            training.report({"step": done, "loss": history[-1]["loss"] if history else float("nan")},
                            write=lambda f: _save_state(f, model, optimizer, scheduler, done, history, snapshots))
    shutil.rmtree(snapshots, ignore_errors=True)


def _save_state(folder: Path, model, optimizer, scheduler, step: int, history: list, snapshots: Path) -> None:
    model.save_pretrained(folder / "model")  # safetensors
    if any(snapshots.iterdir()):
        shutil.copytree(snapshots, folder / "snapshots")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, folder / "optim.pt")
    (folder / "history.json").write_text(json.dumps(history))
    (folder / "step.json").write_text(json.dumps({"step": step}))


def _load_state(folder: Path, model, optimizer, scheduler) -> tuple[int, list]:
    from safetensors.torch import load_file

    model.load_state_dict(load_file(folder / "model" / "model.safetensors"))
    state = torch.load(folder / "optim.pt", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return json.loads((folder / "step.json").read_text())["step"], json.loads((folder / "history.json").read_text())


def _plot_loss(history: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for k in ("loss", "und_loss", "gen_loss"):
        ax.plot(steps, [h[k] for h in history], label=k)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(f"pretrain {title}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
