"""`unislim ui` (what `make ui` runs): the MLflow UI over a runs dir shows the pipeline's run tree
and each stage's files, and listens on 127.0.0.1 only."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import psutil
import pytest

UNISLIM = Path(sys.executable).parent / "unislim"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(base: str, endpoint: str, **params) -> dict:
    url = f"{base}{endpoint}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def _post(base: str, endpoint: str, body: dict) -> dict:
    request = urllib.request.Request(f"{base}{endpoint}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _artifact_paths(base: str, run_id: str, path: str | None = None) -> set[str]:
    """Every file path under `path` of the run's artifacts, through the server's REST API."""
    listing = _get(base, "/api/2.0/mlflow/artifacts/list", run_id=run_id, **({"path": path} if path else {}))
    out = set()
    for entry in listing.get("files", []):
        out |= _artifact_paths(base, run_id, entry["path"]) if entry["is_dir"] else {entry["path"]}
    return out


def _group(pgid: int) -> list[psutil.Process]:
    procs = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                procs.append(p)
        except (psutil.NoSuchProcess, ProcessLookupError):
            pass
    return procs


def _wait_until_up(base: str, server: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert server.poll() is None, f"`unislim ui` exited {server.returncode}:\n{log.read_text()[-5000:]}"
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1)
    pytest.fail(f"`unislim ui` did not answer within {timeout}s:\n{log.read_text()[-5000:]}")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ui_shows_the_run_tree_and_stage_files_on_loopback_only(tiny_run, tmp_path):
    runs, result = tiny_run
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "ui.log"
    with open(log, "w") as out:
        server = subprocess.Popen([str(UNISLIM), "ui", "--runs-dir", str(runs), "--port", str(port)],
                                  stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_until_up(base, server, log)

        # Loopback only: every listening socket on the port is bound to 127.0.0.1.
        group = _group(server.pid)
        listening = {(c.laddr.ip, c.laddr.port) for p in group for c in p.net_connections("inet")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == port}
        assert listening == {("127.0.0.1", port)}, listening

        # The run tree: the pipeline's parent run, a child run per stage.
        runs_found = _post(base, "/api/2.0/mlflow/runs/search",
                           {"experiment_ids": [result.experiment_id], "max_results": 1000})["runs"]
        by_id = {r["info"]["run_id"]: r for r in runs_found}
        assert result.run_id in by_id, sorted(by_id)

        def tags(run):
            return {t["key"]: t["value"] for t in run["data"].get("tags", [])}

        children = {tags(r).get("unislim.stage"): r["info"]["run_id"] for r in runs_found
                    if tags(r).get("mlflow.parentRunId") == result.run_id}
        assert {"pretrain", "evaluate"} <= set(children), children
        assert "mlflow.parentRunId" not in tags(by_id[result.run_id])

        # Each stage's files, as the UI's artifact browser lists them.
        evaluate_files = _artifact_paths(base, children["evaluate"])
        assert "metrics.json" in evaluate_files, sorted(evaluate_files)
        pretrain_files = _artifact_paths(base, children["pretrain"])
        assert "checkpoint/config.json" in pretrain_files, sorted(pretrain_files)
        query = urllib.parse.urlencode({"run_uuid": children["evaluate"], "path": "metrics.json"})
        with urllib.request.urlopen(f"{base}/get-artifact?{query}", timeout=30) as response:
            metrics = json.loads(response.read())
        assert 0.0 <= metrics["mme/overall"] <= 1.0

        # The UI page itself is served.
        with urllib.request.urlopen(f"{base}/", timeout=30) as response:
            assert response.status == 200 and b"<html" in response.read().lower()
    finally:
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            procs = _group(server.pid)
            if not procs:
                break
            try:
                os.killpg(server.pid, sig)
            except ProcessLookupError:
                break
            psutil.wait_procs(procs, timeout=grace)
        server.wait(timeout=10)
    assert not _group(server.pid)
