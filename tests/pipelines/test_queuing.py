"""A Ray Train stage that queues for CPUs longer than Ray Train's own 60 s startup timeout prints one
"waiting for …" line and one when its workers start, and no WorkerGroupStartupTimeoutError."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, tiny_pipeline

pytestmark = [pytest.mark.slow, pytest.mark.cluster]
HOLD_S = 70  # > RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S's default of 60 s


@pytest.mark.timeout(1200)
def test_a_queued_training_stage_says_so_once(tiny_run, ray_cluster, tmp_path):
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    runs = Path(shutil.copytree(tiny_run[0], tmp_path / "runs"))
    config = tmp_path / "p.yaml"
    config.write_text(yaml.safe_dump(tiny_pipeline(pretrain={"cpus_per_worker": 2})))  # all of the cluster's CPUs
    held = placement_group([{"CPU": 1}])  # another stage's CPU, as it were
    ray.get(held.ready(), timeout=120)
    proc = subprocess.Popen([sys.executable, "-m", "unislim.cli", "run", str(config), "--runs-dir", str(runs),
                             "--address", ray_cluster, "--only", "pretrain"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            env={**os.environ, "RAY_DEDUP_LOGS": "0", "PYTHONUNBUFFERED": "1"})
    freed = threading.Event()

    def free() -> None:
        if not freed.is_set():
            freed.set()
            remove_placement_group(held)

    seen, since = [], None
    release, watchdog = threading.Timer(HOLD_S, free), threading.Timer(600, free)  # never a hang
    watchdog.start()
    try:
        for line in proc.stdout:
            seen.append(line)
            if since is None and "[pretrain] waiting for 2 CPU for 1 Ray Train worker(s)" in line:
                since = time.time()
                release.start()  # the CPU comes back after Ray Train's own timeout would have fired
        proc.wait(timeout=900)
    finally:
        release.cancel()
        watchdog.cancel()
        free()
        if proc.poll() is None:
            proc.kill()
    out = "".join(seen)
    assert proc.returncode == 0 and since is not None, out[-4000:]
    assert out.count("waiting for 2 CPU") == 1 and "[pretrain] workers placed after waiting" in out, out[-4000:]
    assert "WorkerGroupStartupTimeoutError" not in out and "Traceback" not in out, out[-4000:]
