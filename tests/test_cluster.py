"""cluster/: the shipped manifests hold together, and `ray job submit` runs the pipeline on a
`ray start --head` cluster with token authentication, logging the MLflow run tree.

The end-to-end test starts its own head node (own temp dir, own ports, own token in a temp file,
never ~/.ray) and stops it by PID: the processes whose command line or open files mention its temp
dir, and their children. It never uses the session's `ray_cluster` fixture, and never runs `ray stop`.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import psutil
import pytest
import yaml

from tests.conftest import REPO, tiny_pipeline

CLUSTER = REPO / "cluster"
BIN = Path(sys.executable).parent  # the venv's bin: ray, unislim
ENTRYPOINT = "unislim run pipeline.yaml --runs-dir /mnt/shared/runs --tracking-uri http://mlflow:5000"


# ---------------------------------------------------------------------------------------------
# The manifests (fast)


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((CLUSTER / name).read_text()) if d]


def test_rayjob_runs_the_pipeline_on_gpu_workers_with_token_auth():
    from unislim.config import load_config

    all_docs = _docs("rayjob.yaml")
    docs = {d["kind"]: d for d in all_docs}
    job = docs["RayJob"]
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert spec["entrypoint"] == ENTRYPOINT
    assert spec["shutdownAfterJobFinishes"] is True
    assert "working_dir" not in yaml.safe_load(spec["runtimeEnvYAML"])
    cluster = spec["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token"
    workers = cluster["workerGroupSpecs"][0]["template"]["spec"]
    assert workers["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    # every Ray pod mounts the shared runs volume where the entrypoint writes
    for pod in (cluster["headGroupSpec"]["template"]["spec"], workers):
        mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
        claim = next(v for v in pod["volumes"] if v["name"] == mounts["/mnt/shared"])
        assert claim["persistentVolumeClaim"]["claimName"] == "unislim-runs"
    runs_claim = next(d for d in all_docs if d["kind"] == "PersistentVolumeClaim"
                      and d["metadata"]["name"] == "unislim-runs")
    assert runs_claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert docs["Service"]["metadata"]["name"] == "mlflow"
    # the pipeline file the job runs is a valid one
    cfg = load_config(data=yaml.safe_load(docs["ConfigMap"]["data"]["pipeline.yaml"]))
    assert cfg.pretrain.use_gpu and cfg.pretrain.batch_size % cfg.pretrain.num_workers == 0


def test_cluster_yaml_installs_torch_before_the_project_and_is_a_valid_ray_up_config():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / "cluster.yaml").read_text())
    validate_config(prepare_config(config))
    setup = config["setup_commands"]
    torch_at = next(i for i, c in enumerate(setup) if "torch==2.13.0" in c)
    project_at = next(i for i, c in enumerate(setup) if "pip install -e ~/unislim" in c)
    assert torch_at < project_at
    assert config["file_mounts"]["~/unislim"] == "."
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)


def test_runtime_env_ships_the_pipeline_files_but_not_runs_venv_git_or_the_package():
    from ray._private.runtime_env.packaging import _zip_files  # what `ray job submit` uploads

    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    assert env["working_dir"] == "."
    assert not any("AUTH_TOKEN" in k for k in env.get("env_vars", {}))
    with tempfile.TemporaryDirectory() as tmp:
        cwd = os.getcwd()
        os.chdir(REPO)
        try:
            _zip_files(env["working_dir"], env["excludes"], f"{tmp}/wd.zip", include_gitignore=True)
        finally:
            os.chdir(cwd)
        names = zipfile.ZipFile(f"{tmp}/wd.zip").namelist()
    assert "pipeline.yaml" in names and "cluster/runtime_env.yaml" in names
    for prefix in ("runs/", ".venv/", ".git/", "unislim/", "pipelines/", "stages/", "modeling/"):
        assert not any(n.startswith(prefix) for n in names), prefix


# ---------------------------------------------------------------------------------------------
# A real head node and `ray job submit` (slow)


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _head_processes(root: str) -> list[psutil.Process]:
    """The live processes of the head node kept under `root`, and their descendants.

    Found by command line (gcs_server, raylet, dashboard, the job's driver) or by an open file
    under `root`: Ray's agents and workers rename themselves `ray::...` but keep their logs there.
    """
    found: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["cmdline"]):
        if p.pid == os.getpid():
            continue
        try:
            if (any(root in part for part in p.info["cmdline"] or [])
                    or any(f.path.startswith(root) for f in p.open_files())):
                found[p.pid] = p
                found.update((c.pid, c) for c in p.children(recursive=True))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    alive = []
    for p in found.values():
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


def _stop_head(root: str) -> None:
    """SIGTERM, then SIGKILL, every process of the head node kept under `root` (never `ray stop`)."""
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        procs = _head_processes(root)
        if not procs:
            return
        for p in procs:
            try:
                p.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=grace)


def _http(url: str, token: str | None = None, timeout: float = 10) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_ray_job_submit_runs_the_pipeline_on_a_token_protected_head(tiny_run):
    # Everything lives under one short folder: Ray's unix socket paths must stay < 107 chars, and
    # every process of this head can be found by it (see `_head_processes`).
    root = tempfile.mkdtemp(prefix="/tmp/ray-t-")
    token_file = Path(root) / "auth_token"
    token = secrets.token_hex(32)
    token_file.write_text(token)
    token_file.chmod(0o600)
    (Path(root) / "job").mkdir()
    pipeline = Path(root) / "job" / "tiny.yaml"
    pipeline.write_text(yaml.safe_dump(tiny_pipeline()))
    runs = Path(root) / "runs"
    shutil.copytree(tiny_run[0], runs)  # the session's tiny run: the job reruns evaluate, the rest is cached

    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "MLFLOW_TRACKING_URI")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file), RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", PYTHONUNBUFFERED="1")
    gcs, dashboard, client, agent_http, agent_grpc, runtime_env_agent, metrics, node_manager, object_manager = (
        _free_ports(9))
    start = [
        str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--temp-dir", f"{root}/ray",
        "--port", str(gcs), "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
        "--dashboard-port", str(dashboard), "--ray-client-server-port", str(client),
        "--dashboard-agent-listen-port", str(agent_http), "--dashboard-agent-grpc-port", str(agent_grpc),
        "--runtime-env-agent-port", str(runtime_env_agent), "--metrics-export-port", str(metrics),
        "--node-manager-port", str(node_manager), "--object-manager-port", str(object_manager),
        "--num-cpus", "2", "--num-gpus", "0", "--object-store-memory", str(200 * 1024**2),
        "--disable-usage-stats",
    ]
    address = f"http://127.0.0.1:{dashboard}"
    job_id = f"unislim-test-{secrets.token_hex(4)}"
    try:
        proc = subprocess.run(start, env=env, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stdout + proc.stderr

        # The job API is the dashboard's; without the token it refuses, with a wrong one too.
        deadline = time.time() + 60
        while _http(f"{address}/api/version", token)[0] != 200:
            assert time.time() < deadline, "the dashboard never answered"
            time.sleep(1)
        assert _http(f"{address}/api/jobs/")[0] == 401
        assert _http(f"{address}/api/jobs/", "0" * 64)[0] == 403

        submit = subprocess.run(
            [str(BIN / "ray"), "job", "submit", "--address", address, "--submission-id", job_id,
             "--runtime-env", str(CLUSTER / "runtime_env.yaml"), "--no-wait", "--",
             "unislim", "run", str(pipeline), "--only", "evaluate", "--force", "evaluate", "--runs-dir", str(runs)],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert submit.returncode == 0, submit.stdout + submit.stderr

        deadline, status = time.time() + 300, None
        while time.time() < deadline:
            code, body = _http(f"{address}/api/jobs/{job_id}", token)
            assert code == 200, body
            status = json.loads(body)["status"]
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                break
            time.sleep(3)
        if status != "SUCCEEDED":
            logs = json.loads(_http(f"{address}/api/jobs/{job_id}/logs", token)[1]).get("logs", "")
            pytest.fail(f"job {job_id} ended {status}:\n{logs[-20000:]}")

        _assert_run_tree(runs)
    finally:
        _stop_head(root)
        survivors = [p.pid for p in _head_processes(root)]
        shutil.rmtree(root, ignore_errors=True)
    assert not survivors, survivors


def _assert_run_tree(runs: Path) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(tiny_pipeline()["experiment"])
    assert experiment is not None
    all_runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in all_runs if "mlflow.parentRunId" not in r.data.tags]
    parent = max(parents, key=lambda r: r.info.start_time)  # the job's (the copied run's came first)
    assert parent.info.status == "FINISHED"
    children = {r.data.tags.get("unislim.stage"): r for r in all_runs
                if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert {"pretrain", "evaluate"} <= set(children), sorted(children)
    assert all(r.info.status == "FINISHED" for r in children.values())
    assert children["evaluate"].data.tags.get("unislim.cached") == "false"  # forced: it ran in the job
    assert "mme/overall" in children["evaluate"].data.metrics
