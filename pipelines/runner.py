"""`unislim run`: the config's stages as a DAG of Ray tasks chained by ObjectRefs.

Each stage is one Ray task (`num_cpus=0`, or 1 for `evaluate`, which does its own work) whose
arguments are its upstream stages' ObjectRefs, so Ray orders them and runs independent branches at
once; the heavy work inside a stage (Ray Train workers, Ray Data, actors, Tune trials) reserves the
CPUs and GPUs. A stage task first computes its
cache key and returns the finished output if there is one; otherwise it runs the stage into a
temp folder, commits it atomically, and logs it as a child MLflow run of the pipeline's run.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import ray

import unislim
from unislim.config import PipelineConfig, flatten

from . import tracking
from .context import StageContext
from .graph import SOURCE, StageSpec, plan, select
from .store import Manifest, StageOutput, cache_key, hash_tree, load_complete


class ClusterError(RuntimeError):
    """The Ray cluster and the storage settings cannot work together."""


@dataclass
class Job:
    """What every stage task of one pipeline run shares (picklable)."""

    runs_dir: Path
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    force: frozenset[str] = frozenset()
    log_checkpoints: str = "none"  # tracking.log_checkpoints: none | final | all


@dataclass
class StageResult:
    id: str
    status: str  # ran | cached | failed | upstream-failed
    manifest: Manifest | None = None
    error: str | None = None


@dataclass
class PipelineResult:
    stages: dict[str, StageResult] = field(default_factory=dict)
    tracking_uri: str = ""
    experiment_id: str = ""
    run_id: str = ""
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        return all(r.status in ("ran", "cached") for r in self.stages.values())


# ---------------------------------------------------------------------------------------------
# One stage (runs inside a Ray task; a plain function so tests can call it directly)


def execute_stage(spec: StageSpec, stage_cfg: Any, config_slice: dict, job: Job,
                  upstream: dict[str, Manifest]) -> Manifest:
    inputs = {name: upstream[name].artifact(output) for name, (_, output) in spec.inputs.items()}
    input_hashes = {name: a.hash for name, a in inputs.items()}
    key = cache_key(spec.id, config_slice, input_hashes, spec.module)
    uri, parent = job.tracking_uri, job.parent_run_id
    tags = {"unislim.stage": spec.id, "unislim.cache_key": key}
    params = flatten(config_slice)

    done = None if spec.id in job.force else load_complete(job.runs_dir / spec.id / key)
    if done is not None:
        run_id = tracking.start_run(uri, job.experiment_id, spec.id, parent=parent, params=params,
                                    tags={**tags, "unislim.cached": "true", "unislim.output": done.dir,
                                          "unislim.source_run_id": done.mlflow_run_id or ""})
        tracking.log_metrics(uri, run_id, done.metrics)
        tracking.end_run(uri, run_id, ok=True)
        print(f"[{spec.id}] cached: {done.dir}", flush=True)
        return done

    run_id = tracking.start_run(uri, job.experiment_id, spec.id, parent=parent, params=params,
                                tags={**tags, "unislim.cached": "false"})
    started = time.time()
    try:
        with StageOutput(job.runs_dir, spec.id, key) as out:
            ctx = StageContext(stage=spec.id, key=key, out_dir=out.tmp, runs_dir=job.runs_dir,
                               tracking_uri=uri, run_id=run_id, started=started)
            ctx.progress(f"starting (cache key {key})")
            outputs = spec.module.run(stage_cfg, inputs, ctx)
            metrics_file = out.tmp / "metrics.json"
            metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
            manifest = Manifest(
                stage=spec.id, key=key, dir=str(out.final), inputs=input_hashes,
                outputs={k: str(Path(v).resolve().relative_to(out.tmp.resolve())) if Path(v).is_absolute() else str(v)
                         for k, v in outputs.items()},
                metrics=metrics, mlflow_run_id=run_id, elapsed_s=round(time.time() - started, 2))
            out.commit(manifest)
    except BaseException:
        tracking.end_run(uri, run_id, ok=False)
        raise
    tracking.log_metrics(uri, run_id, manifest.metrics)
    tracking.set_tags(uri, run_id, {"unislim.output": manifest.dir})
    tracking.log_outputs(uri, run_id, Path(manifest.dir), manifest.outputs, job.log_checkpoints)
    tracking.end_run(uri, run_id, ok=True)
    ctx.progress(f"done in {manifest.elapsed_s:.1f}s → {manifest.dir}")
    return manifest


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
        _check_cluster(uri, runs_dir)
        exp_id = tracking.ensure_experiment(uri, cfg.experiment, runs_dir)
        parent = tracking.start_run(
            uri, exp_id, f"{cfg.name}-{datetime.now():%Y%m%d-%H%M%S}", params=flatten(cfg),
            tags={"unislim.config_hash": cfg.digest(), "unislim.git_sha": tracking.git_sha(),
                  "unislim.version": unislim.__version__, "unislim.runs_dir": str(runs_dir)})
        tracking.log_dict(uri, parent, cfg.model_dump(mode="json"), "config.yaml")
        result = PipelineResult(tracking_uri=uri, experiment_id=exp_id, run_id=parent)
        job = Job(runs_dir, uri, exp_id, parent, frozenset(force), cfg.tracking.log_checkpoints)
        try:
            _run_graph(cfg, specs, job, result)
        finally:
            tracking.end_run(uri, parent, ok=result.ok)
            result.elapsed_s = time.time() - t0
    finally:
        if started_ray:
            ray.shutdown()
    print(summary(specs, result), flush=True)
    return result


def _run_graph(cfg: PipelineConfig, specs: list[StageSpec], job: Job, result: PipelineResult) -> None:
    refs: dict[str, ray.ObjectRef] = {}
    if cfg.model.source == "path":
        refs[SOURCE] = ray.put(source_manifest(cfg.model.path))
    for spec in specs:
        upstream = [refs[stage] for stage, _ in spec.inputs.values()]
        refs[spec.id] = _stage_task.options(name=f"stage:{spec.id}", num_cpus=spec.num_cpus).remote(
            spec, spec.config(cfg), spec.config_slice(cfg), job, *upstream)
    pending = {refs[s.id]: s for s in specs}
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            spec = pending.pop(ready[0])
            try:
                manifest = ray.get(ready[0])
                result.stages[spec.id] = StageResult(spec.id, "cached" if manifest.cached else "ran", manifest)
            except Exception as e:  # noqa: BLE001 - reported in the summary, the run goes on
                failed_up = [u for u, _ in spec.inputs.values()
                             if u in result.stages and result.stages[u].status not in ("ran", "cached")]
                status = "upstream-failed" if failed_up else "failed"
                result.stages[spec.id] = StageResult(spec.id, status, error=_short_error(e))
                if status == "failed":
                    print(f"[{spec.id}] FAILED:\n{e}", flush=True)
    except KeyboardInterrupt:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise


def _short_error(e: BaseException) -> str:
    """The innermost cause of a (possibly nested) Ray task error, on one line."""
    while (inner := getattr(e, "cause", None) or e.__cause__) is not None and inner is not e:
        e = inner
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


def _connect_ray(address: str | None, timeout_s: float | None = None) -> bool:
    """Join the given cluster (or RAY_ADDRESS), or start a local one; True if we started it.

    `ray.init` gives an address with nothing behind it about 40 s per attempt, and retries, so
    a given address is probed first, bounded by `timeout_s` (default: UNISLIM_CONNECT_TIMEOUT,
    else 30 s): a TCP connect, then the HTTP/2 greeting every gRPC server (the GCS, the Ray
    Client server) answers at once. A closed port, a silent one or a server of another kind
    (the dashboard) is a `ClusterError` naming the address.
    """
    import os
    import socket

    from ray._private import services

    from unislim.errors import ClusterError as AddressError

    if ray.is_initialized():
        return False
    if timeout_s is None:
        timeout_s = float(os.environ.get("UNISLIM_CONNECT_TIMEOUT") or 30)
    env = os.environ.get("RAY_ADDRESS") or None
    given = env if env and address in (None, "auto") else address
    where = f"RAY_ADDRESS {given}" if given == env and env else f"--address {given}"
    if given is not None and given.lower().startswith(("http://", "https://")):
        raise AddressError(where, "is a dashboard / job server address; `unislim run` joins a cluster by its GCS "
                           "address (HOST:6379) or ray://HOST:10001. To use the job server, submit the run: "
                           "`ray job submit --address ... -- unislim run ...` (see cluster/README.md)")
    target = given
    if given == "auto":  # the cluster `ray start` recorded on this machine, as ray.init finds it
        try:
            target = services.canonicalize_bootstrap_address(given)
        except ConnectionError as e:
            raise AddressError(where, f"no Ray cluster found ({' '.join(str(e).split())[:200]})") from None
    if target is not None and target != "local":
        host, sep, port = target.rpartition("://")[2].rpartition(":")
        if not host or not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise AddressError(where, "expected HOST:PORT (e.g. 127.0.0.1:6379), ray://HOST:PORT, auto or local")
        deadline = time.monotonic() + timeout_s
        greeting = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000")  # + empty SETTINGS
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s) as sock:
                if os.environ.get("RAY_USE_TLS", "0").lower() in ("0", "false", ""):
                    sock.settimeout(max(0.1, deadline - time.monotonic()))
                    sock.sendall(greeting)
                    answer = sock.recv(9)  # a frame header: length (3), type (1) = 0x04 SETTINGS, ...
                    if len(answer) < 4 or answer[3] != 0x04:
                        raise AddressError(where, f"answered, but not as a Ray cluster (gRPC): got {answer[:12]!r}; "
                                           "the GCS listens on HOST:6379 by default, the dashboard on :8265")
        except TimeoutError:
            raise AddressError(where, f"no Ray cluster answered within {timeout_s:g} s (--connect-timeout)") from None
        except ConnectionRefusedError:
            raise AddressError(where, "connection refused: no Ray cluster listens there (start one with "
                               "`ray start --head`, or leave --address out to start a local one)") from None
        except OSError as e:
            raise AddressError(where, f"cannot connect ({e.strerror or e})") from None
    try:
        ray.init(address=address, log_to_driver=True)
    except (ConnectionError, TimeoutError, RuntimeError, ValueError) as e:
        if target is None or target == "local":
            raise  # starting a local cluster failed: not a problem of an address
        token = " (with token auth: is RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH the cluster's token?)" \
            if os.environ.get("RAY_AUTH_MODE", "").lower() == "token" else ""
        raise AddressError(where, f"cannot join the Ray cluster: {type(e).__name__}: "
                           f"{' '.join(str(e).split())[:300]}{token}") from e
    return True


def _check_cluster(uri: str, runs_dir: Path) -> None:
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) > 1 and tracking.is_local_store(uri):
        raise ClusterError(
            f"the Ray cluster has {len(nodes)} nodes but the MLflow tracking URI is a local store ({uri}): "
            "stages on other nodes cannot write to it. Start an MLflow server and pass --tracking-uri "
            f"http://HOST:5000 (or set MLFLOW_TRACKING_URI), and put --runs-dir (now {runs_dir}) on storage "
            "every node mounts (NFS, or an S3 mount). See cluster/README.md.")


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
    ok = "ok" if result.ok else "FAILED"
    lines.append(f"pipeline {ok} in {result.elapsed_s:.1f}s")
    lines.append(f"MLflow: {result.tracking_uri}  run {result.run_id}")
    lines.append(f"  browse: `make ui`, then {tracking.run_url(result.tracking_uri, result.experiment_id, result.run_id)}")
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
