"""The Ray DAG runner end to end on the tiny pipeline: cache reuse, partial reruns and
the MLflow run tree (kills and resumes: tests/pipelines/test_kills.py). Real Ray (the session cluster),
real MLflow (sqlite)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import tiny_pipeline
from unislim.config import load_config
from unislim.pipelines.runner import run_pipeline

pytestmark = pytest.mark.slow
STAGES = ("pretrain", "shard", "score", "prune", "evaluate", "evaluate-prune")


def _children(uri: str, parent_run_id: str) -> dict[str, object]:
    client = MlflowClient(uri)
    parent = client.get_run(parent_run_id)
    runs = client.search_runs([parent.info.experiment_id],
                              filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")
    return {r.data.tags["unislim.stage"]: r for r in runs}


def test_mlflow_tree_of_a_run(tiny_run):
    runs, result = tiny_run
    client = MlflowClient(result.tracking_uri)
    parent = client.get_run(result.run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.params["pretrain.steps"] == "40" and parent.data.params["model.size"] == "tiny"
    assert "unislim.config_hash" in parent.data.tags and "unislim.git_sha" in parent.data.tags
    assert "config.yaml" in [a.path for a in client.list_artifacts(result.run_id)]
    children = _children(result.tracking_uri, result.run_id)
    assert set(children) == set(STAGES)
    assert all(c.data.tags["unislim.cached"] == "false" and c.info.status == "FINISHED" for c in children.values())
    ev = children["evaluate"]
    metrics = json.loads((Path(result.stages["evaluate"].manifest.dir) / "metrics.json").read_text())
    assert ev.data.metrics["mme/overall"] == pytest.approx(metrics["mme/overall"])
    assert metrics["model"] == "reference-tiny-shared"
    history = client.get_metric_history(children["pretrain"].info.run_id, "train/loss")
    assert [m.step for m in history] == [10, 20, 30, 40]  # live, from rank 0
    pretrain = children["pretrain"]
    artifacts = {a.path for a in client.list_artifacts(pretrain.info.run_id, "checkpoint")}
    assert "checkpoint/config.json" in artifacts and "checkpoint/model.safetensors" not in artifacts  # weights stay
    assert pretrain.data.tags["unislim.checkpoint.checkpoint"] == str(Path(result.stages["pretrain"].manifest.dir)
                                                                      / "checkpoint")
    assert "plots/loss.png" in {a.path for a in client.list_artifacts(pretrain.info.run_id, "plots")}
    # the runs-dir contract
    for stage in STAGES:
        manifest = json.loads((Path(result.stages[stage].manifest.dir) / "manifest.json").read_text())
        assert manifest["complete"] is True and manifest["stage"] == stage and manifest["files"]
    assert (runs / "mlflow.db").exists() and (runs / "artifacts").is_dir()


def test_rerun_reuses_everything_and_a_changed_setting_reruns_only_its_stage(tiny_run, tmp_path):
    runs, first = tiny_run
    runs = Path(shutil.copytree(runs, tmp_path / "runs"))
    cfg = load_config(data=tiny_pipeline())

    t0 = time.time()
    again = run_pipeline(cfg, runs_dir=runs)
    rerun_s = time.time() - t0
    assert {r.status for r in again.stages.values()} == {"cached"} and set(again.stages) == set(STAGES)
    assert again.stages["evaluate"].manifest.key == first.stages["evaluate"].manifest.key
    children = _children(again.tracking_uri, again.run_id)
    assert {c.data.tags["unislim.cached"] for c in children.values()} == {"true"} and set(children) == set(STAGES)
    assert "mme/overall" in children["evaluate"].data.metrics  # a cached stage still shows its numbers
    assert rerun_s < 0.5 * first.elapsed_s, (rerun_s, first.elapsed_s)

    changed = run_pipeline(load_config(data=tiny_pipeline(evaluate={"steps": 3})), runs_dir=runs)
    assert {k: r.status for k, r in changed.stages.items()} == {
        "pretrain": "cached", "shard": "cached", "score": "cached", "prune": "cached",
        "evaluate": "ran", "evaluate-prune": "ran"}

    forced = run_pipeline(cfg, runs_dir=runs, only=["pretrain"], force=["pretrain"])
    assert {k: r.status for k, r in forced.stages.items()} == {"shard": "cached", "pretrain": "ran"}  # and upstream
    # forced means trained again from step 0, not a resume of the finished Ray Train run (zero steps)
    log = json.loads((Path(forced.stages["pretrain"].manifest.dir) / "history.json").read_text())
    assert log["resumed_from"] == [] and [e["step"] for e in log["history"]][-1] == cfg.pretrain.steps
    assert log["history"][0]["step"] == cfg.pretrain.log_every



def test_a_checkpoint_from_a_path_finds_its_family_from_its_config(tiny_run, tmp_path):
    """`model.source: path` with the default `model.family: auto`: the shard stage reads the family
    off the checkpoint's config.json (here the digits model's), as every later stage does."""
    _, first = tiny_run
    checkpoint = Path(first.stages["pretrain"].manifest.dir) / "checkpoint"
    cfg = load_config(data=tiny_pipeline(model={"source": "path", "path": str(checkpoint)},
                                         pretrain={"enabled": False}))
    assert cfg.model.family == "auto"
    result = run_pipeline(cfg, runs_dir=tmp_path / "runs", only=["shard"])
    assert result.ok, {k: v.error for k, v in result.stages.items() if v.error}
    tasks = json.loads((Path(result.stages["shard"].manifest.dir) / "tasks.json").read_text())
    assert {t["kind"] for t in tasks.values()} == {"und", "gen"}
