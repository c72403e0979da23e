"""Wall-clock of one pretrain step of the digits model: plain torch vs the DeepSpeed engine, side by side.

One process, one batch (the pretrain stage's global batch, half understanding and half generation
rows), two copies of the same freshly initialised model: one trained by plain torch (AdamW, gradient
clipping), one wrapped by `pipelines/training.deepspeed_engine` (ZeRO-0, fp32, as `pretrain` runs it).
They take steps in turn, the order alternating, so load from elsewhere on the machine falls on both.
A forward alone is timed too. With `--ray`, the same plain step then runs inside a Ray Train worker
(1 worker × `--threads` CPUs) on a local cluster, and once more with the worker also iterating a
Ray Data shard each step, as `pretrain` does: what the Ray Train worker environment costs.

    python -P bench/train_step.py [--batch-size 64] [--threads 2] [--steps 40] [--ray]

Prints a table and writes bench/results/train_step.json.
"""

from __future__ import annotations

from pathlib import Path
import sys

# bench/accelerate.py is named like the `accelerate` package, which transformers imports when it is on the path;
# take bench/ (sys.path[0] for a script, inherited by Ray workers) off the path before anything imports it.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import copy
import json
import os
import platform
import statistics
import time


def _setup(batch_size: int, threads: int):
    import torch

    from unislim.modeling.families import get_family
    from unislim.pipelines.training import make_optimizer

    torch.set_num_threads(threads)
    family = get_family("digits")
    torch.manual_seed(0)
    model = family.new_model(size="small", variant="shared")
    rows = {k: family.reference_rows(k, batch_size // 2, 1, targets=True) for k in ("und", "gen")}
    columns = {k: {c: [r[c] for r in v] for c in v[0]} for k, v in rows.items()}
    batch = family.collate(columns, torch.Generator().manual_seed(0), model.config)
    optimizer, scheduler = make_optimizer(model, 1e-3, 1000, 10)
    model.train()

    def plain() -> None:
        loss, _ = family.loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()

    def forward() -> None:
        with torch.no_grad():
            family.loss(model, batch)

    return family, model, batch, plain, forward


def _ray_worker_loop(config: dict) -> None:
    import ray.train

    _, _, _, plain, _ = _setup(config["batch_size"], config["threads"])
    rows = None
    if config["data"]:
        shard = ray.train.get_dataset_shard("und")

        def endless():
            while True:
                yield from shard.iter_batches(batch_size=config["batch_size"] // 2, batch_format="numpy",
                                              drop_last=True, local_shuffle_buffer_size=256, local_shuffle_seed=0)
        rows = endless()
    times = []
    for _ in range(config["warmup"] + config["steps"]):
        if rows is not None:
            next(rows)
        t0 = time.perf_counter()
        plain()
        times.append(time.perf_counter() - t0)
    ray.train.report({"median_s": statistics.median(times[config["warmup"]:])})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--ray", action="store_true", help="also time the step inside a Ray Train worker")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "train_step.json"))
    args = parser.parse_args()

    import torch
    import torch.distributed as dist

    from unislim.pipelines.training import deepspeed_engine, make_optimizer

    family, model, batch, plain, forward = _setup(args.batch_size, args.threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29533"),
                      LOCAL_RANK="0", RANK="0", WORLD_SIZE="1")
    dist.init_process_group("gloo", rank=0, world_size=1)
    twin = copy.deepcopy(model)
    optimizer, scheduler = make_optimizer(twin, 1e-3, 1000, 10)
    engine = deepspeed_engine(twin, optimizer, scheduler, zero_stage=0, micro_batch_size=args.batch_size)
    engine.train()

    def deepspeed() -> None:
        loss, _ = family.loss(engine, batch)
        engine.backward(loss)
        engine.step()

    variants = {"plain torch step": plain, "DeepSpeed engine step": deepspeed, "forward alone": forward}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(args.warmup + args.steps):
        order = list(variants) if i % 2 == 0 else list(reversed(variants))
        for name in order:
            t0 = time.perf_counter()
            variants[name]()
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    result = {name: statistics.median(v) for name, v in times.items()}
    dist.destroy_process_group()

    if args.ray:
        import ray
        import ray.data
        from ray.train import ScalingConfig
        from ray.train.torch import TorchTrainer

        import pyarrow as pa

        ray.init(num_cpus=args.threads)
        rows = ray.data.from_arrow(pa.Table.from_pylist(family.reference_rows("und", 20 * args.batch_size, 1)))
        for data in (False, True):
            config = {"batch_size": args.batch_size, "threads": args.threads, "steps": args.steps,
                      "warmup": args.warmup, "data": data}
            fit = TorchTrainer(_ray_worker_loop, train_loop_config=config,
                               scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": args.threads}),
                               datasets={"und": rows} if data else {}).fit()
            name = "plain step in a Ray Train worker" + (", iterating a Ray Data shard" if data else "")
            result[name] = fit.metrics["median_s"]
        ray.shutdown()

    base = result["plain torch step"]
    print(f"digits small shared, batch {args.batch_size}, {args.threads} thread(s), median of {args.steps} steps")
    print("| variant | ms | ÷ plain step |\n|---|---|---|")
    for name, t in result.items():
        print(f"| {name} | {t * 1e3:.1f} | {t / base:.2f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"batch_size": args.batch_size, "threads": args.threads,
                                          "steps": args.steps, "torch": torch.__version__,
                                          "machine": platform.processor() or platform.machine(),
                                          "median_s": result}, indent=2))


if __name__ == "__main__":
    main()
