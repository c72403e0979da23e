"""search: the space validates key by key, trial configs apply onto the pipeline's sections, the
objective and the Pareto front rank what they should; and (slow) a 4-trial Ray Tune search on the
tiny model, 2 trials at once, killed after its first trials finish, resumes without redoing them,
nests every trial's MLflow run under the search run, and exports a best pipeline that validates."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import REPO, tiny_pipeline
from unislim.config import ConfigError, load_config
from unislim.stages.search import _trial_sections, objective, param_space, pareto_front

# tiny: ff 96 → 4 or 8 experts, 1 shared; top-k from the active fraction (E=4: 1 or 2, E=8: 3 or 5)
PARTITION = {"layers": [0, 1], "num_experts": 8, "num_shared": 1, "active_fraction": 0.5, "impl": "loop"}
ADAPT = {"eft_steps": 2, "moe_steps": 2, "batch_size": 4, "num_workers": 1, "cpus_per_worker": 1,
         "warmup_steps": 0, "checkpoint_every": 2, "log_every": 2}
SPACE = {"partition.num_experts": {"grid": [4, 8]}, "partition.active_fraction": {"grid": [0.5, 0.75]}}
SEARCH = {"enabled": True, "space": SPACE, "num_samples": 1, "max_concurrent_trials": "auto", "asha": False,
          "n_und": 2, "n_gen": 1}


def _search_config(**search) -> dict:
    return tiny_pipeline(partition=PARTITION, adapt=ADAPT, search={**SEARCH, **search},
                         evaluate={"n_und": 2, "n_gen": 1, "steps": 2}, prune={"enabled": False})


# ------------------------------------------------------------------------------------ fast


def test_the_space_is_validated_key_by_key_all_errors_at_once():
    space = {"prune.sparsity": {"grid": [0.5]}, "adapt.nope": {"choice": [1]}, "adapt.lr": {"uniform": [2e-3, 1e-3]},
             "adapt.eft_steps": {"grid": [1], "choice": [2]}}
    with pytest.raises(ConfigError) as e:
        load_config(data=_search_config(space=space, max_concurrent_trials=0))
    lines = "\n".join(e.value.errors)
    assert len(e.value.errors) == 5, lines
    for fragment in ("search.space.prune.sparsity: only partition.* and adapt.*", "search.space.adapt.nope: adapt has "
                     "no searchable field 'nope'", "search.space.adapt.lr.uniform: needs lo < hi",
                     "search.space.adapt.eft_steps", "search.max_concurrent_trials: must be 'auto' or 1..4096"):
        assert fragment in lines


def test_values_are_checked_against_the_field_they_name():
    space = {"partition.num_experts": {"choice": [4, 1]}, "partition.impl": {"uniform": [0, 1]},
             "adapt.lr": {"loguniform": [1e-4, 3.0]}}
    with pytest.raises(ConfigError) as e:
        load_config(data=_search_config(space=space))
    (line,) = e.value.errors
    assert "partition.num_experts: 1 is not a valid" in line and "partition.impl: uniform needs a numeric" in line
    assert "adapt.lr: 3.0 is not a valid adapt.lr" in line
    with pytest.raises(ConfigError, match="optuna samples its own points"):
        load_config(data=_search_config(search_alg="optuna"))
    with pytest.raises(ConfigError, match="search.enabled: trials partition by the neuron scores"):
        load_config(data=tiny_pipeline(score={"enabled": False}, prune={"enabled": False}, search=SEARCH))


def test_the_commented_example_in_pipeline_yaml_validates():
    text = (REPO / "pipeline.yaml").read_text()
    lines = text[text.index("# search:"):].splitlines()
    block = [line[2:] for line in lines[:next(i for i, line in enumerate(lines) if not line.strip())]
             if line.startswith(("# search:", "#   "))]
    data = {**yaml.safe_load(text), **yaml.safe_load("\n".join(block))}
    cfg = load_config(data=data)
    assert cfg.search.enabled and len(cfg.search.space) == 5


def test_param_space_draws_integers_for_int_fields():
    cfg = load_config(data=_search_config(space={"adapt.moe_steps": {"uniform": [2, 5]}, "adapt.lr": {
        "loguniform": [1e-4, 1e-2]}, "partition.num_experts": {"grid": [4, 8]}}))
    space = param_space(cfg.search)
    draws = [space["adapt.moe_steps"].sample() for _ in range(50)]
    assert all(isinstance(d, int) and 2 <= d <= 5 for d in draws) and set(draws) == {2, 3, 4, 5}
    assert all(1e-4 <= space["adapt.lr"].sample() <= 1e-2 for _ in range(20))
    assert space["partition.num_experts"] == {"grid_search": [4, 8]}


def test_optuna_samples_the_space_when_installed_else_a_clear_error():
    import importlib.util

    from unislim.pipelines.tuning import searcher

    assert searcher("random", 0) is None  # Tune's default: random and grid
    if importlib.util.find_spec("optuna") is None:
        with pytest.raises(ImportError, match="pip install optuna"):
            searcher("optuna", 0)
        return
    cfg = load_config(data=_search_config(search_alg="optuna", space={
        "partition.num_experts": {"choice": [4, 8]}, "adapt.moe_steps": {"uniform": [2, 6]}}))
    tpe = searcher("optuna", 0)
    assert tpe.set_search_properties("score", "max", param_space(cfg.search))
    for i in range(4):
        suggested = tpe.suggest(f"t{i}")
        assert suggested["partition.num_experts"] in (4, 8) and suggested["adapt.moe_steps"] in range(2, 7)
        tpe.on_trial_complete(f"t{i}", {"score": float(i), "training_iteration": 1})


def test_a_trial_applies_its_values_and_a_rejected_combination_names_itself():
    cfg = load_config(data=_search_config())
    base = {k: getattr(cfg, k).model_dump(mode="json") for k in ("partition", "adapt")}
    p, a = _trial_sections(base, {"partition.num_experts": 4, "partition.active_fraction": 0.75, "adapt.lr": 0.01})
    assert (p.num_experts, p.top_k, a.lr, a.moe_steps) == (4, 2, 0.01, 2)
    with pytest.raises(ValueError, match=r"partition\.num_shared: must be < partition\.num_experts"):
        _trial_sections(base, {"partition.num_experts": 4, "partition.num_shared": 4})


def test_objective_budget_ranks_every_model_within_budget_first():
    dense = {"params_active": 100.0, "latency_ms": 10.0}
    obj = {"quality": "mean", "cost": "active_params", "kind": "budget", "budget": 0.8, "weight": 0.5}
    within = objective({"mme": 0.5, "geneval": 0.5, "params_active": 80.0, "latency_ms": 9.0}, obj, dense)
    over = objective({"mme": 1.0, "geneval": 1.0, "params_active": 81.0, "latency_ms": 1.0}, obj, dense)
    assert within == (0.5, 0.5, 0.8) and over[0] < within[0]
    trade = objective({"mme": 0.9, "geneval": 0.7, "params_active": 50.0, "latency_ms": 5.0},
                      {**obj, "kind": "tradeoff", "cost": "latency", "quality": "mme"}, dense)
    assert trade == pytest.approx((0.9 - 0.5 * 0.5, 0.9, 0.5))


def test_pareto_front_keeps_what_nothing_beats_on_both():
    table = pd.DataFrame({"quality": [0.9, 0.8, 0.95, 0.7, 0.9], "params_active": [50, 40, 80, 45, 60]},
                         index=list("abcde"))
    assert sorted(pareto_front(table, "params_active")) == ["a", "b", "c"]  # d: b is cheaper and better; e: a


def test_a_forced_rerun_starts_a_new_experiment_and_a_resume_keeps_the_old(tmp_path):
    from unislim.pipelines import tuning
    from unislim.pipelines.context import StageContext
    from unislim.pipelines.store import Manifest
    from unislim.stages.search import _start_over_if_forced

    ctx = StageContext(stage="search", key="k1", out_dir=tmp_path / "tmp", runs_dir=tmp_path)
    experiment, work = tuning.experiment_path(ctx), tmp_path / "ray_tune" / "search-k1.trials"
    for folder in (experiment, work):
        folder.mkdir(parents=True)
        (folder / "kept").write_text("")
    _start_over_if_forced(ctx, work)  # interrupted: no committed output, the experiment is resumed
    assert (experiment / "kept").exists() and (work / "kept").exists()
    (tmp_path / "search" / "k1").mkdir(parents=True)
    Manifest(stage="search", key="k1", dir="").save(tmp_path / "search" / "k1")
    _start_over_if_forced(ctx, work)  # complete and running again: --force
    assert not experiment.exists() and not work.exists()


# ------------------------------------------------------------------------------------ slow


def _finished_trials(experiment: Path) -> set[str]:
    """Trial ids Tune's saved experiment state records as TERMINATED (what a restore keeps)."""
    done = set()
    for state_file in experiment.glob("experiment_state-*.json"):
        try:
            data = json.loads(state_file.read_text())
        except (json.JSONDecodeError, OSError):
            continue
        for state, _ in data.get("trial_data", []):
            trial = json.loads(state) if isinstance(state, str) else state
            if trial.get("status") == "TERMINATED":
                done.add(trial["trial_id"])
    return done


@pytest.mark.slow
@pytest.mark.cluster  # a driver SIGKILLed mid-search, then a resume: minutes (make test-cluster)
def test_an_interrupted_search_resumes_without_redoing_finished_trials(ray_cluster, tmp_path):
    from unislim.pipelines.runner import run_pipeline

    runs = tmp_path / "runs"
    cfg = load_config(data=_search_config())
    assert run_pipeline(cfg, runs_dir=runs, only=["score"]).ok  # upstream, cached for both attempts
    config_file = tmp_path / "pipeline.yaml"
    config_file.write_text(yaml.safe_dump(_search_config()))

    # attempt 1: a separate driver, killed once Tune has saved two finished trials
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    log = open(tmp_path / "attempt1.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "unislim.cli", "run", str(config_file), "--runs-dir", str(runs),
                             "--address", ray_cluster, "--only", "search"], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    deadline, finished = time.time() + 600, set()  # generous: a loaded 2-core machine is slow to start trials
    while time.time() < deadline and proc.poll() is None:
        experiments = [p for p in runs.glob("ray_tune/search-*") if not p.name.endswith(".trials")]
        finished = _finished_trials(experiments[0]) if experiments else set()
        if len(finished) >= 2:
            break
        time.sleep(0.5)
    tail = (tmp_path / "attempt1.log").read_text()[-3000:]
    assert proc.poll() is None, f"the search ended before it could be interrupted:\n{tail}"
    assert len(finished) >= 2, tail
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    (work,) = (runs / "ray_tune").glob("search-*.trials")
    before = {t: (work / t / "compute.log").read_text() for t in finished}
    assert all("eval-moe" in log for log in before.values())  # they did finish: partition, fits, evaluations
    assert not list((runs / "search").glob("*/manifest.json"))  # no output committed by the killed attempt

    # attempt 2: the same command resumes the Tune experiment
    result = run_pipeline(cfg, runs_dir=runs, only=["search"])
    assert result.ok, result.stages
    out = Path(result.stages["search"].manifest.dir)
    table = pd.read_parquet(out / "trials.parquet")
    assert len(table) == 4 and set(table.status) == {"complete"}
    assert finished <= set(table.trial_id)  # restored, not a new experiment
    assert {t: (work / t / "compute.log").read_text() for t in finished} == before  # nothing redone
    assert sorted(zip(table["partition.num_experts"], table["partition.active_fraction"])) == [
        (4, 0.5), (4, 0.75), (8, 0.5), (8, 0.75)]
    assert (table.params_active[table["partition.active_fraction"] == 0.5].max()
            < table.params_active[table["partition.active_fraction"] == 0.75].min())
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["search/max_concurrent_trials"] == 2  # auto: 2 CPUs / 1 CPU per trial trainer

    # MLflow: the four trials are children of this (second) search run, metrics at both report steps
    client = MlflowClient(result.tracking_uri)
    search_run = client.search_runs([result.experiment_id], filter_string="tags.`unislim.stage` = 'search'",
                                    order_by=["attributes.start_time DESC"])[0]
    children = client.search_runs([result.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{search_run.info.run_id}'")
    assert sorted(r.data.tags["unislim.trial_id"] for r in children) == sorted(table.trial_id)
    assert all(r.info.status == "FINISHED" and "partition.num_experts" in r.data.params for r in children)
    history = client.get_metric_history(children[0].info.run_id, "search/score")
    assert sorted(m.step for m in history) == [1, 2]

    # the best trial's pipeline validates and points at what the search chose
    best = load_config(out / "best_pipeline.yaml")
    top = table.sort_values("score", ascending=False).iloc[0]
    assert (best.partition.num_experts, best.partition.active_fraction) == (
        top["partition.num_experts"], top["partition.active_fraction"])
    assert best.partition.enabled and best.adapt.enabled and not best.search.enabled
    assert (out / "plots" / "pareto.png").stat().st_size > 0
