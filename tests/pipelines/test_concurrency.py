"""Two `unislim run` on one runs dir at once (its sqlite MLflow store included), both joining the
session's Ray cluster: both finish, the stage they share is computed once (the second waits for the
first, then reuses its output), nothing is clobbered, no sqlite "database is locked" crash."""

from __future__ import annotations

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


def test_two_runs_at_once_on_one_runs_dir(tiny_run, ray_cluster, tmp_path):
    runs = Path(shutil.copytree(tiny_run[0], tmp_path / "runs"))
    config = tmp_path / "p.yaml"
    config.write_text(yaml.safe_dump(tiny_pipeline(evaluate={"steps": 3})))  # a new evaluate key, the rest cached
    cmd = [sys.executable, "-m", "unislim.cli", "run", str(config), "--runs-dir", str(runs), "--address", ray_cluster,
           "--only", "evaluate"]
    env = {**os.environ, "RAY_DEDUP_LOGS": "0", "PYTHONUNBUFFERED": "1"}
    t0 = time.time()
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, env=env)
             for _ in range(2)]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    elapsed = time.time() - t0
    assert [p.returncode for p in procs] == [0, 0], "\n=====\n".join(o[-3000:] for o in outs)
    both = "\n".join(outs)
    assert "database is locked" not in both and "Traceback" not in both, both[-5000:]
    ran = [o for o in outs if "[evaluate] done in" in o]
    waited = [o for o in outs if "[evaluate] waiting: another run (pid" in o]
    assert len(ran) == 1 and len(waited) == 1 and waited[0] is not ran[0], both[-5000:]
    assert "[evaluate] cached:" in waited[0]

    done = [p for p in (runs / "evaluate").iterdir() if load_complete(p)]
    assert len(done) == 2  # the session's key and the new one, once
    assert not [p.name for p in (runs / "evaluate").iterdir() if p.name.startswith((".tmp-", ".old-"))]
    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    every = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=5000)
    parents = sorted((r for r in every if "mlflow.parentRunId" not in r.data.tags), key=lambda r: r.info.start_time)
    assert [p.info.status for p in parents[-2:]] == ["FINISHED", "FINISHED"]
    evaluate = [r for r in every if r.data.tags.get("unislim.stage") == "evaluate"
                and r.data.tags.get("mlflow.parentRunId") in {p.info.run_id for p in parents[-2:]}]
    assert sorted(r.data.tags["unislim.cached"] for r in evaluate) == ["false", "true"]
    computed = next(r for r in evaluate if r.data.tags["unislim.cached"] == "false")
    reused = next(r for r in evaluate if r.data.tags["unislim.cached"] == "true")
    assert reused.data.tags["unislim.source_run_id"] == computed.info.run_id  # it names whose output it reused
    assert not [r.info.run_id for r in every if r.info.status == "RUNNING"]
    print(f"two runs at once: {elapsed:.0f}s")
