"""A driver SIGKILLed during `score` and again during `adapt`, then a rerun: the rerun completes,
adapt resumes from its last checkpoint, the dead drivers' runs are marked KILLED, and two forced
`score` runs give the same bytes (so nothing downstream of score reruns).

Starts from a copy of the session's tiny run (pretrain, shard, score, prune done); partition and
adapt (its MoE phase only) are added; their training rows fit in what pretrain already read, so
shard's key holds.
Each driver is a subprocess joining the session's Ray cluster.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import REPO, tiny_pipeline
from unislim.pipelines.store import load_complete

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

PARTITION = {"enabled": True, "layers": [0, 1], "num_experts": 8, "num_shared": 2, "active_fraction": 0.5,
             "impl": "loop"}
ADAPT = {"enabled": True, "eft_steps": 0, "moe_steps": 16, "batch_size": 8, "num_workers": 1, "warmup_steps": 1,
         "checkpoint_every": 4, "log_every": 2}


def _start(config: Path, runs: Path, address: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "unislim.cli", "run", str(config), "--runs-dir", str(runs),
                             "--address", address, "--force", "score"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            env={**os.environ, "RAY_DEDUP_LOGS": "0", "PYTHONUNBUFFERED": "1"})


def _kill_when(proc: subprocess.Popen, stage: str, text: str, timeout: float = 1200) -> str:
    """SIGKILL the driver (only the driver: its stage tasks live in the cluster) once `[stage] … text`."""
    seen, deadline = [], time.time() + timeout
    try:
        for line in proc.stdout:
            seen.append(line)
            if f"[{stage}]" in line and text in line:
                return "".join(seen)
            assert time.time() < deadline, "".join(seen[-30:])
        pytest.fail("the run ended before the kill:\n" + "".join(seen[-40:]))
    finally:
        proc.kill()
        proc.wait()


def _score_bytes(runs: Path) -> dict[str, str]:
    (folder,) = [p for p in (runs / "score").iterdir() if load_complete(p)]
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "manifest.json"}


def _status_lines(out: str) -> dict[str, str]:
    table = out[out.rindex("\nstage "):].splitlines()[2:]
    return {cells[0]: cells[1] for cells in (line.split() for line in table) if len(cells) >= 2 and
            cells[1] in ("ran", "cached", "failed", "upstream-failed", "killed", "not-run")}


def test_sigkill_during_score_and_adapt_then_a_rerun(tiny_run, ray_cluster, tmp_path):
    runs = Path(shutil.copytree(tiny_run[0], tmp_path / "runs"))
    original = _score_bytes(runs)
    config = tmp_path / "p.yaml"
    config.write_text(yaml.safe_dump(tiny_pipeline(partition=PARTITION, adapt=ADAPT, evaluate={"enabled": False})))

    _kill_when(_start(config, runs, ray_cluster), "score", "rows over")  # 1: dies while scoring
    second = _kill_when(_start(config, runs, ray_cluster), "adapt", "moe step 10/16")  # 2: dies in adapt
    assert "[score] done in" in second  # run 2 scored again (forced) before adapt
    assert not [p for p in (runs / "adapt").iterdir() if load_complete(p)]  # nothing half-done looks complete
    forced_once = _score_bytes(runs)

    rerun = subprocess.run([sys.executable, "-m", "unislim.cli", "run", str(config), "--runs-dir", str(runs),
                            "--address", ray_cluster, "--force", "score"], capture_output=True, text=True,
                           cwd=REPO, timeout=1500)
    out = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, out[-4000:]
    assert "Traceback" not in out
    statuses = _status_lines(rerun.stdout)
    assert statuses["score"] == "ran" and statuses["partition"] == "cached" and statuses["adapt"] == "ran", statuses

    # two forced score runs (2 and 3), and the session's first: the same bytes, file by file
    assert _score_bytes(runs) == forced_once == original

    (adapted,) = [p for p in (runs / "adapt").iterdir() if load_complete(p)]
    log = json.loads((adapted / "history.json").read_text())
    # Killed after step 10 was logged: the last checkpoint is 8, or 4 when Ray Train's controller had not yet
    # registered 8 (it does on its next poll, seconds later on a loaded machine), or 12 when the workers
    # outlived their driver long enough. Never a restart from step 0.
    (resumed,) = log["resumed_from"]["moe"]
    assert resumed in (4, 8, 12), log["resumed_from"]
    assert [e["step"] for e in log["history"]["moe"]] == list(range(2, 17, 2))

    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    runs_ = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=5000)
    parents = sorted((r for r in runs_ if "mlflow.parentRunId" not in r.data.tags), key=lambda r: r.info.start_time)
    first, killed_in_adapt, last = parents[-3:]
    children = {p.info.run_id: {r.data.tags.get("unislim.stage"): r for r in runs_
                                if r.data.tags.get("mlflow.parentRunId") == p.info.run_id} for p in parents[-3:]}
    assert first.info.status == killed_in_adapt.info.status == "KILLED" and last.info.status == "FINISHED"
    assert children[first.info.run_id]["score"].info.status == "KILLED"
    assert children[killed_in_adapt.info.run_id]["adapt"].info.status == "KILLED"
    reasons = [r.data.tags.get("unislim.end_reason", "") for r in (first, killed_in_adapt)]
    assert all("left RUNNING by a driver that died" in r for r in reasons), reasons
    assert last.info.run_id in reasons[1]  # the rerun marked the adapt run's driver
    assert "marked" in rerun.stdout and "left RUNNING by a driver that died as KILLED" in rerun.stdout
    assert not [r.info.run_id for r in runs_ if r.info.status == "RUNNING"]
    assert not list((runs / "adapt").glob(".tmp-*")) and not list((runs / "score").glob(".tmp-*"))
