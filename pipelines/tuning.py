"""Ray Tune at the edge: the `search` stage hands a trial function and a search space to `tune`.

`tune` builds the `Tuner` from the stage context: the experiment is named after the stage's cache
key and stored under `<runs-dir>/ray_tune/`, so rerunning an interrupted search restores it
(`Tuner.restore(..., resume_errored=True)`): finished trials keep their results, unfinished and
errored ones run again. Each trial is a function that fits its own `TorchTrainer` (the Ray Train V2
way) and reports with `report`; the function itself reserves almost nothing, its trainer asks for
the CPUs/GPUs, so `auto_concurrency` derives how many trials fit on the cluster at once.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from .context import StageContext

TRIAL_CPUS = 0.001  # the trial function only waits on its trainer; Tune needs a nonzero request


def tune_storage(ctx: StageContext) -> str:
    return str((Path(ctx.runs_dir) / "ray_tune").resolve())


def experiment_path(ctx: StageContext) -> Path:
    """Where this stage's Tune experiment lives: stable across reruns of the same cache key."""
    return Path(tune_storage(ctx)) / f"{ctx.stage}-{ctx.key}"


def fitting_cpus_per_worker(num_workers: int, cpus_per_worker: float, ctx: StageContext) -> float | None:
    """A trial's trainer asks for num_workers x cpus_per_worker CPUs beside the trial's own
    `TRIAL_CPUS`; when that cannot fit the cluster (2 workers of 1 CPU on 2 CPUs), the per-worker
    request shrinks just enough (the threads a worker runs are unchanged). None: it fits as is."""
    total = ray.cluster_resources().get("CPU", 0)
    if num_workers * cpus_per_worker + TRIAL_CPUS <= total + 1e-9:
        return None
    shrunk = math.floor((total - TRIAL_CPUS) / num_workers * 1e4) / 1e4
    if shrunk <= 0:
        return None  # it cannot fit at all: Ray says so when the trainer starts
    ctx.progress(f"search: trial trainers ask for {shrunk} CPU per worker ({num_workers} workers beside each "
                 f"trial's {TRIAL_CPUS} CPU on a {total:g}-CPU cluster)")
    return shrunk


def auto_concurrency(trainer_cpus: float, trainer_gpus: float, num_trials: int) -> int:
    """Trials that fit at once: the cluster's CPUs (and GPUs) over one trial trainer's request."""
    total = ray.cluster_resources()
    fits = [math.floor(total.get("CPU", 0) / trainer_cpus + 1e-9)] if trainer_cpus > 0 else []
    if trainer_gpus > 0:
        fits.append(math.floor(total.get("GPU", 0) / trainer_gpus + 1e-9))
    n = min(fits) if fits else num_trials
    if n < 1:
        raise RuntimeError(f"search: one trial's trainer needs {trainer_cpus} CPU / {trainer_gpus} GPU but the cluster "
                           f"has {total.get('CPU', 0)} CPU / {total.get('GPU', 0)} GPU")
    return max(1, min(n, num_trials))


def searcher(name: str, seed: int):
    """`random`: Tune's default (random + grid); `optuna`: TPE, if the optuna package is installed."""
    if name == "random":
        return None
    import importlib.util

    if importlib.util.find_spec("optuna") is None:
        raise ImportError("search.search_alg='optuna' needs the optuna package on the cluster "
                          "(pip install optuna), or use search_alg='random'")
    from ray.tune.search.optuna import OptunaSearch

    import optuna

    return OptunaSearch(sampler=optuna.samplers.TPESampler(seed=seed))


def tune_search(trial: Callable[..., None], param_space: dict[str, Any], ctx: StageContext, *,
                trial_args: dict[str, Any], metric: str, mode: str, num_samples: int, max_concurrent: int,
                search_alg: str = "random", seed: int = 0, asha_rungs: int = 0,
                reduction_factor: int = 2) -> tune.ResultGrid:
    """Run (or resume) the search; return every trial's results. Each trial calls
    `trial(config, **trial_args)`; `asha_rungs` > 1 turns ASHA on over that many reports per trial."""
    path = experiment_path(ctx)
    trainable = tune.with_resources(tune.with_parameters(trial, **trial_args), {"cpu": TRIAL_CPUS})
    if tune.Tuner.can_restore(str(path)):
        ctx.progress(f"Ray Tune: resuming {path} (finished trials are kept)")
        tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_errored=True)
    else:
        scheduler = (ASHAScheduler(time_attr="training_iteration", max_t=asha_rungs, grace_period=1,
                                   reduction_factor=reduction_factor) if asha_rungs > 1 else None)
        ctx.progress(f"Ray Tune: {num_samples} sample(s), {max_concurrent} at once, {search_alg} search"
                     f"{', ASHA' if scheduler else ''}; experiment {path}")
        tuner = tune.Tuner(
            trainable, param_space=param_space,
            tune_config=tune.TuneConfig(metric=metric, mode=mode, num_samples=num_samples,
                                        max_concurrent_trials=max_concurrent, search_alg=searcher(search_alg, seed),
                                        scheduler=scheduler),
            run_config=tune.RunConfig(name=path.name, storage_path=str(path.parent), verbose=0))
    return tuner.fit()


def report(metrics: dict[str, Any]) -> None:
    """One result of the current trial (ASHA decides on it)."""
    tune.report(metrics)


def trial_id() -> str:
    return tune.get_context().get_trial_id()
