"""The MLflow run tree: one parent run per pipeline run, one child run per stage.

Only the driver and the stage driver tasks call this module (through `StageContext` for live
metrics); `modeling/` and the stages themselves never import MLflow. Everything goes through an
explicit `MlflowClient(tracking_uri)` and run ids, never the fluent global "active run", so it is
safe from any process of the Ray job.
"""

from __future__ import annotations

import math
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from unislim.errors import StorageError

PARENT_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"
_BATCH = 100  # MLflow's per-request limit on params / metrics


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


def ensure_experiment(uri: str, name: str, runs_dir: Path) -> str:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = (Path(runs_dir).resolve() / "artifacts").as_uri() if is_local_store(uri) else None
    # the UI opens a model-training experiment in its training view, not the GenAI one
    return client.create_experiment(name, artifact_location=location,
                                    tags={"mlflow.experimentKind": "custom_model_development"})


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
    run = client.create_run(experiment_id, run_name=name, tags=tags)
    log_params(uri, run.info.run_id, params or {})
    return run.info.run_id


def log_params(uri: str, run_id: str, params: dict[str, Any]) -> None:
    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    client = MlflowClient(uri)
    for i in range(0, len(items), _BATCH):
        client.log_batch(run_id, params=items[i:i + _BATCH])


def log_metrics(uri: str, run_id: str, metrics: dict[str, Any], step: int | None = None) -> None:
    """Log the numeric entries of `metrics` (others are skipped)."""
    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    client = MlflowClient(uri)
    for i in range(0, len(items), _BATCH):
        client.log_batch(run_id, metrics=items[i:i + _BATCH])


def set_tags(uri: str, run_id: str, tags: dict[str, str]) -> None:
    MlflowClient(uri).log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


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


def end_run(uri: str, run_id: str, ok: bool) -> None:
    MlflowClient(uri).set_terminated(run_id, "FINISHED" if ok else "FAILED")


def run_url(uri: str, experiment_id: str, run_id: str, ui: str = "http://127.0.0.1:5000") -> str:
    base = uri.rstrip("/") if uri.startswith("http") else ui
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"
