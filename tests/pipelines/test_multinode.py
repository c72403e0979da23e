"""Two Ray nodes on this machine (a head and a node that joins it, each with its own temp dir) and
an MLflow server on 127.0.0.1, run as cluster/README.md tells users to: a local store is refused
while the cluster can autoscale and once a second node is there; with the server the pipeline runs,
the driver on the head and the stages that compute on the joined node, and the summary points at the
server. The head has no CPU (as a head often is), so the CPU-holding stages must run on the other
node: with a CPU each, two short evaluate stages raced the joined node's worker start and both ran
on the head, one after the other (2026-12-01).

Everything this test starts lives under one short temp folder and is stopped by PID (never
`ray stop`). It never uses the session's Ray cluster.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, tiny_pipeline
from tests.test_cluster import _free_ports, _head_processes, _stop_head

pytestmark = [pytest.mark.slow, pytest.mark.cluster]
BIN = Path(sys.executable).parent

# Writes a v2 autoscaler's cluster config (a GPU group that may grow from 0 to 4 nodes) into the
# head's key-value store, as KubeRay / `ray up` with the v2 autoscaler do; an empty argv[2] deletes it.
_AUTOSCALER = """
import sys, ray, ray._raylet as r
from ray.core.generated import autoscaler_pb2 as a
from ray.experimental import internal_kv
ray.init(address=sys.argv[1], log_to_driver=False)
ns, key = r.GCS_AUTOSCALER_STATE_NAMESPACE, r.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY
if sys.argv[2]:
    config = a.ClusterConfig(node_group_configs=[a.NodeGroupConfig(name="ray.worker.gpu", min_count=0, max_count=4,
                                                                    resources={"GPU": 1})])
    internal_kv._internal_kv_put(key, config.SerializeToString(), overwrite=True, namespace=ns)
else:
    internal_kv._internal_kv_del(key, namespace=ns)
print("nodes", len([n for n in ray.nodes() if n["Alive"]]))
"""


_CPU_NODES = """
import sys, ray
ray.init(address=sys.argv[1], log_to_driver=False)
print(*[n["NodeID"][:8] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU")])
"""


def _ray_start(root: str, name: str, env: dict, *args: str, cpus: int = 1) -> None:
    ports = _free_ports(6)
    cmd = [str(BIN / "ray"), "start", "--node-ip-address", "127.0.0.1", "--temp-dir", f"{root}/{name}",
           "--num-cpus", str(cpus), "--num-gpus", "0", "--object-store-memory", str(150 * 1024**2),
           "--node-manager-port", str(ports[0]), "--object-manager-port", str(ports[1]),
           "--dashboard-agent-listen-port", str(ports[2]), "--dashboard-agent-grpc-port", str(ports[3]),
           "--runtime-env-agent-port", str(ports[4]), "--metrics-export-port", str(ports[5]), "--disable-usage-stats",
           *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def _unislim(env: dict, *argv: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "unislim.cli", *map(str, argv)], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=timeout)


@pytest.mark.timeout(1200)
def test_a_two_node_cluster_with_an_mlflow_server(tiny_run):
    root = tempfile.mkdtemp(prefix="/tmp/ray-m-")  # short: Ray's socket paths must stay < 107 chars
    token = Path(root) / "auth_token"
    token.write_text(os.urandom(32).hex())
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "MLFLOW_TRACKING_URI")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", PYTHONUNBUFFERED="1", RAY_DEDUP_LOGS="0")
    gcs, dashboard, client, mlflow_port = _free_ports(4)
    address = f"127.0.0.1:{gcs}"
    server = f"http://127.0.0.1:{mlflow_port}"
    runs = Path(shutil.copytree(tiny_run[0], Path(root) / "runs"))
    config = Path(root) / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_pipeline(evaluate={"steps": 3})))  # evaluate and evaluate-prune rerun
    mlflow = None
    timings = {}
    try:
        t0 = time.time()
        _ray_start(root, "head", env, "--head", "--port", str(gcs), "--include-dashboard", "true",
                   "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
                   "--ray-client-server-port", str(client), cpus=0)
        timings["head_s"] = time.time() - t0
        mlflow = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--artifacts-destination", f"{root}/artifacts"],
            env={**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True)

        # 1. one node, but an autoscaler that may add more: a local store is refused
        kv = subprocess.run([sys.executable, "-c", _AUTOSCALER, address, "put"], env=env, capture_output=True,
                            text=True, timeout=120)
        assert kv.returncode == 0 and "nodes 1" in kv.stdout, kv.stderr[-2000:]
        r = _unislim(env, "run", config, "--address", address, "--runs-dir", runs)
        assert r.returncode == 2 and "can add nodes (it has an autoscaler)" in r.stderr, r.stderr[-2000:]
        assert "Traceback" not in r.stdout + r.stderr
        subprocess.run([sys.executable, "-c", _AUTOSCALER, address, ""], env=env, check=True, capture_output=True,
                       timeout=120)

        # 2. a second node joins (its own temp dir): a local store is refused again, by node count
        t0 = time.time()
        _ray_start(root, "node2", env, "--address", address)
        timings["node_s"] = time.time() - t0
        cpu_nodes = subprocess.run([sys.executable, "-c", _CPU_NODES, address], env=env, capture_output=True,
                                   text=True, timeout=120)
        (joined,) = cpu_nodes.stdout.split()  # the joined node's id (first 8), the only one with a CPU
        r = _unislim(env, "run", config, "--address", address, "--runs-dir", runs)
        assert r.returncode == 2 and "the Ray cluster has 2 nodes" in r.stderr, r.stderr[-2000:]

        # 3. with the MLflow server, as cluster/README.md says: the pipeline runs across the nodes
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"{server}/health", timeout=5)
                break
            except OSError:
                assert time.time() < deadline, "the MLflow server never answered"
                time.sleep(2)
        t0 = time.time()
        r = _unislim(env, "run", config, "--address", address, "--runs-dir", runs, "--tracking-uri", server)
        timings["run_s"] = time.time() - t0
        out = r.stdout + r.stderr
        assert r.returncode == 0, out[-5000:]
        assert "Traceback" not in out and "database is locked" not in out
        assert f"browse: {server}/#/experiments/" in r.stdout and "make ui" not in r.stdout

        from mlflow.tracking import MlflowClient

        client_ = MlflowClient(server)
        exp = client_.get_experiment_by_name(tiny_pipeline()["experiment"])
        all_runs = client_.search_runs([exp.experiment_id])
        (parent,) = [x for x in all_runs if "mlflow.parentRunId" not in x.data.tags]
        children = {x.data.tags["unislim.stage"]: x for x in all_runs
                    if x.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
        assert parent.info.status == "FINISHED" and all(c.info.status == "FINISHED" for c in children.values())
        ran = {s: c.data.tags["unislim.node"] for s, c in children.items() if c.data.tags["unislim.cached"] == "false"}
        assert set(ran) == {"evaluate", "evaluate-prune"}, ran
        nodes = {n.split(" (")[-1].rstrip(")") for n in ran.values()}
        print(json.dumps({"timings_s": {k: round(v, 1) for k, v in timings.items()}, "stage_nodes": ran}))
        assert nodes == {f"Ray node {joined}"}, (ran, joined)  # the head has no CPU to run them
    finally:
        if mlflow is not None:
            os.killpg(mlflow.pid, signal.SIGTERM)
            try:
                mlflow.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(mlflow.pid, signal.SIGKILL)
        _stop_head(root)
        survivors = [p.pid for p in _head_processes(root)]
        shutil.rmtree(root, ignore_errors=True)
    assert not survivors, survivors
