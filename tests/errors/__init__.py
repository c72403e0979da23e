"""Bad input, one family per file: what every case asserts lives here.

`refused(...)` is the contract of issue 14 for an input error: exit code 2, the message names the
input, one line, no traceback, nothing under the runs dir that looks complete, and no MLflow run
left RUNNING in the runs dir's store.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from unislim.cli import main

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Result:
    rc: int
    out: str
    err: str
    elapsed_s: float = 0.0


def cli(capsys, *argv: str) -> Result:
    """`unislim ARGV` in this process (argparse's own errors exit via SystemExit)."""
    capsys.readouterr()
    t0 = time.monotonic()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    captured = capsys.readouterr()
    return Result(rc, captured.out, captured.err, time.monotonic() - t0)


def cli_process(*argv: str, timeout: float = 120, cwd: Path | None = None, env: dict | None = None) -> Result:
    """`unislim ARGV` as a user runs it: a fresh interpreter, stdout and stderr as printed."""
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "unislim.cli", *map(str, argv)], capture_output=True, text=True,
                          check=False, timeout=timeout, cwd=cwd or REPO, env={**os.environ, **(env or {})})
    return Result(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - t0)


def refused(r: Result, *names: str, runs_dir: Path | None = None, command: str | None = None) -> str:
    """Assert the contract for a refused input; return the error line."""
    assert r.rc == 2, f"exit {r.rc}\nstdout: {r.out}\nstderr: {r.err}"
    assert "Traceback" not in r.out + r.err, r.err
    lines = [ln for ln in r.err.splitlines() if ln.startswith("unislim")]
    assert len(lines) == 1, r.err
    line = lines[0]
    if command:
        assert line.startswith(f"unislim {command}: "), line
    detail = r.err  # a config with several problems lists them on the lines after
    for name in names:
        assert name in detail, f"{name!r} not named in: {r.err}"
    if runs_dir is not None:
        assert_nothing_complete(runs_dir)
        assert_no_running_mlflow_run(runs_dir)
    return line


def assert_nothing_complete(runs_dir: Path) -> None:
    """No stage output under `runs_dir` claims to be complete."""
    for manifest in Path(runs_dir).rglob("manifest.json"):
        assert not json.loads(manifest.read_text()).get("complete"), manifest


def assert_no_running_mlflow_run(runs_dir: Path) -> None:
    """The runs dir's own MLflow store (if a run got that far) holds no run still RUNNING."""
    db = Path(runs_dir) / "mlflow.db"
    if not db.exists():
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    running = client.search_runs(experiments, "attributes.status = 'RUNNING'") if experiments else []
    assert not running, [r.info.run_id for r in running]


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return path


# A valid pipeline that never needs data from disk: the tiny reference model, a few steps.
TINY = (
    "name: errors\nexperiment: unislim-errors\n"
    "model: {source: reference, size: tiny}\n"
    "pretrain: {steps: 4, batch_size: 4, warmup_steps: 1, checkpoint_every: 2, log_every: 2, num_workers: 1}\n"
    "shard: {n: 2, rows_per_file: 2}\n"
    "score: {num_workers: 1, batch_size: 2, gen_steps: 1, step_buckets: 1}\n"
    "evaluate: {n_und: 1, n_gen: 1, steps: 1}\n"
)
