"""pretrain → shard → score → mod on the tiny model: the schedule comes from the scores, the routers
train under DeepSpeed on Ray Train, FLOPs are counted and saved, the task-agnostic baseline gets
the same budget, a rerun resumes from the last checkpoint, and the artifacts reach MLflow."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.conftest import tiny_pipeline
from unislim.config import load_config
from unislim.modeling.loading import load_model
from unislim.modeling.families import get_family
from unislim.modeling.surgery.mod.layer import routed_layers, router_parameters
from unislim.modeling.surgery.mod.schedule import mean_capacity
from unislim.pipelines.context import StageContext
from unislim.pipelines.graph import plan
from unislim.pipelines.runner import run_pipeline
from unislim.stages import mod as mod_stage

pytestmark = pytest.mark.slow

MOD = {"enabled": True, "routing": "task", "budget": 0.75, "max_importance": 2.0, "steps": 6, "batch_size": 8,
       "warmup_steps": 1, "log_every": 2, "checkpoint_every": 2, "num_workers": 2, "zero_stage": 2}


@pytest.fixture(scope="module")
def mod_run(tiny_run, ray_cluster, tmp_path_factory):
    # a copy of the session's tiny run: shard, pretrain and score are cached
    runs = Path(shutil.copytree(tiny_run[0], tmp_path_factory.mktemp("mod-runs") / "runs"))
    cfg = load_config(data=tiny_pipeline(mod=MOD, prune={"enabled": False}, evaluate={"enabled": False}))
    result = run_pipeline(cfg, runs_dir=runs, only=["mod"])
    assert result.ok, {k: v.error for k, v in result.stages.items() if v.error}
    return cfg, runs, result


def _out(result, stage: str) -> Path:
    return Path(result.stages[stage].manifest.dir)


def test_plan_wires_mod_after_score_and_leaves_the_default_pipeline_alone():
    default = load_config("pipeline.yaml")
    assert not default.mod.enabled and "mod" not in [s.id for s in plan(default)]
    specs = {s.id: s for s in plan(load_config(data=tiny_pipeline(mod=MOD)))}
    assert specs["mod"].inputs == {"checkpoint": ("pretrain", "checkpoint"), "scores": ("score", "scores"),
                                   "train": ("shard", "train"), "tasks": ("shard", "tasks")}
    assert specs["evaluate-mod"].inputs["checkpoint"] == ("mod", "checkpoint")
    table = load_config(data=tiny_pipeline(mod={**MOD, "schedule": "table", "table": {"gen": [0.5, 0.5]}}))
    assert "scores" not in {s.id: s for s in plan(table)}["mod"].inputs


def test_mod_checkpoint_has_trained_routers_and_counted_savings(mod_run):
    cfg, _, result = mod_run
    out = _out(result, "mod")
    schedule = json.loads((out / "schedule.json").read_text())
    assert schedule["routing"] == "task" and set(schedule["capacity"]) == {"und", "gen"}
    assert schedule["mean_capacity"] == pytest.approx(0.75, abs=1e-3)
    model = load_model(out / "checkpoint")
    op = model.config.unislim["surgery"][-1]
    assert op["op"] == "mod" and len(routed_layers(model)) > 0
    caps = {(name, t): c for name, tasks in op["layers"].items() for t, c in tasks.items()}
    assert caps == {(f"model.layers.{i}", t): c for t, layer_caps in schedule["capacity"].items()
                    for i, c in enumerate(layer_caps) if c < 1.0}
    assert any(p.abs().sum() > 0 for p in router_parameters(model))  # routers start at zero: they trained
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.1 < metrics["mod/train_flops_saved"] < 0.5  # ~1 - 0.75 of the layers' work (plus the n² part)
    assert metrics["mod/train_flops_per_step"] < metrics["mod/dense_train_flops_per_step"]
    assert metrics["mod/gen_flops_saved"] > 0
    assert {"mod/keep/und/layer0", "mod/keep/gen/layer1"} <= set(metrics)
    assert [h["step"] for h in json.loads((out / "history.json").read_text())["history"]] == [2, 4, 6]
    for name in ("schedule.png", "token_keep_und.png", "token_keep_gen.png"):
        assert (out / "plots" / name).stat().st_size > 0


def test_artifacts_reach_mlflow(mod_run):
    _, _, result = mod_run
    client = MlflowClient(result.tracking_uri)
    run_id = result.stages["mod"].manifest.mlflow_run_id
    plots = {a.path for a in client.list_artifacts(run_id, "plots")}
    assert {"plots/schedule.png", "plots/token_keep_und.png", "plots/token_keep_gen.png"} <= plots
    assert {m.step for m in client.get_metric_history(run_id, "train/loss")} == {2, 4, 6}


def test_task_agnostic_baseline_has_one_capacity_at_the_same_budget(mod_run):
    cfg, _, result = mod_run
    scores = _out(result, "score") / "scores"
    dense = load_model(_out(result, "pretrain") / "checkpoint")
    family, kinds, mix = get_family("digits"), {"und": "und", "gen": "gen"}, {"und": 0.5, "gen": 0.5}
    aware, info = mod_stage.mod_prepare(cfg.mod, family, dense, kinds, mix, scores)
    agnostic, _ = mod_stage.mod_prepare(cfg.mod.model_copy(update={"routing": "shared"}), family, dense, kinds, mix,
                                        scores)
    assert agnostic["capacity_by_layer"]["und"] == agnostic["capacity_by_layer"]["gen"]
    assert aware["capacity_by_layer"]["und"] != aware["capacity_by_layer"]["gen"]
    assert mean_capacity(agnostic["capacity_by_layer"], info["weights"]) == pytest.approx(
        mean_capacity(aware["capacity_by_layer"], info["weights"]), abs=1e-3)
    assert agnostic["routing"] == "shared" and aware["causal_tasks"] == ["und"] and aware["keep_last"] == {"und": 4}


@pytest.mark.cluster  # a killed run resumed: over a minute (make test-cluster)
def test_a_rerun_resumes_from_the_last_checkpoint(mod_run, tmp_path):
    """The same Ray Train run name (stage + key) picks up the last checkpoint: 4 steps, then 8."""
    cfg, runs, result = mod_run
    inputs = {"checkpoint": SimpleNamespace(path=str(_out(result, "pretrain") / "checkpoint")),
              "scores": SimpleNamespace(path=str(_out(result, "score") / "scores")),
              "train": SimpleNamespace(path=str(_out(result, "shard") / "train")),
              "tasks": SimpleNamespace(path=str(_out(result, "shard") / "tasks.json"))}
    ctx = StageContext(stage="mod", key="resume-test", out_dir=tmp_path / "a", runs_dir=tmp_path)
    (tmp_path / "a").mkdir()
    common = {"seed": 0, "model": cfg.model, "mix": {"und": 0.5, "gen": 0.5}}
    short = SimpleNamespace(**common, mod=cfg.mod.model_copy(update={"steps": 4, "num_workers": 1}))
    mod_stage.run(short, inputs, ctx)
    ctx.out_dir = tmp_path / "b"
    (tmp_path / "b").mkdir()
    longer = SimpleNamespace(**common, mod=cfg.mod.model_copy(update={"steps": 8, "num_workers": 1}))
    mod_stage.run(longer, inputs, ctx)
    state = json.loads((tmp_path / "b" / "history.json").read_text())
    assert [h["step"] for h in state["history"]] == [2, 4, 6, 8]
    assert state["resumed_from"] == [4]
    a, b = (load_model(tmp_path / d / "checkpoint") for d in "ab")
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
