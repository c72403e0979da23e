"""The one training loop (pretrain, adapt's EFT and MoE phases, mod, search trials) and its Ray Train /
DeepSpeed glue.

A stage calls `train(ctx, spec, datasets, ...)`: `spec` is a plain dict (what to load, how to prepare
it, the recipe), `datasets` maps each training task to a Ray Dataset of its `train/` shards. Every
worker runs `train_loop_per_worker`:
1. load the checkpoint through its family (or build the family's fresh model), prepare it (insert
   Mixture-of-Depths routers, freeze the experts for Expert-Frozen Tuning);
2. AdamW (no decay on norms, biases, embeddings; routers at their own rate) + linear warmup +
   cosine decay to 10%, inside a DeepSpeed ZeRO engine (`zero_stage` 0–3; fp32 on CPU over gloo, bf16
   on GPU) over the process group Ray Train set up;
3. each step, `mix[task] × batch` rows of every task from `ray.train.get_dataset_shard(task)`,
   collated by the family (its random draws seeded by (seed, rank, global step)), the family's loss
   plus surgery's auxiliary losses (MoE load balance, MoD predictor);
4. rank 0 logs to MLflow and every rank reports its optimizer shard with the model every
   `checkpoint_every` steps — one checkpoint format: an HF folder (`model/`) + `engine-rank<r>.pt` +
   `state.json` (phase, step, log, resumes).
A spec may list `phases` (adapt: EFT, then MoE): each overrides the spec's fields, and the workers
run them one after another on the same data streams, each with a fresh model build (from the
previous phase's weights), optimizer and engine — one Ray Train run, so a phase pays no worker
start-up (~40 s on 2 CPUs). A finished phase's model is written once, beside the run's checkpoints
(`<run>/phases/<name>/`), not copied into every later one.
The run is named after the stage's cache key under `<runs-dir>/ray_train/`, so rerunning a stage
resumes from its last checkpoint (Ray Train V2).

Resume and data order: a resumed run restarts at the step after its checkpoint with the model,
optimizer and scheduler state and the same per-step random draws, and skips as many rows of each
task's stream as the steps it already took; the rows themselves come from Ray Data's streaming
split of the shards, whose assignment of blocks to workers is not fixed, so after a resume (or
with several workers) a worker may see other rows than an uninterrupted run would have — each
epoch still covers every row once across the workers.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import ray.train
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from .context import StageContext


# ------------------------------------------------------------------------------------ the driver side


def fit(loop: Callable[[dict], None], config: dict[str, Any], ctx: StageContext, *, num_workers: int,
        use_gpu: bool = False, cpus_per_worker: float = 1.0, max_failures: int = 0, keep_checkpoints: int = 2,
        name_suffix: str = "", datasets: dict | None = None, storage: str | None = None,
        name: str | None = None) -> ray.train.Result:
    """Run `loop` on `num_workers` Ray Train workers; raise if training failed.

    `name_suffix` tells apart several training runs of one stage (e.g. its phases); `datasets` are
    split across the workers (each reads its shard with `get_dataset_shard(name)`)."""
    name = name or ctx.train_run_name + (f"-{name_suffix}" if name_suffix else "")
    storage = storage or ctx.train_storage
    ctx.progress(f"Ray Train: {num_workers} worker(s), run {name} under {storage}")
    trainer = TorchTrainer(
        loop,
        train_loop_config={**config, "ctx": ctx, "run_dir": str(Path(storage) / name)},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints)),
        datasets=datasets or {},
        dataset_config=DataConfig(datasets_to_split="all"),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    return result


IN_DRIVER_BYTES = 256 << 20  # training shards up to this size are read by the stage driver itself


def training_datasets(train_dir: str | Path, tasks: dict[str, dict]) -> dict:
    """One Ray Dataset per training task (`train/<task>/part-*.parquet` of the shard stage), its
    blocks in the object store before the workers start: once the workers hold the cluster's CPUs a
    read task could never be scheduled (they would wait for their shards forever), and splitting
    blocks that exist needs no CPU. Small shards (the usual case) are read here with pyarrow —
    starting Ray Data read tasks costs more than reading them — larger ones by Ray Data's readers."""
    import pyarrow.parquet as pq
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    out = {}
    for name, info in tasks.items():
        if "train_rows" not in info:
            continue
        files = sorted((Path(train_dir) / name).glob("*.parquet"))
        if sum(f.stat().st_size for f in files) <= IN_DRIVER_BYTES:
            out[name] = ray.data.from_arrow([pq.read_table(f) for f in files])
        else:
            out[name] = ray.data.read_parquet([str(f) for f in files]).materialize()
    return out


def train(ctx: StageContext, spec: dict[str, Any], inputs: dict, section: Any, *, name_suffix: str = "",
          storage: str | None = None, name: str | None = None) -> tuple[Path, dict]:
    """Train `spec` (one phase or its `phases`) and return (a temp folder with the final
    checkpoint's `model/` and `snapshots/`, its state: history, resumes; `phase_states` splits it
    by phase). `section` is the stage's Ray Train config (workers, CPUs, GPU, max_failures);
    `inputs` has the shard stage's `train` and `tasks`."""
    tasks = json.loads(Path(inputs["tasks"].path).read_text())
    spec = {**spec, "kinds": {name: tasks[name]["kind"] for name in spec["mix"]}}
    datasets = training_datasets(inputs["train"].path, {n: tasks[n] for n in spec["mix"]})
    result = fit(train_loop_per_worker, spec, ctx, num_workers=section.num_workers, use_gpu=section.use_gpu,
                 cpus_per_worker=section.cpus_per_worker, max_failures=section.max_failures,
                 name_suffix=name_suffix, datasets=datasets, storage=storage, name=name)
    folder = Path(tempfile.mkdtemp(prefix="unislim-train-"))
    with result.checkpoint.as_directory() as ckpt:
        shutil.copytree(Path(ckpt) / "model", folder / "model")
        if (Path(ckpt) / "snapshots").exists():
            shutil.copytree(Path(ckpt) / "snapshots", folder / "snapshots")
        state = json.loads((Path(ckpt) / "state.json").read_text())
    return folder, state


def recipe(section: Any, seed: int, mix: dict[str, float], **extra) -> dict[str, Any]:
    """The loop spec fields every training stage sets from its config section."""
    return {"seed": seed, "lr": section.lr, "warmup_steps": section.warmup_steps, "batch_size": section.batch_size,
            "mix": mix, "zero_stage": section.zero_stage, "log_every": section.log_every,
            "checkpoint_every": section.checkpoint_every, "threads": max(1, int(section.cpus_per_worker)), **extra}


# ------------------------------------------------------------------------------------ worker helpers


def world() -> tuple[int, int]:
    """(rank, world size) of this worker."""
    context = ray.train.get_context()
    return context.get_world_rank(), context.get_world_size()


@contextmanager
def latest_checkpoint() -> Iterator[Path | None]:
    """The folder of the last reported checkpoint (on a resume), else None."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        yield None
        return
    with checkpoint.as_directory() as folder:
        yield Path(folder)


def report(metrics: dict[str, Any], write: Callable[[Path], None] | None = None, all_ranks: bool = False) -> None:
    """Report metrics from every worker; with `write`, rank 0 (or, with `all_ranks`, every rank)
    also writes files into the checkpoint folder. Ranks must write distinct file names."""
    rank, _ = world()
    if write is None or (rank != 0 and not all_ranks):
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        write(Path(folder))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def make_optimizer(model, lr: float, steps: int, warmup_steps: int, weight_decay: float = 0.01,
                   router_lr: float | None = None):
    """AdamW (no decay on norms, biases, embeddings; MoD routers and predictors in their own group at
    `router_lr`) + linear warmup + cosine decay to 10% of each group's rate."""
    import torch

    decay, no_decay, routers = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if router_lr is not None and (".mod_routers." in name or ".mod_predictors." in name):
            routers.append(p)
        else:
            (decay if p.ndim >= 2 and "embed" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if routers:
        groups.append({"params": routers, "lr": router_lr, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98))
    warmup = max(1, warmup_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps - warmup))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def local_counts(mix: dict[str, float], batch: int) -> dict[str, int]:
    """Rows of each task in a batch of `batch`: shares rounded, at least one row of every task,
    summing to `batch` exactly (largest remainders)."""
    if batch < len(mix):
        raise ValueError(f"a batch of {batch} cannot hold a row of each of the {len(mix)} tasks {sorted(mix)}")
    raw = {t: s * batch for t, s in mix.items()}
    counts = {t: max(1, int(v)) for t, v in raw.items()}
    for t in sorted(raw, key=lambda t: raw[t] - int(raw[t]), reverse=True):
        if sum(counts.values()) >= batch:
            break
        counts[t] += 1
    while sum(counts.values()) > batch:
        t = max(counts, key=counts.get)
        counts[t] -= 1
    return counts


def row_stream(shard, n: int, seed: int) -> Iterator[dict]:
    """Endless batches of `n` rows from one task's dataset shard, epoch after epoch (shuffled
    locally, seeded per epoch)."""
    epoch = 0
    while True:
        got = False
        for batch in shard.iter_batches(batch_size=n, batch_format="numpy", drop_last=True,
                                        local_shuffle_buffer_size=max(4 * n, 256), local_shuffle_seed=seed + epoch):
            got = True
            yield batch
        if not got:
            raise ValueError(f"a worker's share of a training task holds fewer than {n} rows (one step's worth): "
                             "give the task more rows or use fewer workers / a smaller batch")
        epoch += 1


def row_fingerprints(batch: dict) -> list[str]:
    """A short hash of each row of a numpy batch (its column values): which rows a step trained on."""
    import hashlib

    import numpy as np

    n = len(next(iter(batch.values())))
    out = []
    for i in range(n):
        h = hashlib.sha1()
        for name in sorted(batch):
            h.update(name.encode())
            h.update(np.asarray(batch[name][i]).tobytes() if not isinstance(batch[name][i], str)
                     else batch[name][i].encode())
        out.append(h.hexdigest()[:12])
    return out


def _merge_kinds(rows: dict[str, dict], kinds: dict[str, str]) -> dict[str, dict]:
    """Rows per task → rows per task kind (two tasks of one kind are concatenated)."""
    import numpy as np

    out: dict[str, dict] = {}
    for task, batch in rows.items():
        kind = kinds[task]
        if kind not in out:
            out[kind] = dict(batch)
        else:
            common = set(out[kind]) & set(batch)
            out[kind] = {c: np.concatenate([out[kind][c], batch[c]]) for c in common}
    return out


# ------------------------------------------------------------------------------------ the loop


def _build(spec: dict):
    """The model a phase trains: a checkpoint through its family, or the family's fresh model."""
    import torch

    from unislim.modeling.families import get_family
    from unislim.modeling.loading import load_model

    family = get_family(spec["family"], adapter=spec.get("adapter"))
    if spec.get("init"):
        model = load_model(spec["init"], family=family)
    else:
        torch.manual_seed(spec["seed"])  # identical init on every rank
        model = family.new_model(**spec["new"])
    return family, model


def _prepare(family, model, spec: dict, rank: int, ctx, fit_batch: Callable[[], dict]) -> None:
    """Surgery a phase starts with: MoD routers (fitted on `fit_batch()` unless resuming), EFT freezing."""
    from unislim.modeling.surgery.moe.convert import freeze_experts

    prepare = spec.get("prepare") or {}
    if prepare.get("mod"):
        from unislim.modeling.surgery.mod.fit import fit_routers
        from unislim.modeling.surgery.mod.layer import add_mod

        adapter = family.adapter(model)
        family.stamp(model, adapter)
        mod = prepare["mod"]
        add_mod(model, adapter, {t: {int(i): c for i, c in caps.items()} for t, caps in mod["capacity"].items()},
                routing_mode=mod["routing"], causal_tasks=tuple(mod["causal_tasks"]), keep_last=mod["keep_last"],
                aux_weight=mod["aux_weight"])
        if mod.get("router_init") == "fit" and ray.train.get_checkpoint() is None:
            batch = fit_batch()  # DeepSpeed broadcasts rank 0's weights: every rank starts from its fit
            fit = fit_routers(model, lambda: family.loss(model, batch))
            if rank == 0:
                ctx.progress(f"routers fitted to each layer's per-token update (R² {fit})")
    if prepare.get("freeze_experts"):
        frozen = freeze_experts(model, True)
        if rank == 0:
            ctx.progress(f"Expert-Frozen Tuning: {frozen:,} expert parameters frozen")


def train_loop_per_worker(config: dict) -> None:
    """One Ray Train worker: open the data shards, then for each phase of the spec (one unless
    `phases` lists several, e.g. adapt's EFT then MoE) build, prepare, wrap in DeepSpeed, resume,
    train and report. The phases share the worker, its data streams and the run's checkpoints:
    the last report of a phase is the next phase's step 0, and the finished phase's model is saved
    to `<run>/phases/<name>/`."""
    import torch

    torch.set_num_threads(config["threads"])
    rank, world_size = world()
    phases = [{**config, **phase} for phase in config.get("phases") or [{}]]
    with latest_checkpoint() as folder:
        saved = json.loads((folder / "state.json").read_text()) if folder is not None else None
        snapshots = Path(tempfile.mkdtemp(prefix="unislim-snapshots-"))
        if folder is not None and (folder / "snapshots").exists():
            shutil.copytree(folder / "snapshots", snapshots, dirs_exist_ok=True)
    first = saved.get("phase", 0) if saved else 0
    counts = local_counts(config["mix"], config["batch_size"] // world_size)
    streams = {t: row_stream(ray.train.get_dataset_shard(t), n, config["seed"] * 7919 + rank)
               for t, n in counts.items()}
    # the rows the interrupted run already trained on (see the module docstring)
    for _ in range(sum(p["steps"] for p in phases[:first]) + (saved["step"] if saved else 0)):
        for s in streams.values():
            next(s)
    done, handoff = (saved or {}).get("done", []), []  # handoff: the last phase's weights, taken by the next
    for index in range(first, len(phases)):
        done = done + [_train_phase(phases, index, streams, counts, snapshots, done, handoff,
                                    restarted=saved is not None)]
    shutil.rmtree(snapshots, ignore_errors=True)


def _train_phase(phases: list[dict], index: int, streams: dict, counts: dict, snapshots: Path, done: list,
                 handoff: list, *, restarted: bool) -> dict:
    """Phase `index` of one worker: from the weights in `handoff` (the previous phase's, in this
    process; taken out, so they are freed once loaded) or the run's last checkpoint or the spec's
    init. Returns its record (name, step, history, resumes, data); when another phase follows, it
    leaves its trained weights in `handoff`."""
    import itertools

    import torch

    from unislim.modeling.surgery import aux

    config, last_phase = phases[index], index == len(phases) - 1
    rank, world_size = world()
    ctx, steps, prefix = config["ctx"], config["steps"], config.get("log_prefix", "train")
    family, model = _build(config)
    kinds = config["kinds"]

    def collate(rows: dict, step: int):
        generator = torch.Generator().manual_seed((config["seed"] * 1_000_003 + rank) * 10_000_019 + step)
        return family.collate(_merge_kinds(rows, kinds), generator, model.config)

    first = {t: next(s) for t, s in streams.items()}  # peeked for router fitting, then trained on
    streams.update({t: itertools.chain([first[t]], s) for t, s in streams.items()})
    data = {"rows_per_step": counts, "first_rows": {t: row_fingerprints(b) for t, b in first.items()}}
    _prepare(family, model, config, rank, ctx, lambda: collate(first, -1))
    model.train()
    optimizer, scheduler = make_optimizer(model, config["lr"], steps, config["warmup_steps"],
                                          router_lr=config.get("router_lr"))
    engine, start, history, resumes = resume_deepspeed(model, optimizer, scheduler, phase=index,
                                                       weights=handoff.pop() if handoff else None,
                                                       zero_stage=config["zero_stage"],
                                                       micro_batch_size=config["batch_size"] // world_size)
    if rank == 0:
        ctx.progress(f"{prefix}: {world_size} worker(s) ready (model, data shards, DeepSpeed ZeRO-{config['zero_stage']})"
                     + (f"; phase {index + 1} of {len(phases)}" if len(phases) > 1 else "")
                     + (f"; resumed from step {start}" if resumes and resumes[-1] == start else ""))
    dtype = next(engine.module.parameters()).dtype

    def record(step: int) -> dict:
        return {"name": prefix, "step": step, "history": history, "resumes": resumes, "data": data}

    def state(step: int) -> dict:
        return {"phase": index, **record(step), "done": done}

    offset = config.get("step_offset", 0)
    sums: dict[str, float] = {}
    busy, t_log, last_log = 0.0, time.time(), start
    for step in range(start, steps):
        if step == config.get("fail_at_step") and rank == world_size - 1 and not restarted:
            # An injected worker death (`fail_at_step`), only before any resume. The Ray Train
            # controller collects reported checkpoints by polling: wait as a real step would.
            time.sleep(5)
            os._exit(1)
        batch = collate({t: next(s) for t, s in streams.items()}, offset + step)
        batch = {k: v.to(engine.device, dtype if v.is_floating_point() else None) if hasattr(v, "to") else v
                 for k, v in batch.items()}
        t0 = time.perf_counter()
        aux.reset(model)
        loss, parts = family.loss(engine, batch)
        extra = aux.parts(model)
        total = loss + sum(extra.values()) if extra else loss
        engine.backward(total)
        engine.step()
        busy += time.perf_counter() - t0
        for k, v in {"loss": total, **parts, **extra}.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())

        done_steps = step + 1
        if done_steps in config.get("snapshot_steps", ()):
            save_model(engine, model, snapshots / f"step-{done_steps}")
        if done_steps % config["log_every"] == 0 or done_steps == steps:
            n = done_steps - last_log
            entry = {"step": done_steps, **{k: v / n for k, v in sums.items()}, "lr": scheduler.get_last_lr()[0],
                     "time_s": round(time.time() - t_log, 3), "busy_s": round(busy, 4), "steps": n}
            entry.update(_router_load(model))
            history.append(entry)
            sums, busy, t_log, last_log = {}, 0.0, time.time(), done_steps
            if rank == 0:
                ctx.log_metrics({f"{prefix}/{k}": v for k, v in entry.items() if k not in ("step", "steps")},
                                step=offset + done_steps)
                ctx.progress(f"{prefix} step {done_steps}/{steps}  loss {entry['loss']:.4f}  "
                             f"{entry['busy_s'] / n:.3f}s/step")
        if done_steps == steps and not last_phase:
            # the phase's end is the next phase's start (step 0, no optimizer state); its model is also
            # kept beside the run, copied from the checkpoint's rather than gathered and saved again
            finished = {**record(steps), "model": str(Path(config["run_dir"]) / "phases" / prefix)}
            nxt = {"phase": index + 1, "name": phases[index + 1].get("log_prefix", "train"), "step": 0,
                   "history": [], "resumes": [], "data": {}, "done": done + [finished]}

            def write(folder: Path) -> None:
                save_deepspeed(folder, engine, model, nxt, snapshots)
                if rank == 0:
                    _publish(Path(finished["model"]), lambda tmp: shutil.copytree(folder / "model", tmp))

            report({"step": steps, "loss": history[-1]["loss"] if history else float("nan")}, write=write,
                   all_ranks=True)
            handoff.append(full_weights(engine, model))
            return finished
        if done_steps % config["checkpoint_every"] == 0 or done_steps == steps:
            report({"step": done_steps, "loss": history[-1]["loss"] if history else float("nan")},
                   write=lambda f: save_deepspeed(f, engine, model, state(done_steps), snapshots), all_ranks=True)
    return record(steps)


def phase_states(state: dict) -> dict[str, dict]:
    """A finished run's `state.json` → {phase name: its history, resumes, data, step and, for all
    but the last, `model`: the folder of its final model}, in order."""
    current = {k: v for k, v in state.items() if k not in ("phase", "done")}
    return {r["name"]: r for r in [*state.get("done", []), current]}


def _router_load(model) -> dict[str, float]:
    """Routed tokens per expert in the last forward, max over mean (1 = balanced)."""
    import torch

    from unislim.modeling.surgery.moe.convert import moe_mlps

    moe = moe_mlps(model)
    if not moe:
        return {}
    load = torch.stack([m.last_load.double().cpu() for m in moe.values()])
    return {"router_load_max_over_mean": float((load.max(1).values / load.mean(1).clamp(min=1e-9)).mean())}


# ------------------------------------------------------------------------------------ DeepSpeed


def deepspeed_engine(model, optimizer, scheduler=None, *, zero_stage: int = 2, grad_clip: float = 1.0,
                     micro_batch_size: int = 1, bf16: bool | None = None):
    """`deepspeed.initialize` on this worker's process group: ZeRO `zero_stage` (0-3), gradient
    clipping, bf16 on GPU and fp32 on CPU unless told. `optimizer` is a plain torch optimizer over the
    parameters that train (Expert-Frozen Tuning passes only the unfrozen ones); `scheduler` steps
    once per `engine.step()`. Returns the engine: `engine(**batch)`, `engine.backward(loss)`,
    `engine.step()`."""
    import torch

    os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
    import deepspeed

    # not `import deepspeed.comm.torch as …`: the package `deepspeed.comm` has an attribute `torch`
    # (the torch module, from its star import), and that binds it instead of the submodule
    ds_comm = importlib.import_module("deepspeed.comm.torch")
    if os.environ["DS_ACCELERATOR"] == "cpu":
        # DeepSpeed's CPU backend JIT-builds a shared-memory all-reduce (C++) when it starts, behind a
        # lock file in ~/.cache/torch_extensions: a build killed half-way leaves the lock, and every
        # later start waits on it forever. Only `inference_all_reduce` uses that op; training reduces
        # through torch.distributed (gloo), so it is never built.
        ds_comm.build_shm_op = lambda: None

    bf16 = torch.cuda.is_available() if bf16 is None else bf16
    config = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": zero_stage},
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,  # torch AdamW: DeepSpeed's fused Adam needs CUDA/compiled ops
        "steps_per_print": 1 << 30,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config,
                                      dist_init_required=False)
    return engine


def save_engine_state(engine, folder: Path) -> None:
    """This rank's optimizer (shard) and scheduler state, as `engine-rank<r>.pt`."""
    import torch

    rank, _ = world()
    state = {"optimizer": engine.optimizer.state_dict()}
    if engine.lr_scheduler is not None:
        state["scheduler"] = engine.lr_scheduler.state_dict()
    torch.save(state, folder / f"engine-rank{rank}.pt")


def load_engine_state(engine, folder: Path) -> None:
    """Restore what `save_engine_state` wrote (same world size and ZeRO stage).

    ZeRO optimizers rebuild their partition from every rank's file, so each rank reads them all.
    `weights_only=True`, allowing only DeepSpeed's plain state records (loss scaler, ZeRO stage
    enum, fragment addresses) besides tensors and containers: nothing else can be unpickled."""
    import torch
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    rank, world_size = world()
    paths = [folder / f"engine-rank{r}.pt" for r in range(world_size)]
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {missing}: was it written by a run with another world size "
                                f"than {world_size}?")
    with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
        states = [torch.load(p, weights_only=True, map_location="cpu") for p in paths]
    if engine.zero_optimization_stage() > 0:
        engine.optimizer.load_state_dict([s["optimizer"] for s in states])
    else:
        engine.optimizer.load_state_dict(states[rank]["optimizer"])
    if "scheduler" in states[rank] and engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(states[rank]["scheduler"])


def resume_deepspeed(model, optimizer, scheduler=None, *, phase: int = 0, weights: dict | None = None,
                     **engine_options) -> tuple[Any, int, list, list]:
    """The DeepSpeed half of a resumable training loop: load the starting weights (before ZeRO
    partitions them), build the engine, restore this rank's optimizer state. The weights are
    `weights` when given (the previous phase's, in this process), else the last reported
    checkpoint's (a resume: its `state.json` must be at `phase`), else the model's own.

    Returns (engine, start step, log so far, steps resumed from). `save_deepspeed` writes what this
    reads; a phase's step-0 checkpoint has no optimizer state (a phase starts a fresh one)."""
    from safetensors.torch import load_file

    start, history, resumes = 0, [], []
    with latest_checkpoint() as folder:
        if weights is not None:
            model.load_state_dict(weights)
            folder = None
        elif folder is not None:
            state = json.loads((folder / "state.json").read_text())
            if state.get("phase", 0) != phase:
                raise RuntimeError(f"{folder} is a checkpoint of phase {state.get('phase', 0)}, not {phase}")
            model.load_state_dict({k: v for f in sorted((folder / "model").glob("*.safetensors"))
                                   for k, v in load_file(f).items()})
            start, history, resumes = state["step"], state["history"], state["resumes"] + [state["step"]]
        engine = deepspeed_engine(model, optimizer, scheduler, **engine_options)
        if folder is not None and start > 0:
            load_engine_state(engine, folder)
    return engine, start, history, resumes


def _gathered(engine, model):
    """Every parameter whole on every rank for the block (a collective under ZeRO-3), else nothing."""
    from contextlib import nullcontext

    if engine.zero_optimization_stage() != 3:
        return nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)


def _publish(folder: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` beside `folder`, then renamed over it: the folder is whole or absent."""
    tmp = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def save_model(engine, model, folder: Path) -> None:
    """Rank 0 saves the whole model as an HF folder (whole or not at all). Every rank must call it
    (ZeRO-3 gathers)."""
    with _gathered(engine, model):
        if world()[0] == 0:
            _publish(folder, model.save_pretrained)


def full_weights(engine, model) -> dict:
    """This rank's copy of the whole state dict, on the CPU (ZeRO-3 gathers: every rank calls it)."""
    with _gathered(engine, model):
        return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def save_deepspeed(folder: Path, engine, model, state: dict, snapshots: Path | None = None) -> None:
    """Every rank: its optimizer shard (none at a phase's step 0). Rank 0: the model (gathered first
    under ZeRO-3, a collective), `state.json` (phase, step, the log, the steps the run was resumed
    from, what the data stream looked like, the finished phases' records) and the snapshots."""
    if state["step"] > 0:
        save_engine_state(engine, folder)
    save_model(engine, model, folder / "model")
    if world()[0] == 0:
        if snapshots is not None and snapshots.exists() and any(snapshots.iterdir()):
            shutil.copytree(snapshots, folder / "snapshots")
        (folder / "state.json").write_text(json.dumps(state))
