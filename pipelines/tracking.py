"""The MLflow run tree: one parent run per pipeline run, one child run per stage.

Only the driver and the stage driver tasks call this module (through `StageContext` for live
metrics); `modeling/` and the stages themselves never import MLflow. Everything goes through an
explicit `MlflowClient(tracking_uri)` and run ids, never the fluent global "active run", so it is
safe from any process of the Ray job.

How runs end (the record must tell what happened):
- FINISHED: the stage's output is complete and every MLflow call for it succeeded; for the
  pipeline run, every planned stage ran or was cached.
- FAILED: the stage (or some stage of the pipeline) failed, or nothing ran. Also a stage whose
  output is complete on disk but whose metrics / tags / artifacts could not be logged: its tag
  `unislim.log_error` says what failed and `unislim.output` (if it got there) where the output is;
  the stage counts as done and stays cached.
- KILLED: interrupted (Ctrl-C), or left RUNNING by a driver that died (SIGKILL, a lost node):
  the next `unislim run` on the same runs dir finds such runs and marks them, with the tag
  `unislim.end_reason`. A driver holds a lock file (`<runs-dir>/.unislim/drivers/*.lock`, named in
  the tag `unislim.driver_lock` of each of its runs) for as long as it lives; a RUNNING run whose
  lock is free belongs to a dead driver.
A sqlite store is written by several processes at once (the driver, the stage tasks, a second run);
calls that meet "database is locked" are retried for up to `LOCKED_RETRY_S`.
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any, Callable, TypeVar

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from unislim.errors import StorageError

PARENT_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"
RUNS_DIR_TAG = "unislim.runs_dir"
LOCK_TAG = "unislim.driver_lock"  # the driver's lock file, relative to the runs dir
DRIVER_TAG = "unislim.driver"  # "pid N on HOST": who ran it (for people; liveness is the lock)
END_REASON_TAG = "unislim.end_reason"
LOG_ERROR_TAG = "unislim.log_error"
_BATCH = 100  # MLflow's per-request limit on params / metrics
LOCKED_RETRY_S = 60.0

T = TypeVar("T")


def _retry_locked(call: Callable[[], T]) -> T:
    """`call()`, again (with backoff, up to LOCKED_RETRY_S) while sqlite says the database is locked."""
    deadline, pause = time.monotonic() + LOCKED_RETRY_S, 0.05
    while True:
        try:
            return call()
        except Exception as e:  # noqa: BLE001 - sqlalchemy / MlflowException wrap sqlite3.OperationalError
            if "database is locked" not in str(e) and "database table is locked" not in str(e):
                raise
            if time.monotonic() > deadline:
                raise
            time.sleep(pause)
            pause = min(pause * 2, 2.0)


def default_tracking_uri(runs_dir: Path, uri: str | None = None) -> str:
    """`--tracking-uri`, else `MLFLOW_TRACKING_URI`, else `sqlite:///<runs-dir>/mlflow.db`."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{Path(runs_dir).resolve() / 'mlflow.db'}"


_DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")  # SQLAlchemy stores: `engine[+driver]://`
_SCHEMES = ("http", "https", "file", "databricks", "databricks-uc", "uc", *_DB_SCHEMES)
_EXPECTED = "sqlite:///PATH, http(s)://HOST:PORT, file:///PATH, postgresql|mysql|mssql://..., or databricks"


def check_tracking_uri(uri: str, flag: str = "--tracking-uri") -> None:
    """Refuse a tracking URI MLflow would misread (no scheme, unknown scheme, no host, bad port).

    MLflow takes a string without a scheme for a folder and creates it, so `--tracking-uri garbage`
    would quietly start a file store named `garbage`; here it is an error, as is a sqlite file in
    a folder that does not exist.
    """
    from urllib.parse import urlsplit

    def fail(problem: str):
        return StorageError(f"{flag} {uri!r}", f"{problem}; expected {_EXPECTED}")

    if uri.lower() in ("databricks", "databricks-uc", "uc"):  # the default Databricks profile
        return
    head, sep, _ = uri.partition(":")
    scheme = head.lower()
    if not sep or not scheme or not scheme[0].isalpha() or not all(c.isalnum() or c in "+-." for c in scheme):
        raise fail("has no URI scheme")
    base = scheme.split("+")[0]
    if scheme not in _SCHEMES and base not in _DB_SCHEMES:
        raise fail(f"unknown scheme {scheme!r}")
    try:
        parts = urlsplit(uri)
        port = parts.port  # raises ValueError for a port that is not a number in 0..65535
    except ValueError as e:
        raise fail(f"cannot be parsed ({e})") from None
    if base in ("http", "https") and not parts.hostname:
        raise fail("names no host")
    if base in ("http", "https") and port == 0:
        raise fail("has port 0")
    if base == "sqlite":
        if not uri.lower().startswith("sqlite:///") or len(uri) <= len("sqlite:///"):
            raise fail("names no database file (sqlite:///relative/path or sqlite:////absolute/path)")
        folder = Path(uri[len("sqlite:///"):]).parent
        if not folder.is_dir():
            raise StorageError(f"{flag} {uri!r}", f"the database's folder {folder} does not exist")
    if base == "file" and not parts.path:
        raise fail("names no folder")


def check_server(uri: str, timeout_s: float, flag: str = "--tracking-uri") -> None:
    """For an http(s) tracking URI, wait at most `timeout_s` (connect, then read) for an answer.

    MLflow's own client would retry a refused connection 7 times with exponential backoff (about
    4 minutes: MLFLOW_HTTP_REQUEST_MAX_RETRIES=7, MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR=2) and give a
    silent server MLFLOW_HTTP_REQUEST_TIMEOUT=120 s per attempt (about 20 minutes), so a run checks
    here first, once, without retries. Any HTTP answer counts: authentication is MLflow's business.
    """
    if not uri.lower().startswith(("http://", "https://")):
        return
    import requests

    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=(timeout_s, timeout_s), allow_redirects=False)
    except requests.Timeout:
        raise StorageError(f"{flag} {uri}", f"the MLflow server did not answer within {timeout_s:g} s "
                           "(raise --connect-timeout if it is slow to start)") from None
    except requests.RequestException as e:
        reason = _reason(e)
        raise StorageError(f"{flag} {uri}", f"cannot reach an MLflow server ({reason}); start one "
                           "(`mlflow server --host 127.0.0.1 --port 5000`) or leave --tracking-uri out for "
                           "the local store in the runs dir") from None


def _reason(e: BaseException) -> str:
    """The innermost cause of a requests / urllib3 error, short (`Connection refused`)."""
    text = str(e)
    for _ in range(10):  # requests wraps urllib3's MaxRetryError, which holds the socket error
        inner = e.__cause__ or (e.args[0] if e.args and isinstance(e.args[0], BaseException) else None)
        inner = inner or getattr(e, "reason", None)
        if not isinstance(inner, BaseException) or inner is e:
            break
        e, text = inner, str(inner)
    for known in ("Connection refused", "Name or service not known", "No route to host", "Network is unreachable",
                  "certificate verify failed", "Temporary failure in name resolution", "Connection reset"):
        if known in text:
            return known
    return " ".join(text.split())[:200]


def is_local_store(uri: str) -> bool:
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.lower().startswith("sqlite:///") else None


def ensure_experiment(uri: str, name: str, runs_dir: Path) -> str:
    """The experiment's id, created if missing. Two runs starting at once on a new sqlite store
    would both create its tables (and the experiment): the first call holds a lock beside the
    database file, and a lost creation race reads the winner's experiment."""
    from contextlib import nullcontext

    from filelock import FileLock

    db = _sqlite_path(uri)
    with FileLock(f"{db}.lock") if db is not None else nullcontext():
        client = MlflowClient(uri)
        exp = _retry_locked(lambda: client.get_experiment_by_name(name))
        if exp is not None:
            return exp.experiment_id
        location = (Path(runs_dir).resolve() / "artifacts").as_uri() if is_local_store(uri) else None
        try:  # the UI opens a model-training experiment in its training view, not the GenAI one
            return _retry_locked(lambda: client.create_experiment(
                name, artifact_location=location, tags={"mlflow.experimentKind": "custom_model_development"}))
        except Exception:  # noqa: BLE001 - another run created it between the two calls
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                             timeout=5, cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def start_run(uri: str, experiment_id: str, name: str, tags: dict[str, str],
              params: dict[str, Any] | None = None, parent: str | None = None) -> str:
    client = MlflowClient(uri)
    tags = {**tags, RUN_NAME_TAG: name}
    if parent:
        tags[PARENT_TAG] = parent
    run = _retry_locked(lambda: client.create_run(experiment_id, run_name=name, tags=tags))
    log_params(uri, run.info.run_id, params or {})
    return run.info.run_id


def log_params(uri: str, run_id: str, params: dict[str, Any]) -> None:
    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    client = MlflowClient(uri)
    for i in range(0, len(items), _BATCH):
        _retry_locked(lambda: client.log_batch(run_id, params=items[i:i + _BATCH]))


def log_metrics(uri: str, run_id: str, metrics: dict[str, Any], step: int | None = None) -> None:
    """Log the numeric entries of `metrics` (others are skipped)."""
    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    client = MlflowClient(uri)
    for i in range(0, len(items), _BATCH):
        _retry_locked(lambda: client.log_batch(run_id, metrics=items[i:i + _BATCH]))


def set_tags(uri: str, run_id: str, tags: dict[str, str]) -> None:
    items = [RunTag(k, str(v)[:8000]) for k, v in tags.items()]
    _retry_locked(lambda: MlflowClient(uri).log_batch(run_id, tags=items))


def log_dict(uri: str, run_id: str, data: dict, path: str) -> None:
    MlflowClient(uri).log_dict(run_id, data, path)


def log_folder(uri: str, run_id: str, folder: Path) -> None:
    MlflowClient(uri).log_artifacts(run_id, str(folder))


SMALL_FILE = 5 << 20  # bytes: larger files stay in the runs dir (a tag or the output folder points at them)


def is_checkpoint(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def log_outputs(uri: str, run_id: str, folder: Path, outputs: dict[str, str], log_checkpoints: str = "none") -> None:
    """A stage's output into its MLflow run, at real sizes: plots, tables, configs and small files
    are uploaded; every checkpoint folder gets a tag `unislim.checkpoint.<output>` with its path in
    the runs dir and is uploaded only as `log_checkpoints` says (`final`: the stage's `checkpoint`
    output; `all`: every one)."""
    folder = Path(folder)
    checkpoints = {str(Path(p)): name for name, p in outputs.items() if is_checkpoint(folder / p)}
    for sub in folder.rglob("config.json"):  # checkpoints that are no named output (snapshots, trials)
        if is_checkpoint(sub.parent):
            checkpoints.setdefault(str(sub.parent.relative_to(folder)), "")
    set_tags(uri, run_id, {f"unislim.checkpoint.{name}": str(folder / rel) for rel, name in checkpoints.items() if name})
    upload = {rel for rel, name in checkpoints.items()
              if log_checkpoints == "all" or (log_checkpoints == "final" and name == "checkpoint")}
    client = MlflowClient(uri)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder)
        inside = next((c for c in checkpoints if c == "." or Path(c) in rel.parents), None)
        if inside is not None and inside not in upload and path.name not in ("config.json", "unislim.json"):
            continue  # weights stay in the runs dir
        if inside is None and path.stat().st_size > SMALL_FILE:
            continue
        client.log_artifact(run_id, str(path), str(rel.parent) if str(rel.parent) != "." else None)


def end_run(uri: str, run_id: str, ok: bool = True, status: str | None = None, reason: str | None = None) -> None:
    """End a run FINISHED (ok) or FAILED, or with `status` (KILLED); `reason` goes in a tag."""
    status = status or ("FINISHED" if ok else "FAILED")
    client = MlflowClient(uri)
    if reason:
        set_tags(uri, run_id, {END_REASON_TAG: reason})
    _retry_locked(lambda: client.set_terminated(run_id, status))


def running_descendants(uri: str, run_ids: list[str], experiment_ids: list[str]) -> list[Any]:
    """The runs still RUNNING below `run_ids` (children, grandchildren: search trials), any depth."""
    client, found, frontier = MlflowClient(uri), [], list(run_ids)
    while frontier and experiment_ids:
        parent = frontier.pop()
        runs = _retry_locked(lambda: client.search_runs(
            experiment_ids, f"attributes.status = 'RUNNING' and tags.`{PARENT_TAG}` = '{parent}'", max_results=5000))
        found += runs
        frontier += [r.info.run_id for r in runs]
    return found


def close_running(uri: str, parent_run_id: str, experiment_id: str, status: str, reason: str) -> list[str]:
    """End every run still RUNNING below `parent_run_id` with `status`; return their names.

    The driver's last word on its own tree: a stage task force-cancelled or killed with its worker
    never got to end its run."""
    closed = []
    for run in running_descendants(uri, [parent_run_id], [experiment_id]):
        end_run(uri, run.info.run_id, status=status, reason=reason)
        closed.append(run.info.run_name or run.info.run_id)
    return closed


# ---------------------------------------------------------------------------------------------
# Who is alive: a lock file per driver


class DriverLock:
    """`<runs-dir>/.unislim/drivers/<id>.lock`, held (flock) by a driver for as long as it lives.

    The lock goes with the process (SIGKILL included), and a lock file on shared storage can be
    tested from any node, where a PID means something only on its own host."""

    def __init__(self, runs_dir: Path):
        from filelock import FileLock

        self.runs_dir = Path(runs_dir)
        self.rel = f".unislim/drivers/{uuid.uuid4().hex[:12]}.lock"
        (self.runs_dir / self.rel).parent.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(self.runs_dir / self.rel)
        self._lock.acquire(timeout=0)
        self.tags = {RUNS_DIR_TAG: str(self.runs_dir), LOCK_TAG: self.rel,
                     DRIVER_TAG: f"pid {os.getpid()} on {socket.gethostname()}"}

    @property
    def path(self) -> Path:
        return self.runs_dir / self.rel

    def release(self) -> None:
        self._lock.release()
        try:
            self.path.unlink()
        except OSError:
            pass


def _lock_is_free(path: Path) -> bool:
    """True if nobody holds the lock file `path` (or it is gone): its driver is dead."""
    from filelock import FileLock, Timeout

    if not path.exists():
        return True
    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return False
    except OSError:
        return False  # cannot tell (read-only): assume alive
    lock.release()
    return True


def mark_dead_runs(uri: str, runs_dir: Path, by: str) -> list[str]:
    """Mark KILLED the runs of this runs dir left RUNNING by drivers that died; return their names.

    A run counts only if it names this runs dir and a driver lock (runs from before the lock
    existed, or of another runs dir sharing the tracking server, are left alone); its RUNNING
    descendants (stage runs, search trials) are marked with it."""
    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in _retry_locked(lambda: client.search_experiments())]
    if not experiments:
        return []
    running = _retry_locked(lambda: client.search_runs(experiments, "attributes.status = 'RUNNING'",
                                                        max_results=5000))
    alive: dict[str, bool] = {}
    dead = []
    for run in running:
        tags = run.data.tags
        if tags.get(RUNS_DIR_TAG) != str(runs_dir) or not tags.get(LOCK_TAG):
            continue
        rel = tags[LOCK_TAG]
        if rel not in alive:
            alive[rel] = not _lock_is_free(Path(runs_dir) / rel)
        if not alive[rel]:
            dead.append(run)
    dead += [r for r in running_descendants(uri, [r.info.run_id for r in dead], experiments)
             if r.info.run_id not in {d.info.run_id for d in dead}]
    when = time.strftime("%Y-%m-%d %H:%M:%S")
    names = []
    for run in dead:
        driver = run.data.tags.get(DRIVER_TAG, "its driver")
        end_run(uri, run.info.run_id, status="KILLED",
                reason=f"left RUNNING by a driver that died ({driver}); marked KILLED by run {by} at {when}")
        names.append(run.info.run_name or run.info.run_id)
    for rel, is_alive in alive.items():
        if not is_alive:
            try:
                (Path(runs_dir) / rel).unlink()
            except OSError:
                pass
    return names


def run_url(uri: str, experiment_id: str, run_id: str, ui: str = "http://127.0.0.1:5000") -> str:
    base = uri.rstrip("/") if uri.startswith("http") else ui
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


def browse_hint(uri: str, experiment_id: str, run_id: str, runs_dir: Path) -> str:
    """Where to look at a run: the tracking server's own page, or the UI over a local store."""
    url = run_url(uri, experiment_id, run_id)
    if uri.lower().startswith(("http://", "https://")):
        return f"browse: {url}"
    if uri.lower().startswith("sqlite:///") and _sqlite_path(uri) == Path(runs_dir) / "mlflow.db":
        return f"browse: `unislim ui --runs-dir {runs_dir}` (or `make ui` for ./runs), then {url}"
    return f"browse: `mlflow ui --backend-store-uri {uri}`, then {url}"
