"""The runner family: what a run leaves behind when something goes wrong while it runs.

Each case runs `unislim run` (in this process on the session's Ray cluster, or as a subprocess
joining it when it must be interrupted) and asserts the exit code, that the message names the
input, that no traceback is printed, that nothing half-done under the runs dir looks complete, and
that no MLflow run is left RUNNING. Most cases start from a copy of the session's tiny run, so only
the stage under test computes.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import tiny_pipeline
from tests.errors import REPO, assert_no_running_mlflow_run, cli, refused, write
from unislim.pipelines.store import load_complete

pytestmark = pytest.mark.slow


@pytest.fixture
def runs(tiny_run, tmp_path) -> Path:
    """A copy of the session's tiny runs dir (every stage complete and cached)."""
    return Path(shutil.copytree(tiny_run[0], tmp_path / "runs"))


def _config(tmp_path: Path, **sections) -> Path:
    return write(tmp_path / "p.yaml", yaml.safe_dump(tiny_pipeline(**sections)))


def _store(runs: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")


def _all_runs(runs: Path) -> list:
    client = _store(runs)
    return client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=5000)


def _newest_parent(runs: Path):
    parents = [r for r in _all_runs(runs) if "mlflow.parentRunId" not in r.data.tags]
    return max(parents, key=lambda r: r.info.start_time)


def _children(runs: Path, parent_id: str) -> dict:
    return {r.data.tags.get("unislim.stage"): r for r in _all_runs(runs)
            if r.data.tags.get("mlflow.parentRunId") == parent_id}


def _complete(runs: Path, stage: str) -> list[Path]:
    folder = runs / stage
    return [p for p in folder.iterdir() if load_complete(p)] if folder.is_dir() else []


def test_a_model_path_that_does_not_exist_fails_the_run_and_its_record(ray_cluster, tmp_path, capsys):
    missing = tmp_path / "no-such-checkpoint"
    config = write(tmp_path / "p.yaml", f"name: t\nexperiment: unislim-errors\nmodel: {{source: path, path: '{missing}'}}\n"
                   "pretrain: {enabled: false}\n")
    runs = tmp_path / "runs"
    refused(cli(capsys, "run", config, "--runs-dir", runs, "--offline"), "model.path", str(missing), "does not exist",
            runs_dir=runs, command="run")
    parent = _newest_parent(runs)  # no stage started: the pipeline is still not a success
    assert parent.info.status == "FAILED", parent.info.status
    assert "does not exist" in parent.data.tags["unislim.end_reason"]


def test_a_stage_that_can_never_get_its_cpus_is_refused_not_queued_forever(runs, tmp_path, capsys):
    config = _config(tmp_path, pretrain={"cpus_per_worker": 3})  # the session cluster has 2 CPUs
    r = cli(capsys, "run", config, "--runs-dir", runs, "--only", "pretrain")
    line = refused(r, "pretrain.num_workers / pretrain.cpus_per_worker", "need 3 CPU", "has 2 CPU", command="run")
    assert line.startswith("unislim run: stage pretrain: ")
    assert len(_complete(runs, "pretrain")) == 1  # only the session's output, nothing new
    assert_no_running_mlflow_run(runs)
    assert _newest_parent(runs).info.status == "FAILED"


def test_a_cached_output_with_a_missing_file_is_recomputed_with_a_message(runs, tmp_path, capsys):
    (shard,) = _complete(runs, "shard")
    victim = next(p for p in sorted(shard.rglob("*.parquet")))
    rel = victim.relative_to(shard)
    victim.unlink()
    r = cli(capsys, "run", _config(tmp_path), "--runs-dir", runs, "--only", "shard")
    assert r.rc == 0 and "Traceback" not in r.out + r.err, r.out[-2000:] + r.err[-2000:]
    assert f"cached output {shard} is damaged (1 missing (e.g. {rel})" in r.out and "recomputing" in r.out
    assert victim.exists() and load_complete(shard) is not None  # recomputed in place, same key
    children = _children(runs, _newest_parent(runs).info.run_id)
    assert children["shard"].data.tags["unislim.cached"] == "false" and children["shard"].info.status == "FINISHED"
    assert_no_running_mlflow_run(runs)


def test_mlflow_failing_after_the_commit_is_a_warning_and_the_output_stays(runs, tmp_path, capsys):
    """The experiment's artifact store is unusable (a file where its folder should be): tags and
    metrics still log, uploads fail. The output is complete, so the stage is done, with a warning."""
    blocker = write(tmp_path / "blocker", "a file, not a folder")
    client = _store(runs)
    client.create_experiment("broken-artifacts", artifact_location=(blocker / "artifacts").as_uri())
    config = write(tmp_path / "p.yaml", yaml.safe_dump({**tiny_pipeline(), "experiment": "broken-artifacts"}))
    r = cli(capsys, "run", config, "--runs-dir", runs, "--only", "shard", "--force", "shard")
    assert r.rc == 0, r.out[-3000:] + r.err[-3000:]
    assert "Traceback" not in r.out + r.err
    # the driver's summary (the stage's own "[shard] WARNING" line is Ray's log stream, which may
    # reach the driver after it returns)
    assert "warning: shard: output complete at" in r.out and "artifacts:" in r.out
    (shard,) = _complete(runs, "shard")
    parent = _newest_parent(runs)
    assert parent.info.status == "FINISHED" and "pipeline ok" in r.out
    child = _children(runs, parent.info.run_id)["shard"]
    assert child.info.status == "FAILED" and "artifacts:" in child.data.tags["unislim.log_error"]
    assert child.data.tags["unislim.output"] == str(shard)  # the tags that could be logged were
    assert "warning: the pipeline's config.yaml could not be logged" in r.out
    assert_no_running_mlflow_run(runs)


def test_runs_left_running_by_dead_drivers_are_marked_killed(runs, tmp_path, capsys):
    from unislim.pipelines import tracking

    uri = f"sqlite:///{runs / 'mlflow.db'}"
    exp = tracking.ensure_experiment(uri, "unislim-test", runs)
    lock = tracking.DriverLock(runs)  # a live driver: this process; its run must stay RUNNING
    alive = tracking.start_run(uri, exp, "alive", tags=lock.tags)
    gone = {**lock.tags, tracking.LOCK_TAG: ".unislim/drivers/gone.lock", tracking.DRIVER_TAG: "pid 1 on elsewhere"}
    dead = tracking.start_run(uri, exp, "dead", tags=gone)
    dead_child = tracking.start_run(uri, exp, "score", tags={"unislim.stage": "score"}, parent=dead)
    freed = runs / ".unislim/drivers/freed.lock"
    freed.touch()  # a lock file nobody holds: what a SIGKILLed driver leaves
    killed = tracking.start_run(uri, exp, "freed", tags={**lock.tags, tracking.LOCK_TAG: str(freed.relative_to(runs))})
    other_dir = tracking.start_run(uri, exp, "other", tags={**gone, tracking.RUNS_DIR_TAG: "/elsewhere/runs"})

    r = cli(capsys, "run", _config(tmp_path), "--runs-dir", runs, "--only", "shard")
    assert r.rc == 0 and "Traceback" not in r.out + r.err, r.err[-2000:]
    assert "marked 3 run(s) left RUNNING by a driver that died as KILLED" in r.out
    client = _store(runs)
    status = {rid: client.get_run(rid).info.status for rid in (alive, dead, dead_child, killed, other_dir)}
    assert status == {alive: "RUNNING", dead: "KILLED", dead_child: "KILLED", killed: "KILLED", other_dir: "RUNNING"}
    reason = client.get_run(dead).data.tags["unislim.end_reason"]
    assert "pid 1 on elsewhere" in reason and _newest_parent(runs).info.run_id in reason
    for rid in (alive, other_dir):
        tracking.end_run(uri, rid, ok=True)
    lock.release()
    assert_no_running_mlflow_run(runs)


def _start(config: Path, runs: Path, address: str, *flags: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "unislim.cli", "run", str(config), "--runs-dir", str(runs),
                             "--address", address, *flags], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=REPO, start_new_session=True,
                            env={**os.environ, "RAY_DEDUP_LOGS": "0", "PYTHONUNBUFFERED": "1"})


def _read_until(proc: subprocess.Popen, predicate, timeout: float) -> list[str]:
    seen, deadline = [], time.time() + timeout
    for line in proc.stdout:
        seen.append(line)
        if predicate(line):
            return seen
        if time.time() > deadline:
            break
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail("never saw the line:\n" + "".join(seen[-40:]))


def test_ctrl_c_ends_the_running_stage_and_the_pipeline_killed(runs, ray_cluster, tmp_path):
    config = _config(tmp_path, score={"gen_steps": 6})  # a new score key: score computes
    proc = _start(config, runs, ray_cluster, "--only", "score")
    # Wait for the stage's temp folder, not its log line: Ray streams stage logs to the driver
    # asynchronously, and on a slow day "[score] … rows over" arrived after the 10 s stage had ended.
    deadline = time.time() + 300
    while not list((runs / "score").glob(".tmp-*")):
        if proc.poll() is not None or time.time() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("score never started:\n" + proc.communicate()[0][-3000:])
        time.sleep(0.1)
    t0 = time.time()
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal does on Ctrl-C: the whole foreground group
    out, _ = proc.communicate(timeout=120)
    stopped_s = time.time() - t0
    assert proc.returncode == 130, out[-3000:]
    lines = [ln for ln in out.splitlines() if ln.startswith("unislim run:")]
    assert len(lines) == 1 and "interrupted (Ctrl-C)" in lines[0] and "KILLED" in lines[0], out[-2000:]
    assert "Traceback" not in out, out[-4000:]
    assert len(_complete(runs, "score")) == 1  # the session's; the interrupted key is not complete
    assert not list((runs / "score").glob(".tmp-*"))  # the stage cleaned up after itself
    parent = _newest_parent(runs)
    assert parent.info.status == "KILLED" and "interrupted" in parent.data.tags["unislim.end_reason"]
    children = _children(runs, parent.info.run_id)
    assert children["score"].info.status == "KILLED" and children["shard"].info.status == "FINISHED"
    assert_no_running_mlflow_run(runs)
    assert stopped_s < 60, stopped_s


def test_a_killed_score_worker_fails_the_stage_clearly_and_never_hangs(runs, ray_cluster, tmp_path):
    import psutil

    config = _config(tmp_path, score={"gen_steps": 8})  # a new score key: score computes, longer
    proc = _start(config, runs, ray_cluster, "--only", "score")
    _read_until(proc, lambda ln: "[score]" in ln and "rows over" in ln, 300)
    victim, deadline = None, time.time() + 60
    while victim is None and time.time() < deadline:
        victim = next((p for p in psutil.process_iter(["cmdline"])
                       if "ray::ScoreWorker" in " ".join(p.info["cmdline"] or [])), None)
        time.sleep(0.2)
    assert victim is not None, "no score worker process found"
    victim.kill()
    out, _ = proc.communicate(timeout=180)  # a clear error, never a hang
    assert proc.returncode == 1, out[-3000:]
    assert "[score] FAILED: a Ray worker process died" in out and "Traceback" not in out, out[-3000:]
    summary = out[out.rindex("stage  "):]
    assert "score" in summary and "failed" in summary and "pipeline FAILED" in summary
    assert len(_complete(runs, "score")) == 1  # the session's only
    parent = _newest_parent(runs)
    assert parent.info.status == "FAILED" and _children(runs, parent.info.run_id)["score"].info.status == "FAILED"
    assert_no_running_mlflow_run(runs)


def test_every_stage_checks_where_it_runs(ray_cluster, tmp_path):
    """The checks a stage task makes before it starts (run here in the driver process)."""
    from unislim.errors import ClusterError
    from unislim.pipelines import cluster, tracking

    runs = tmp_path / "runs"
    runs.mkdir()
    lock = tracking.DriverLock(runs)
    here = __import__("ray").get_runtime_context().get_node_id()
    local = f"sqlite:///{runs / 'mlflow.db'}"
    assert not cluster.can_autoscale()  # a `ray.init()` cluster: the monitor's read-only provider
    cluster.check_stage_node(local, runs, here, lock.rel)  # the driver's node, the driver's runs dir: fine
    with pytest.raises(ClusterError, match=r"a node joined after the run started") as joined:
        cluster.check_stage_node(local, runs, "0" * 56, lock.rel)  # placed on another node
    assert joined.value.where == f"MLflow tracking store {local}" and "cluster/README.md" in str(joined.value)
    cluster.check_stage_node("http://127.0.0.1:5000", runs, "0" * 56, lock.rel)  # a server: any node will do
    lock.release()
    with pytest.raises(ClusterError, match=r"is not shared storage") as unshared:
        cluster.check_stage_node("http://127.0.0.1:5000", runs, here, lock.rel)  # this node has no driver lock
    assert unshared.value.where == f"--runs-dir {runs}"
