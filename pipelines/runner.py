"""`unislim run`: the config's stages as a DAG of Ray tasks chained by ObjectRefs.

Each stage is one Ray task (`num_cpus=0`, or 1 for `evaluate`, which does its own work) whose
arguments are its upstream stages' ObjectRefs, so Ray orders them and runs independent branches at
once; the heavy work inside a stage (Ray Train workers, Ray Data, actors, Tune trials) reserves the
CPUs and GPUs. A stage task first computes its cache key and returns the finished output if there
is one (its files checked, see `store.verify`); otherwise, holding the key's lock (a second run
needing the same output waits, then reuses it), it runs the stage into a temp folder, commits it
atomically, and logs it as a child MLflow run of the pipeline's run.

What the record says afterwards (see `tracking` for the run statuses): the pipeline run is
FINISHED only if every planned stage ran or was cached; a stage that fails ends FAILED and one
interrupted ends KILLED; an MLflow call that fails after a stage's output is committed is a warning
(the output stays, cached), not a stage failure. Ctrl-C cancels the running stages gracefully (each
ends its run KILLED), force-cancels what is left after `STOP_GRACE_S`, and the driver closes any
run of its tree still open. A driver that dies without a word (SIGKILL) leaves its runs RUNNING: the
next run on the same runs dir marks them KILLED.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import ray

import unislim
from unislim.config import PipelineConfig, flatten
from unislim.errors import ClusterError, UserError, one_line

from . import cluster, tracking
from .cluster import connect_ray as _connect_ray  # noqa: F401 - the CLI tests probe it here
from .context import StageContext
from .graph import SOURCE, StageSpec, plan, select
from .store import Manifest, StageOutput, cache_key, check_complete, hash_tree, stage_lock

STOP_GRACE_S = 30.0
# a process of the stage died (killed, OOM, its node lost): the remote traceback says nothing more
_PROCESS_DEATHS = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                   ray.exceptions.OutOfMemoryError)  # after Ctrl-C: how long running stages get to end their runs before a force-cancel

__all__ = ["ClusterError", "Job", "PipelineResult", "StageResult", "execute_stage", "run_pipeline", "summary"]


@dataclass
class Job:
    """What every stage task of one pipeline run shares (picklable)."""

    runs_dir: Path
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    force: frozenset[str] = frozenset()
    log_checkpoints: str = "none"  # tracking.log_checkpoints: none | final | all
    run_tags: dict[str, str] = field(default_factory=dict)  # on every run: runs dir, driver, driver lock
    home_node: str = ""  # the driver's Ray node (a local store must stay there)
    driver_lock: str = ""  # the driver's lock file, relative to runs_dir (every node must see it)


@dataclass
class StageResult:
    id: str
    status: str  # ran | cached | failed | upstream-failed | killed
    manifest: Manifest | None = None
    error: str | None = None
    user_error: bool = False  # the failure is bad input (a UserError), not a bug


@dataclass
class PipelineResult:
    stages: dict[str, StageResult] = field(default_factory=dict)
    tracking_uri: str = ""
    experiment_id: str = ""
    run_id: str = ""
    elapsed_s: float = 0.0
    planned: list[str] = field(default_factory=list)  # stage ids of this run
    status: str = ""  # how the pipeline's MLflow run ended: FINISHED | FAILED | KILLED
    runs_dir: str = ""
    marked: list[str] = field(default_factory=list)  # runs of dead drivers this run marked KILLED
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every planned stage ran or was cached (and there was at least one)."""
        ids = self.planned or list(self.stages)
        return bool(ids) and all(s in self.stages and self.stages[s].status in ("ran", "cached") for s in ids)


# ---------------------------------------------------------------------------------------------
# One stage (runs inside a Ray task; a plain function so tests can call it directly)


def execute_stage(spec: StageSpec, stage_cfg: Any, config_slice: dict, job: Job,
                  upstream: dict[str, Manifest]) -> Manifest:
    cluster.check_stage_node(job.tracking_uri, job.runs_dir, job.home_node, job.driver_lock)
    cluster.quiet_queuing(spec.id)
    inputs = {name: upstream[name].artifact(output) for name, (_, output) in spec.inputs.items()}
    input_hashes = {name: a.hash for name, a in inputs.items()}
    key = cache_key(spec.id, config_slice, input_hashes, spec.module)
    folder = job.runs_dir / spec.id / key
    say = _sayer(spec.id)

    with stage_lock(job.runs_dir, spec.id, key, on_wait=lambda who: say(
            f"waiting: another run ({who}) is computing {spec.id}/{key} …")):
        if spec.id not in job.force:
            done, problem = check_complete(folder)
            if problem:
                say(f"cached output {folder} is damaged ({problem}): recomputing")
            if done is not None:
                return _log_cached(spec, config_slice, job, key, done, say)
        return _compute(spec, stage_cfg, config_slice, job, key, inputs, input_hashes, say)


def _log_cached(spec: StageSpec, config_slice: dict, job: Job, key: str, done: Manifest,
                say: Callable[[str], None]) -> Manifest:
    uri = job.tracking_uri

    def log() -> None:
        run_id = tracking.start_run(uri, job.experiment_id, spec.id, parent=job.parent_run_id,
                                    params=flatten(config_slice),
                                    tags={**job.run_tags, "unislim.stage": spec.id, "unislim.cache_key": key,
                                          "unislim.cached": "true", "unislim.output": done.dir,
                                          "unislim.source_run_id": done.mlflow_run_id or ""})
        try:
            tracking.log_metrics(uri, run_id, done.metrics)
        except Exception as e:  # noqa: BLE001 - the output is there either way
            tracking.end_run(uri, run_id, ok=False, reason=f"MLflow logging failed: {_short_error(e)}")
            raise
        tracking.end_run(uri, run_id, ok=True)

    problem = _attempt(log)
    if problem:
        done.warnings.append(f"{spec.id}: cached output {done.dir} is fine, but MLflow logging failed: {problem}")
        say(f"WARNING: {done.warnings[-1]}")
    say(f"cached: {done.dir}")
    return done


def _compute(spec: StageSpec, stage_cfg: Any, config_slice: dict, job: Job, key: str, inputs: dict,
             input_hashes: dict, say: Callable[[str], None]) -> Manifest:
    uri = job.tracking_uri
    cluster.check_fits(spec.name, getattr(stage_cfg, spec.name, None))
    run_id = tracking.start_run(uri, job.experiment_id, spec.id, parent=job.parent_run_id,
                                params=flatten(config_slice),
                                tags={**job.run_tags, "unislim.stage": spec.id, "unislim.cache_key": key,
                                      "unislim.cached": "false", "unislim.node": cluster.node_name()})
    started = time.time()
    try:
        with StageOutput(job.runs_dir, spec.id, key) as out:
            ctx = StageContext(stage=spec.id, key=key, out_dir=out.tmp, runs_dir=job.runs_dir,
                               tracking_uri=uri, run_id=run_id, started=started,
                               home_node=job.home_node if tracking.is_local_store(uri) else "")
            ctx.progress(f"starting (cache key {key})")
            outputs = spec.module.run(stage_cfg, inputs, ctx)
            metrics_file = out.tmp / "metrics.json"
            metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
            manifest = Manifest(
                stage=spec.id, key=key, dir=str(out.final), inputs=input_hashes,
                outputs={k: str(Path(v).resolve().relative_to(out.tmp.resolve())) if Path(v).is_absolute() else str(v)
                         for k, v in outputs.items()},
                metrics=metrics, mlflow_run_id=run_id, elapsed_s=round(time.time() - started, 2))
            # we hold the key's lock: an output already there is a forced rerun's, or damaged
            manifest = out.commit(manifest, replace=True)
    except BaseException as e:
        interrupted = isinstance(e, (KeyboardInterrupt, SystemExit)) or "TaskCancelled" in type(e).__name__
        status, reason = ("KILLED", "interrupted (Ctrl-C or cancelled)") if interrupted else \
            ("FAILED", _short_error(e))
        problem = _attempt(lambda: tracking.end_run(uri, run_id, status=status, reason=reason))
        if problem:
            say(f"WARNING: could not end its MLflow run {run_id} as {status}: {problem}")
        raise

    # The output is complete on disk from here on: MLflow trouble is a warning, never a failure.
    steps = (("metrics", lambda: tracking.log_metrics(uri, run_id, manifest.metrics)),
             ("tags", lambda: tracking.set_tags(uri, run_id, {"unislim.output": manifest.dir})),
             ("artifacts", lambda: tracking.log_outputs(uri, run_id, Path(manifest.dir), manifest.outputs,
                                                        job.log_checkpoints)))
    problems = [f"{what}: {p}" for what, call in steps if (p := _attempt(call))]
    if problems:
        text = "; ".join(problems)
        manifest.warnings.append(f"{spec.id}: output complete at {manifest.dir}, but MLflow logging failed ({text})")
        say(f"WARNING: {manifest.warnings[-1]}; its run ends FAILED with tag {tracking.LOG_ERROR_TAG}")
        failed = _attempt(lambda: (tracking.set_tags(uri, run_id, {tracking.LOG_ERROR_TAG: text}),
                                   tracking.end_run(uri, run_id, ok=False, reason=f"MLflow logging failed: {text}")))
    else:
        failed = _attempt(lambda: tracking.end_run(uri, run_id, ok=True))
    if failed:
        manifest.warnings.append(f"{spec.id}: could not end its MLflow run {run_id}: {failed}")
        say(f"WARNING: {manifest.warnings[-1]}")
    say(f"done in {manifest.elapsed_s:.1f}s → {manifest.dir}")
    return manifest


def _attempt(call: Callable[[], Any]) -> str | None:
    """Run `call`; None if it worked, else its error on one line."""
    try:
        call()
    except Exception as e:  # noqa: BLE001 - the caller reports it
        return _short_error(e)
    return None


def _sayer(stage: str) -> Callable[[str], None]:
    def say(message: str) -> None:
        sys.stdout.write(f"[{stage}] {message}\n")  # not print: Ray Train tees print() into its logger
        sys.stdout.flush()
    return say


@ray.remote(num_cpus=0, max_retries=0)
def _stage_task(spec: StageSpec, stage_cfg: Any, config_slice: dict, job: Job, *upstream: Manifest) -> Manifest:
    return execute_stage(spec, stage_cfg, config_slice, job, dict(zip(spec.inputs, upstream)))


def source_manifest(path: str) -> Manifest:
    """A user checkpoint as if a stage had produced it (its hash keys the stages that read it)."""
    folder = Path(path).resolve()
    if not folder.exists():
        raise FileNotFoundError(f"model.path: {path} does not exist")
    return Manifest(stage=SOURCE, key="path", dir=str(folder), outputs={"checkpoint": "."},
                    files=hash_tree(folder, large=16 << 20), cached=True)  # weights: by size and mtime


# ---------------------------------------------------------------------------------------------
# The pipeline (driver)


def run_pipeline(cfg: PipelineConfig, *, runs_dir: str | Path = "runs", only: list[str] = (),
                 force: list[str] = (), address: str | None = None,
                 tracking_uri: str | None = None) -> PipelineResult:
    t0 = time.time()
    specs = plan(cfg)
    if only:
        specs = select(specs, list(only))
    bad = sorted(set(force) - {s.id for s in specs})
    if bad:
        raise ValueError(f"--force: unknown stage(s) {bad}; this run has {[s.id for s in specs]}")
    runs_dir = Path(runs_dir).resolve()
    runs_dir.mkdir(parents=True, exist_ok=True)
    uri = tracking.default_tracking_uri(runs_dir, tracking_uri)

    started_ray = _connect_ray(address)
    try:
        cluster.check_cluster(uri, runs_dir)
        exp_id = tracking.ensure_experiment(uri, cfg.experiment, runs_dir)
        driver = tracking.DriverLock(runs_dir)
        try:
            result = _run_under(cfg, specs, runs_dir, uri, exp_id, driver, force)
        finally:
            driver.release()
        result.elapsed_s = time.time() - t0
    finally:
        if started_ray:
            ray.shutdown()
    print(summary(specs, result), flush=True)
    return result


def _run_under(cfg: PipelineConfig, specs: list[StageSpec], runs_dir: Path, uri: str, exp_id: str,
               driver: tracking.DriverLock, force: list[str]) -> PipelineResult:
    """The pipeline's MLflow run and its graph, while this driver holds its lock."""
    parent = tracking.start_run(
        uri, exp_id, f"{cfg.name}-{datetime.now():%Y%m%d-%H%M%S}", params=flatten(cfg),
        tags={**driver.tags, "unislim.config_hash": cfg.digest(), "unislim.git_sha": tracking.git_sha(),
              "unislim.version": unislim.__version__})
    result = PipelineResult(tracking_uri=uri, experiment_id=exp_id, run_id=parent, planned=[s.id for s in specs],
                            runs_dir=str(runs_dir))
    status, reason = "FAILED", None
    try:
        result.marked = _attempt_list(lambda: tracking.mark_dead_runs(uri, runs_dir, by=parent), result)
        if result.marked:
            print(f"marked {len(result.marked)} run(s) left RUNNING by a driver that died as KILLED: "
                  f"{', '.join(result.marked[:8])}{' …' if len(result.marked) > 8 else ''}", flush=True)
        problem = _attempt(lambda: tracking.log_dict(uri, parent, cfg.model_dump(mode="json"), "config.yaml"))
        if problem:
            result.warnings.append(f"the pipeline's config.yaml could not be logged: {problem}")
        job = Job(runs_dir, uri, exp_id, parent, frozenset(force), cfg.tracking.log_checkpoints,
                  run_tags=driver.tags, home_node=ray.get_runtime_context().get_node_id(), driver_lock=driver.rel)
        _run_graph(cfg, specs, job, result)
        status = "FINISHED" if result.ok else "FAILED"
        if not result.ok:
            failed = [s for s, r in result.stages.items() if r.status != "ran" and r.status != "cached"]
            reason = f"stage(s) failed: {', '.join(failed)}" if failed else "no stage ran"
    except KeyboardInterrupt:
        status, reason = "KILLED", "interrupted (Ctrl-C)"
        raise
    except BaseException as e:
        reason = _short_error(e)
        raise
    finally:
        result.status = status
        for problem in (_attempt(lambda: tracking.close_running(uri, parent, exp_id, "KILLED" if status == "KILLED"
                                                                 else "FAILED", reason or "its stage never ended it")),
                        _attempt(lambda: tracking.end_run(uri, parent, status=status, reason=reason))):
            if problem:
                result.warnings.append(f"the pipeline's MLflow run {parent} could not be closed: {problem}")
                print(f"WARNING: {result.warnings[-1]}", file=sys.stderr, flush=True)
    return result


def _attempt_list(call: Callable[[], list[str]], result: PipelineResult) -> list[str]:
    try:
        return call()
    except Exception as e:  # noqa: BLE001 - a warning: this run goes on
        result.warnings.append(f"could not look for runs left RUNNING by dead drivers: {_short_error(e)}")
        return []


def _run_graph(cfg: PipelineConfig, specs: list[StageSpec], job: Job, result: PipelineResult) -> None:
    refs: dict[str, ray.ObjectRef] = {}
    if cfg.model.source == "path":
        refs[SOURCE] = ray.put(source_manifest(cfg.model.path))
    # Ray's state API, which Ray Train's helper actors call, finds "the" cluster by scanning this
    # machine's processes unless RAY_ADDRESS says which; with a second cluster on the machine it
    # would fail (a traceback in the log). Stage tasks, and the actors they start, get it set.
    env = {"env_vars": {"RAY_ADDRESS": ray.get_runtime_context().gcs_address}}
    for spec in specs:
        upstream = [refs[stage] for stage, _ in spec.inputs.values()]
        refs[spec.id] = _stage_task.options(name=f"stage:{spec.id}", num_cpus=spec.num_cpus, runtime_env=env).remote(
            spec, spec.config(cfg), spec.config_slice(cfg), job, *upstream)
    pending = {refs[s.id]: s for s in specs}
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            spec = pending.pop(ready[0])
            _collect(spec, ready[0], result)
    except KeyboardInterrupt:
        _stop(pending, result)
        raise


def _collect(spec: StageSpec, ref: ray.ObjectRef, result: PipelineResult) -> None:
    try:
        manifest = ray.get(ref)
        result.stages[spec.id] = StageResult(spec.id, "cached" if manifest.cached else "ran", manifest)
        result.warnings += manifest.warnings
    except Exception as e:  # noqa: BLE001 - reported in the summary, the run goes on
        failed_up = [u for u, _ in spec.inputs.values()
                     if u in result.stages and result.stages[u].status not in ("ran", "cached")]
        status = "upstream-failed" if failed_up else "killed" if isinstance(e, ray.exceptions.TaskCancelledError) \
            else "failed"
        cause = _root_cause(e)
        user = isinstance(cause, UserError)
        result.stages[spec.id] = StageResult(spec.id, status, error=one_line(cause) if user else _short_error(e),
                                             user_error=user)
        died = isinstance(cause, _PROCESS_DEATHS)
        if status == "failed" and (user or died) and not _debug():  # one line (--debug: the traceback)
            print(f"[{spec.id}] FAILED: " + (f"a Ray worker process died ({_short_error(cause)})" if died else
                                             str(cause)), flush=True)
        elif status == "failed":
            print(f"[{spec.id}] FAILED:\n{e}", flush=True)


def _stop(pending: dict[ray.ObjectRef, StageSpec], result: PipelineResult) -> None:
    """Ctrl-C: let the running stages end their runs KILLED, then force what is left."""
    if not pending:
        return
    print(f"\ninterrupted: stopping {len(pending)} stage(s) (up to {STOP_GRACE_S:g}s; Ctrl-C again to force) …",
          file=sys.stderr, flush=True)
    for ref in pending:
        ray.cancel(ref, force=False, recursive=True)
    done, left = [], list(pending)
    try:
        done, left = ray.wait(left, num_returns=len(left), timeout=STOP_GRACE_S)
    except KeyboardInterrupt:
        pass
    for ref in done:  # ended in time: its own run says how (KILLED, or done if it was about to finish)
        _collect(pending[ref], ref, result)
    for ref in left:
        ray.cancel(ref, force=True, recursive=True)
        result.stages[pending[ref].id] = StageResult(pending[ref].id, "killed", error="interrupted (Ctrl-C)")


def _debug() -> bool:
    return os.environ.get("UNISLIM_DEBUG", "") not in ("", "0")


def _root_cause(e: BaseException) -> BaseException:
    """The innermost cause of a (possibly nested) Ray task / Ray Train error."""
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        inner = getattr(e, "cause", None) or e.__cause__ or getattr(e, "controller_failure", None)
        if inner is None and hasattr(e, "worker_failures") and e.worker_failures:
            inner = next(iter(e.worker_failures.values()))
        if not isinstance(inner, BaseException) or inner is e:
            break
        e = inner
    return e


def _short_error(e: BaseException) -> str:
    """The innermost cause of a (possibly nested) Ray task error, on one line."""
    e = _root_cause(e)
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


# ---------------------------------------------------------------------------------------------
# Summary

_HEADLINE = ("mme/overall", "geneval/overall", "fid/gen", "params/active", "pretrain/final_loss",
             "pretrain/train_time_s")
_HEADLINE_PREFIXES = ("nll/", "agreement/", "speedup/")


def summary(specs: list[StageSpec], result: PipelineResult) -> str:
    rows = [("stage", "status", "time", "cache key", "output")]
    for spec in specs:
        r = result.stages.get(spec.id, StageResult(spec.id, "not-run"))
        m = r.manifest
        took = f"{m.elapsed_s:.1f}s" if m and r.status == "ran" else (f"(ran {m.elapsed_s:.1f}s)" if m else "-")
        rows.append((spec.id, r.status, took, m.key if m else "-", m.dir if m else (r.error or "-")))
    widths = [max(len(str(row[i])) for row in rows) for i in range(4)]
    lines = ["", "  ".join(str(c).ljust(w) for c, w in zip(rows[0][:4], widths)) + "  " + rows[0][4]]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row[:4], widths)) + "  " + str(row[4]) for row in rows[1:]]
    for spec in specs:
        r = result.stages.get(spec.id)
        headline = {k: v for k, v in (r.manifest.metrics if r and r.manifest else {}).items()
                    if k in _HEADLINE or k.startswith(_HEADLINE_PREFIXES)}
        if headline:
            lines.append(f"  {spec.id}: " + "  ".join(f"{k}={_fmt(v)}" for k, v in headline.items()))
    lines += [f"  warning: {w}" for w in result.warnings]
    ok = "ok" if result.ok else "FAILED"
    lines.append(f"pipeline {ok} in {result.elapsed_s:.1f}s")
    lines.append(f"MLflow: {result.tracking_uri}  run {result.run_id} ({result.status or '?'})")
    lines.append("  " + tracking.browse_hint(result.tracking_uri, result.experiment_id, result.run_id,
                                             Path(result.runs_dir)))
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
