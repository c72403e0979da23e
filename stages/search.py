"""Stage `search`: Ray Tune over expert layouts and adaptation settings, quality against cost.

Each trial applies its sampled values (`search.space`: dotted `partition.*` / `adapt.*` keys) onto
the pipeline's `partition` and `adapt` sections, then, in its own work folder:
1. `partition.run` on the score stage's (cached) scores → the MoE checkpoint;
2. each adapt phase (Expert-Frozen Tuning, then MoE adaptation) as its own `TorchTrainer` run named
   after the trial (`search-<key>-<trial>-eft`), so a rerun resumes it, the adapt stage's `train_loop`;
3. after each phase, `evaluate_checkpoint` with `search.n_und` / `search.n_gen` samples, reported to
   Tune: ASHA (`search.asha`) stops a trial whose score after EFT is in the bottom of its rung.
Every step's output is kept in the trial's folder, so a trial that Tune restarts does not redo it.

The score (`search.objective`): quality (digits-MME, digits-GenEval or their mean) under a budget on
the cost (active parameters per generation token, or measured und + gen latency), relative to the
dense source model (evaluated first, with the same settings), or quality − weight × relative cost.
A combination the config rejects (e.g. more shared experts than experts) is reported as `invalid`.

MLflow: one child run per trial under this stage's run, params flattened, metrics at step 1 (after
EFT) and 2 (after MoE adaptation). Writes `trials.parquet`, `plots/pareto.png` (quality vs active
parameters and vs latency, the front highlighted), `best_pipeline.yaml` (this config with the best
trial's values, partition → adapt → evaluate, validated) and the best trial's `best/checkpoint`.

Latency is measured inside the trials while other trials run: with `objective.cost=latency`, set
`max_concurrent_trials: 1` for timings that compare.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml

from unislim.config import SEARCHABLE, SearchConfig, load_config
from unislim.pipelines import training, tuning
from unislim.pipelines.context import StageContext
from unislim.pipelines.store import Artifact

from . import adapt, partition
from .evaluate import evaluate_checkpoint

# What each report carries besides the score (evaluate's metrics.json names → short Tune names); the
# per-task keys nll/<task>, agreement/<task>, flops/<task>_per_sample, latency_ms/<task>_per_sample too
REPORTED = {"mme/overall": "mme", "geneval/overall": "geneval", "fid/gen": "fid", "params/active": "params_active",
            "params/total": "params_total"}
PER_TASK = ("nll", "agreement", "kl", "mse", "flops", "latency_ms")


@dataclass(frozen=True)
class TrialSetup:
    """What every trial needs (picklable): the base sections, the inputs, where to write."""

    key: str
    keys: tuple[str, ...]  # the searched dotted keys
    base: dict  # model, seed, partition, adapt, evaluate sections (model_dump)
    search: dict  # the search section (model_dump)
    scores: Artifact
    checkpoint: Artifact
    train: Artifact  # the shard stage's training rows (trials train on them)
    heldout: Artifact  # ... and held-out rows (trials are evaluated on them)
    tasks: Artifact
    mix: dict  # task -> share of each training batch
    trial_cpus_per_worker: float | None  # a trial trainer's per-worker CPUs, shrunk to fit beside the trials
    work_dir: str
    runs_dir: str
    dense: dict  # the source model's evaluation (the reference of relative cost)
    tracking_uri: str | None = None
    experiment_id: str | None = None
    parent_run_id: str | None = None


def run(cfg: Any, inputs: dict, ctx: Any) -> dict[str, str]:
    s = cfg.search
    out = Path(ctx.out_dir)
    work = tuning.experiment_path(ctx).with_name(f"search-{ctx.key}.trials")
    _start_over_if_forced(ctx, work)
    work.mkdir(parents=True, exist_ok=True)
    dense = _dense_reference(inputs, cfg.model, s, cfg.evaluate, work, ctx)
    base = {k: getattr(cfg, k).model_dump(mode="json") if hasattr(getattr(cfg, k), "model_dump") else getattr(cfg, k)
            for k in ("seed", "model", "partition", "adapt", "evaluate")}
    setup = TrialSetup(key=ctx.key, keys=tuple(s.space), base=base, search=s.model_dump(mode="json"),
                       scores=inputs["scores"], checkpoint=inputs["checkpoint"], train=inputs["train"],
                       heldout=inputs["heldout"], tasks=inputs["tasks"], mix=cfg.mix,
                       trial_cpus_per_worker=tuning.fitting_cpus_per_worker(cfg.adapt.num_workers,
                                                                            cfg.adapt.cpus_per_worker, ctx),
                       work_dir=str(work),
                       runs_dir=str(ctx.runs_dir), dense=dense, tracking_uri=ctx.tracking_uri,
                       experiment_id=_experiment_id(ctx), parent_run_id=ctx.run_id)

    a = cfg.adapt
    grid = math.prod(len(spec.grid) for spec in s.space.values() if spec.grid is not None)
    n_trials = s.num_samples * grid
    concurrent = (tuning.auto_concurrency(a.num_workers * a.cpus_per_worker, a.num_workers if a.use_gpu else 0,
                                          n_trials) if s.max_concurrent_trials == "auto" else s.max_concurrent_trials)
    rungs = 2 if a.eft_steps > 0 and a.moe_steps > 0 else 1
    results = tuning.tune_search(run_trial, param_space(s), ctx, trial_args={"setup": setup}, metric="score",
                                 mode="max", num_samples=s.num_samples, max_concurrent=concurrent,
                                 search_alg=s.search_alg, seed=s.seed, asha_rungs=rungs if s.asha else 0,
                                 reduction_factor=s.reduction_factor)
    rows = [_row(r, setup.keys) for r in results]
    _adopt_trial_runs(setup, rows)  # trials of an interrupted attempt join this run too
    failed = [r for r in rows if r["status"] == "error"]
    if failed:  # the Tune experiment is kept: a rerun retries only these
        raise RuntimeError(f"search: {len(failed)} of {len(rows)} trial(s) failed: "
                           + "; ".join(f"{r['trial_id']}: {r['error']}" for r in failed[:3]))

    import pandas as pd

    table = pd.DataFrame(rows).sort_values("score", ascending=False)
    scored = table[table.status.isin(["complete", "stopped"])]
    if scored.empty:
        raise RuntimeError(f"search: no trial produced a model ({table.status.value_counts().to_dict()})")
    table["pareto_params"] = table.index.isin(pareto_front(scored, "params_active"))
    table["pareto_latency"] = table.index.isin(pareto_front(scored, "latency_ms"))
    table.to_parquet(out / "trials.parquet", index=False)
    best = scored.iloc[0]
    _plot_pareto(table, dense, s.objective.quality, out / "plots" / "pareto.png")
    _export_best(cfg, {k: _plain(best[k]) for k in setup.keys}, out / "best_pipeline.yaml")
    shutil.copytree(Path(best["checkpoint"]), out / "best" / "checkpoint")

    counts = table.status.value_counts().to_dict()
    metrics = {f"search/{k}": int(counts.get(k, 0)) for k in ("complete", "stopped", "invalid")}
    metrics.update({"search/trials": len(table), "search/max_concurrent_trials": concurrent,
                    "search/best_score": float(best["score"]), "search/best_quality": float(best["quality"]),
                    "search/pareto_size": int(table.pareto_params.sum()),
                    "params/active": float(best["params_active"]), "dense/quality": dense["quality"],
                    "dense/params_active": dense["params_active"]})
    metrics.update({long: float(best[short]) for long, short in REPORTED.items()
                    if short in best and best[short] is not None and not math.isnan(best[short])})
    (out / "metrics.json").write_text(json.dumps({"best_trial": best["trial_id"], **metrics}, indent=2))
    ctx.progress(f"{len(table)} trials {counts}; best {best['trial_id']}: score {best['score']:.4f}, quality "
                 f"{best['quality']:.3f} at {best['params_active']:,.0f} active params "
                 f"({ {k: _plain(best[k]) for k in setup.keys} })")
    return {"trials": "trials.parquet", "pareto": "plots/pareto.png", "best_pipeline": "best_pipeline.yaml",
            "checkpoint": "best/checkpoint", "best": "best/checkpoint"}


def _start_over_if_forced(ctx: Any, work: Path) -> None:
    """A complete output under this key while the stage runs again means `--force search`: drop the
    old Tune experiment and trial folders, so the trials run anew instead of being restored."""
    from unislim.pipelines.store import load_complete

    if load_complete(Path(ctx.runs_dir) / ctx.stage / ctx.key) is not None:
        ctx.progress("forced: starting a new Tune experiment")
        shutil.rmtree(tuning.experiment_path(ctx), ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def param_space(s: SearchConfig) -> dict[str, Any]:
    """`search.space` as Tune domains; uniform / loguniform over an int field draw integers."""
    from ray import tune

    space = {}
    for key, spec in s.space.items():
        section, _, name = key.partition(".")
        is_int = SEARCHABLE[section].model_fields[name].annotation is int
        if spec.grid is not None:
            space[key] = tune.grid_search(list(spec.grid))
        elif spec.choice is not None:
            space[key] = tune.choice(list(spec.choice))
        elif spec.uniform is not None:
            lo, hi = spec.uniform
            space[key] = tune.randint(int(lo), int(hi) + 1) if is_int else tune.uniform(lo, hi)
        else:
            lo, hi = spec.loguniform
            space[key] = tune.lograndint(int(lo), int(hi) + 1) if is_int else tune.loguniform(lo, hi)
    return space


def quality_of(metrics: dict[str, float], kind: str) -> float:
    """`search.objective.quality`: digits-MME / GenEval (or their mean), held-out agreement with the
    source (mean over tasks), or minus the mean held-out NLL; auto: mean for digits, else agreement."""
    if kind == "auto":
        kind = "mean" if "mme" in metrics else "agreement"
    if kind in ("mean", "mme", "geneval"):
        if "mme" not in metrics:
            raise ValueError(f"search.objective.quality={kind!r} needs digits metrics; this family has none "
                             "(use agreement or nll)")
        return {"mean": (metrics["mme"] + metrics["geneval"]) / 2, "mme": metrics["mme"],
                "geneval": metrics["geneval"]}[kind]
    prefix = "agreement/" if kind == "agreement" else "nll/"
    values = [v for k, v in metrics.items() if k.startswith(prefix)]
    if not values:
        raise ValueError(f"search.objective.quality={kind!r}: the evaluation has no {prefix}* metrics")
    mean = sum(values) / len(values)
    return mean if kind == "agreement" else -mean


def objective(metrics: dict[str, float], obj: dict, dense: dict) -> tuple[float, float, float]:
    """(score, quality, cost relative to the dense model) of one evaluation."""
    quality = quality_of(metrics, obj["quality"])
    cost_key = "params_active" if obj["cost"] == "active_params" else "latency_ms"
    relative = metrics[cost_key] / dense[cost_key]
    if obj["kind"] == "budget":  # over budget ranks below every model within it, the further the lower
        score = quality if relative <= obj["budget"] else quality - 1.0 - (relative - obj["budget"])
    else:
        score = quality - obj["weight"] * relative
    return score, quality, relative


def pareto_front(table, cost: str) -> list:
    """Index labels of the rows no other row beats on both quality (higher) and `cost` (lower)."""
    front, best_quality = [], -math.inf
    for label, row in table.sort_values([cost, "quality"], ascending=[True, False]).iterrows():
        if row["quality"] > best_quality:
            front.append(label)
            best_quality = row["quality"]
    return front


# ------------------------------------------------------------------------------------ one trial


def run_trial(config: dict, setup: TrialSetup) -> None:
    """partition → adapt phases → evaluate after each, in `<work>/<trial id>/`; reports to Tune."""
    from unislim.pipelines import tracking

    trial_id = tuning.trial_id()
    work = Path(setup.work_dir) / trial_id
    work.mkdir(parents=True, exist_ok=True)
    values = {k: _plain(config[k]) for k in setup.keys}
    (work / "values.json").write_text(json.dumps(values))
    run_id = _trial_run(setup, trial_id, values)
    ctx = StageContext(stage="search", key=f"{setup.key}-{trial_id}", out_dir=work, runs_dir=Path(setup.runs_dir),
                       tracking_uri=setup.tracking_uri, run_id=run_id)
    try:
        p, a = _trial_sections(setup.base, values)
        if setup.trial_cpus_per_worker is not None:
            a = a.model_copy(update={"cpus_per_worker": setup.trial_cpus_per_worker})
    except ValueError as e:  # a combination the config rejects: reported, not run
        ctx.progress(f"invalid: {e}")
        if run_id:
            tracking.set_tags(setup.tracking_uri, run_id, {"unislim.trial_status": "invalid"})
        tuning.report({"score": -1e9, "status": "invalid", "error": str(e)[:500], "trial_id": trial_id,
                       "final": True, "checkpoint": ""})
        return

    partitioned = _cached(work / "partition", work, "partition", lambda out: partition.run(
        SimpleNamespace(partition=p, model=_model(setup)), {"scores": setup.scores, "checkpoint": setup.checkpoint},
        StageContext(stage="search", key=ctx.key, out_dir=out, runs_dir=ctx.runs_dir)))
    phases = [(name, steps) for name, steps in (("eft", a.eft_steps), ("moe", a.moe_steps)) if steps > 0]
    init = partitioned / "checkpoint"
    from unislim.modeling.families import from_model_config

    family = from_model_config(init, _model(setup))
    for i, (phase, steps) in enumerate(phases):
        spec = adapt.phase_spec(a, setup.base["seed"], setup.mix, family, setup.base["model"]["adapter"], init,
                                phase, steps, step_offset=sum(n for _, n in phases[:i]))
        trained = _cached(work / phase, work, f"fit-{phase}",
                          lambda out: _fit(spec, ctx, a, phase, out, setup)) / "checkpoint"
        metrics = _evaluated(trained, work / f"eval-{phase}.json", work, setup)
        score, quality, relative = objective(metrics, setup.search["objective"], setup.dense)
        final = i == len(phases) - 1
        result = {**metrics, "score": score, "quality": quality, "cost_relative": relative, "phase": phase,
                  "status": "complete" if final else "running", "trial_id": trial_id, "final": final,
                  "checkpoint": str(trained)}
        if run_id:
            tracking.log_metrics(setup.tracking_uri, run_id, {
                **{name: metrics[short] for name, short in REPORTED.items() if short in metrics},
                **{k: v for k, v in metrics.items() if k.split("/")[0] in PER_TASK},
                "search/score": score, "search/quality": quality, "search/cost_relative": relative}, step=i + 1)
            if final:
                tracking.set_tags(setup.tracking_uri, run_id, {"unislim.trial_status": "complete"})
                tracking.end_run(setup.tracking_uri, run_id, ok=True)
        init = trained
        tuning.report(result)


def _trial_sections(base: dict, values: dict) -> tuple[Any, Any]:
    """The trial's partition and adapt sections, validated (ValueError lists what is wrong)."""
    from pydantic import ValidationError

    from unislim.config import _format

    data = {name: dict(base[name]) for name in SEARCHABLE}
    for key, value in values.items():
        section, _, field = key.partition(".")
        data[section][field] = value
    data["adapt"]["fail_at_step"] = None  # a trial never injects failures
    sections, problems = [], []
    for name, model in SEARCHABLE.items():
        try:
            sections.append(model.model_validate(data[name]))
        except ValidationError as e:
            problems += [f"{name}.{_format(err)}" for err in e.errors()]
    if problems:
        raise ValueError("; ".join(problems))
    return tuple(sections)


def _cached(folder: Path, work: Path, step: str, make) -> Path:
    """`folder` made once by `make(tmp)`: a trial restarted after a crash reuses what it finished.
    `compute.log` records every step that actually ran."""
    if not (folder / ".done").exists():
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        make(tmp)
        (tmp / ".done").write_text("")
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
        with open(work / "compute.log", "a") as f:
            f.write(step + "\n")
    return folder


def _fit(spec: dict, ctx: StageContext, a: Any, phase: str, out: Path, setup: TrialSetup) -> None:
    """One adapt phase of the one training loop on its own TorchTrainer (resumes by name), its model
    copied into `out`."""
    folder, _ = training.train(ctx, spec, {"train": setup.train, "tasks": setup.tasks}, a, name_suffix=phase)
    shutil.move(str(folder / "model"), out / "checkpoint")
    shutil.rmtree(folder, ignore_errors=True)
    from unislim.modeling.loading import carry_files

    carry_files(spec["init"], out / "checkpoint")
    source = json.loads((Path(spec["init"]) / "unislim.json").read_text())["description"]
    (out / "checkpoint" / "unislim.json").write_text(json.dumps({"description": f"adapt:{phase}:{source}",
                                                                 "stage": "search"}))


def _evaluated(checkpoint: Path, path: Path, work: Path, setup: TrialSetup) -> dict[str, float]:
    if not path.exists():
        e, s = setup.base["evaluate"], setup.search
        metrics = evaluate_checkpoint(checkpoint, source=setup.checkpoint.path, heldout=setup.heldout.path,
                                      tasks=json.loads(Path(setup.tasks.path).read_text()), model_cfg=_model(setup),
                                      n_und=s["n_und"], n_gen=s["n_gen"], steps=e["steps"], cfg_scale=e["cfg_scale"],
                                      seed=e["seed"], progress=lambda m: None)
        path.write_text(json.dumps(_short(metrics)))
        with open(work / "compute.log", "a") as f:
            f.write(f"{path.stem}\n")
    return json.loads(path.read_text())


def _short(metrics: dict) -> dict[str, float]:
    """The numbers a trial reports: `REPORTED` under short names, the per-task ones as they are, and
    `latency_ms`, the summed per-sample latency of every task."""
    short = {REPORTED[k]: float(v) for k, v in metrics.items() if k in REPORTED}
    short.update({k: float(v) for k, v in metrics.items() if k.split("/")[0] in PER_TASK and not isinstance(v, str)})
    short["latency_ms"] = sum(v for k, v in metrics.items() if k.startswith("latency_ms/"))
    return short


def _model(setup: TrialSetup):
    from unislim.config import ModelConfig

    return ModelConfig.model_validate(setup.base["model"])


def _dense_reference(inputs: dict, model_cfg: Any, s: SearchConfig, e: Any, work: Path, ctx: Any) -> dict:
    """The source model evaluated as the trials are (cost and quality of 'no compression')."""
    path = work / "dense.json"
    if not path.exists():
        ctx.progress(f"evaluating the dense source model ({s.n_und} / {s.n_gen} samples)")
        checkpoint = inputs["checkpoint"].path
        metrics = _short(evaluate_checkpoint(checkpoint, source=checkpoint, heldout=inputs["heldout"].path,
                                             tasks=json.loads(Path(inputs["tasks"].path).read_text()),
                                             model_cfg=model_cfg, n_und=s.n_und, n_gen=s.n_gen, steps=e.steps,
                                             cfg_scale=e.cfg_scale, seed=e.seed, progress=lambda m: None))
        quality = objective(metrics, s.objective.model_dump(), metrics)[1]
        path.write_text(json.dumps({**metrics, "quality": quality}))
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------ MLflow


def _experiment_id(ctx: Any) -> str | None:
    if not (ctx.run_id and ctx.tracking_uri):
        return None
    from mlflow.tracking import MlflowClient

    return MlflowClient(ctx.tracking_uri).get_run(ctx.run_id).info.experiment_id


def _trial_run(setup: TrialSetup, trial_id: str, values: dict) -> str | None:
    """This trial's child run (found again when Tune restarts the trial), params flattened."""
    if not setup.parent_run_id:
        return None
    from mlflow.tracking import MlflowClient

    from unislim.config import flatten
    from unislim.pipelines import tracking

    found = MlflowClient(setup.tracking_uri).search_runs(
        [setup.experiment_id], filter_string=f"tags.`unislim.search_key` = '{setup.key}' and "
                                             f"tags.`unislim.trial_id` = '{trial_id}'")
    if found:
        return found[0].info.run_id
    params = {**flatten({k: setup.base[k] for k in SEARCHABLE}), **values}
    return tracking.start_run(setup.tracking_uri, setup.experiment_id, f"trial-{trial_id}", parent=setup.parent_run_id,
                              params=params, tags={"unislim.stage": "search-trial", "unislim.search_key": setup.key,
                                                   "unislim.trial_id": trial_id})


def _adopt_trial_runs(setup: TrialSetup, rows: list[dict]) -> None:
    """Nest every trial's run under this stage run and close it with the trial's final status."""
    if not setup.parent_run_id:
        return
    from mlflow.tracking import MlflowClient

    from unislim.pipelines import tracking

    status = {r["trial_id"]: r["status"] for r in rows}
    client = MlflowClient(setup.tracking_uri)
    for run in client.search_runs([setup.experiment_id], filter_string=f"tags.`unislim.search_key` = '{setup.key}'"):
        trial = run.data.tags.get("unislim.trial_id")
        if trial not in status:
            continue
        tracking.set_tags(setup.tracking_uri, run.info.run_id, {tracking.PARENT_TAG: setup.parent_run_id,
                                                                "unislim.trial_status": status[trial]})
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, "KILLED" if status[trial] == "stopped" else
                                  "FAILED" if status[trial] == "error" else "FINISHED")


# ------------------------------------------------------------------------------------ outputs


def _row(result, keys: tuple[str, ...]) -> dict[str, Any]:
    m = dict(result.metrics or {})
    row = {"trial_id": m.get("trial_id") or Path(result.path).name, **{k: _plain(result.config.get(k)) for k in keys}}
    if result.error is not None:
        return {**row, "status": "error", "error": str(result.error).splitlines()[0][:300], "score": -math.inf}
    status = m.get("status", "error")
    if status == "running":  # its last report was not the final one: ASHA stopped it
        status = "stopped"
    row.update({"status": status, "phase": m.get("phase"), "error": m.get("error", ""),
                "score": float(m.get("score", -math.inf)), "quality": m.get("quality"),
                "cost_relative": m.get("cost_relative"), "checkpoint": m.get("checkpoint", "")})
    row.update({k: m.get(k) for k in (*REPORTED.values(), "latency_ms")})
    row.update({k: v for k, v in m.items() if k.split("/")[0] in PER_TASK})
    return row


def _plain(v: Any) -> Any:
    """numpy scalars → Python (yaml, json)."""
    return v.item() if hasattr(v, "item") else v


def _export_best(cfg: Any, values: dict[str, Any], path: Path) -> None:
    """This config with the best trial's values, running partition → adapt → evaluate instead of the search."""
    data = {k: getattr(cfg, k).model_dump(mode="json") if hasattr(getattr(cfg, k), "model_dump") else getattr(cfg, k)
            for k in ("experiment", "seed", "model", "data", "pretrain", "shard", "score", "partition", "adapt",
                      "evaluate", "search")}
    data["name"] = "search-best"
    for key, value in values.items():
        section, _, field = key.partition(".")
        data[section][field] = value
    data["partition"]["enabled"] = data["adapt"]["enabled"] = True
    data["search"]["enabled"] = False
    data["prune"] = {"enabled": False}
    load_config(data=json.loads(json.dumps(data)))  # raises ConfigError if the export would not run
    header = f"# best trial of a unislim search: {values}\n"
    path.write_text(header + yaml.safe_dump(data, sort_keys=False))


def _plot_pareto(table, dense: dict, quality: str, path: Path) -> None:
    """Quality vs active params and vs latency; the front joined and ringed, ASHA-stopped hollow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    scored = table[table.status.isin(["complete", "stopped"])]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, cost, front, label in ((axes[0], "params_active", "pareto_params", "active parameters per token"),
                                   (axes[1], "latency_ms", "pareto_latency", "latency, summed over tasks (ms per sample)")):
        for status, marker in (("complete", "o"), ("stopped", "o")):
            part = scored[scored.status == status]
            ax.scatter(part[cost], part["quality"], s=40, marker=marker,
                       facecolors="tab:blue" if status == "complete" else "none", edgecolors="tab:blue",
                       label="trial" if status == "complete" else "stopped by ASHA after EFT")
        on = scored[scored[front]].sort_values(cost)
        ax.plot(on[cost], on["quality"], "-", color="tab:red", lw=1.2)
        ax.scatter(on[cost], on["quality"], s=110, facecolors="none", edgecolors="tab:red", lw=1.5,
                   label="Pareto front")
        ax.scatter([dense[cost]], [dense["quality"]], marker="*", s=160, color="black", label="dense source")
        for _, r in on.iterrows():
            ax.annotate(r["trial_id"].split("_")[-1], (r[cost], r["quality"]), fontsize=7,
                        xytext=(4, -10), textcoords="offset points")
        ax.set_xlabel(label)
        ax.set_ylabel(f"quality ({quality})")
        ax.grid(alpha=0.3)
    axes[0].xaxis.set_major_formatter(lambda x, _: f"{x / 1e3:,.0f}k")
    axes[0].legend(fontsize=7, loc="lower right")
    axes[1].set_title("timed inside the trials, concurrent ones sharing the machine", fontsize=8)
    fig.suptitle(f"search: {len(scored)} trial models, quality vs cost")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
