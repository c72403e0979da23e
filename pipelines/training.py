"""Ray Train at the edge: stages hand a `train_loop_per_worker(config: dict)` to `fit`.

`fit` builds the `ScalingConfig`/`RunConfig` from the stage context: the run is named after the
stage's cache key and stored under `<runs-dir>/ray_train/`, so rerunning the same stage resumes
from its last reported checkpoint (Ray Train V2 semantics). Inside the loop, `latest_checkpoint`,
`report` and `world` are the only Ray calls a stage needs.

DeepSpeed: `deepspeed_engine` wraps a model and its optimizer in a ZeRO engine over the process
group Ray Train already set up (gloo on CPU, NCCL on GPU); `save_engine_state` / `load_engine_state`
keep each rank's optimizer shard in the Ray Train checkpoint (every rank reports its own files, Ray
merges them into one checkpoint folder), loaded back with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import ray.train
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from .context import StageContext


def fit(loop: Callable[[dict], None], config: dict[str, Any], ctx: StageContext, *, num_workers: int,
        use_gpu: bool = False, cpus_per_worker: float = 1.0, max_failures: int = 0,
        keep_checkpoints: int = 2, name_suffix: str = "") -> ray.train.Result:
    """Run `loop` on `num_workers` Ray Train workers; raise if training failed.

    `name_suffix` tells apart several training runs of one stage (e.g. its phases)."""
    name = ctx.train_run_name + (f"-{name_suffix}" if name_suffix else "")
    ctx.progress(f"Ray Train: {num_workers} worker(s), run {name} under {ctx.train_storage}")
    trainer = TorchTrainer(
        loop,
        train_loop_config={**config, "ctx": ctx},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=ctx.train_storage,
                             failure_config=FailureConfig(max_failures=max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints)),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    return result


def prepare_model(model):
    """Move to this worker's device and wrap in DDP when there is more than one worker."""
    import ray.train.torch

    return ray.train.torch.prepare_model(model)


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


def resume_deepspeed(model, optimizer, scheduler=None, **engine_options) -> tuple[Any, int, list, list]:
    """The DeepSpeed half of a resumable training loop: load the last reported checkpoint's model
    weights (before ZeRO partitions them), build the engine, restore this rank's optimizer state.

    Returns (engine, start step, log so far, steps resumed from). `save_deepspeed` writes what this
    reads."""
    from safetensors.torch import load_file

    start, history, resumes = 0, [], []
    with latest_checkpoint() as folder:
        if folder is not None:
            model.load_state_dict(load_file(folder / "model" / "model.safetensors"))
            state = json.loads((folder / "state.json").read_text())
            start, history, resumes = state["step"], state["history"], state["resumes"] + [state["step"]]
        engine = deepspeed_engine(model, optimizer, scheduler, **engine_options)
        if folder is not None:
            load_engine_state(engine, folder)
    return engine, start, history, resumes


def save_deepspeed(folder: Path, engine, model, step: int, history: list, resumes: list) -> None:
    """Every rank: its optimizer shard. Rank 0: the model (gathered first under ZeRO-3, a
    collective), the step, the log, and the steps the run was resumed from."""
    from contextlib import nullcontext

    rank, _ = world()
    save_engine_state(engine, folder)
    gathered = nullcontext()
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
    with gathered:
        if rank == 0:
            model.save_pretrained(folder / "model")
            (folder / "state.json").write_text(json.dumps({"step": step, "history": history, "resumes": resumes}))
