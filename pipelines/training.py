"""Ray Train at the edge: stages hand a `train_loop_per_worker(config: dict)` to `fit`.

`fit` builds the `ScalingConfig`/`RunConfig` from the stage context: the run is named after the
stage's cache key and stored under `<runs-dir>/ray_train/`, so rerunning the same stage resumes
from its last reported checkpoint (Ray Train V2 semantics). Inside the loop, `latest_checkpoint`,
`report` and `world` are the only Ray calls a stage needs.
"""

from __future__ import annotations

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
        keep_checkpoints: int = 2) -> ray.train.Result:
    """Run `loop` on `num_workers` Ray Train workers; raise if training failed."""
    ctx.progress(f"Ray Train: {num_workers} worker(s), run {ctx.train_run_name} under {ctx.train_storage}")
    trainer = TorchTrainer(
        loop,
        train_loop_config={**config, "ctx": ctx},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker}),
        run_config=RunConfig(name=ctx.train_run_name, storage_path=ctx.train_storage,
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


def report(metrics: dict[str, Any], write: Callable[[Path], None] | None = None) -> None:
    """Report metrics from every worker; with `write`, rank 0 also saves a checkpoint folder."""
    rank, _ = world()
    if write is None or rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        write(Path(folder))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
