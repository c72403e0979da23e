"""Every stage on Janus and Emu3 (issue: real unified models): a tiny Janus and a tiny Emu3, built
from config with processors made offline and trained for seconds on digits scenes
(tests/families/tiny_unified.py), run with `unislim run examples/<family>.yaml` (tiny overrides) on
und + gen Parquet rendered from the digits scenes (RGB PNGs at the processor's size, questions,
answers, prompts) through shard → score → prune → partition → adapt (EFT, then MoE; DeepSpeed
ZeRO-2 on the Ray Data shards of both tasks) → mod → accelerate → evaluate of every checkpoint
(search and mod left out: LEFT_OUT). Real Ray (the session cluster), real DeepSpeed, real MLflow (sqlite)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient

from tests.conftest import FULL_STAGES, REPO, flow_yaml, stage_outputs
from tests.families.tiny_unified import digits_rows, trained, write_rows
from unislim.modeling.loading import load_model
from unislim.modeling.surgery.mod.layer import routed_layers
from unislim.modeling.surgery.moe.convert import moe_mlps

pytestmark = pytest.mark.slow
FAMILIES = ("janus", "emu3")
# Left out, for the suite's 25 minutes: search and mod run the same generic code on every family
# (tests/stages/test_causal_lm.py runs both on Qwen2; on Janus both passed on 2026-12-01), and MoD's
# cached decoding is tested on both families in tests/families/test_unified_surgery.py.
LEFT_OUT = set() if FULL_STAGES else {"search", "mod"}


def overrides(model: Path, und: Path, gen: Path) -> list[str]:
    return [f"model.path={model}", "name=test-unified", "shard.n=4", f"shard.tasks.0.path={und}",
            f"shard.tasks.1.path={gen}", "data.heldout=4", "score.num_workers=1", "score.batch_size=4",
            "score.use_gpu=false", "score.step_buckets=2", "partition.num_experts=4", "partition.num_shared=1",
            "partition.layers=[0, 1]", "partition.impl=loop", "adapt.eft_steps=2", "adapt.moe_steps=2",
            "adapt.batch_size=4", "adapt.warmup_steps=1", "adapt.checkpoint_every=2", "adapt.log_every=1",
            "adapt.num_workers=1", "adapt.use_gpu=false", "mod.steps=2", "mod.batch_size=4", "mod.warmup_steps=1",
            "mod.log_every=1", "mod.checkpoint_every=2", "mod.num_workers=1", "mod.use_gpu=false",
            "mod.max_importance=2.0",
            "search.space=" + flow_yaml({"partition.num_experts": {"grid": [4, 8]}, "adapt.eft_steps": {"grid": [0]}}),
            "search.max_concurrent_trials=1", "search.asha=false", "search.n_und=4", "search.n_gen=2",
            "accelerate.latency_repeats=1", "accelerate.latency_und_samples=2", "accelerate.latency_gen_samples=2",
            "accelerate.token_pruning.layer=0", "accelerate.layer_skip.every=2", "accelerate.layer_skip.count=1",
            "evaluate.n_und=4", "evaluate.n_gen=4"]


@pytest.fixture(scope="module", params=FAMILIES)
def unified_run(request, ray_cluster, tmp_path_factory):
    from unislim.cli import main

    torch.set_num_threads(1)
    name = request.param
    root = tmp_path_factory.mktemp(f"unified-{name}")
    model = trained(name, root / "model")
    und = write_rows(root / "und.parquet", "und", 16, seed=1)  # calib: first 4; held out: 4; train: 12
    gen = write_rows(root / "gen.parquet", "gen", 16, seed=2)
    runs = root / "runs"
    off = [f"{stage}.enabled=false" for stage in sorted(LEFT_OUT)]
    rc = main(["run", str(REPO / "examples" / f"{name}.yaml"), *overrides(model, und, gen), *off,
               f"experiment=unislim-test-{name}", "--runs-dir", str(runs)])
    assert rc == 0
    outputs = stage_outputs(runs, LEFT_OUT)
    return name, model, runs, outputs


def _outputs(family, model):
    g = torch.Generator()
    return (family.eval_batch(model, "und", digits_rows("und", 2, seed=9), g).logits,
            family.eval_batch(model, "gen", digits_rows("gen", 2, seed=9), g).logits)


def test_every_checkpoint_reloads_with_identical_outputs_and_its_processor(unified_run):
    from unislim.modeling.families import family_of_checkpoint

    name, source, _, out = unified_run
    checkpoints = sorted({p.parent for stage in out.values() for p in stage.rglob("config.json")})
    assert len(checkpoints) >= 4 + ("mod" in out)  # prune, partition, adapt (eft, moe)[, mod]
    for folder in checkpoints:
        assert (folder / "processor_config.json").exists() and (folder / "tokenizer.json").exists(), folder
        family = family_of_checkpoint(folder)
        assert family.name == name
        a, b = load_model(folder), load_model(folder)
        for x, y in zip(_outputs(family, a), _outputs(family, b)):
            assert torch.equal(x, y), folder
    assert moe_mlps(load_model(out["partition"] / "checkpoint"))
    assert moe_mlps(load_model(out["adapt"] / "checkpoint"))
    if "mod" in out:
        assert routed_layers(load_model(out["mod"] / "checkpoint"))
    widths = json.loads((out["prune"] / "prune.json").read_text())["removed"]["und"]["widths"]
    assert len(set(widths.values())) > 1  # per-layer widths (global allocation)


def test_score_records_every_task_and_buckets_image_tokens(unified_run):
    from safetensors import safe_open

    _, _, _, out = unified_run
    with safe_open(str(out["score"] / "scores" / "gen.safetensors"), "pt") as f:
        gen = set(f.keys())
    with safe_open(str(out["score"] / "scores" / "und.safetensors"), "pt") as f:
        und = set(f.keys())
    assert {"bucket.0/layer_importance.block", "bucket.1/layer_importance.block"} <= gen
    assert not any(k.startswith("bucket.") for k in und) and "layer_importance.block" in und


def test_adapt_trains_eft_then_moe_on_both_tasks_shards(unified_run):
    _, _, _, out = unified_run
    log = json.loads((out["adapt"] / "history.json").read_text())
    assert list(log["history"]) == ["eft", "moe"] and [e["step"] for e in log["history"]["moe"]] == [1, 2]
    assert log["data"]["eft"]["rows_per_step"] == {"und": 2, "gen": 2}
    for entry in log["history"]["eft"] + log["history"]["moe"]:  # loss = answer NLL + image-token NLL (+ aux)
        assert entry["und_loss"] > 0 and entry["gen_loss"] > 0 and entry["loss"] >= entry["und_loss"] + entry["gen_loss"]
    partition = json.loads((out["partition"] / "partition.json").read_text())
    assert partition["dense_tasks"] == ["und"]  # understanding runs the MLPs dense, image tokens sparse
    metrics = json.loads((out["evaluate-partition"] / "metrics.json").read_text())
    assert metrics["params/active_gen"] < json.loads((out["evaluate"] / "metrics.json").read_text())["params/active_gen"]


def test_evaluation_agrees_with_itself_and_logs_the_generated_grid(unified_run):
    name, _, runs, out = unified_run
    m = json.loads((out["evaluate"] / "metrics.json").read_text())
    for task in ("und", "gen"):
        assert m[f"agreement/{task}"] == 1.0 and m[f"kl/{task}"] == 0.0 and m[f"nll/{task}"] > 0
        assert m[f"flops/{task}_per_sample"] > 0 and m[f"params/active_{task}"] > 0
    assert 0.0 <= m["exact_match/und"] <= 1.0
    assert (out["evaluate"] / "plots" / "generated_gen.png").stat().st_size > 0
    manifest = json.loads(next((runs / "evaluate").glob("*/manifest.json")).read_text())
    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    artifacts = {a.path for a in client.list_artifacts(manifest["mlflow_run_id"], "plots")}
    assert "plots/generated_gen.png" in artifacts
    moe = json.loads((out["evaluate-partition"] / "metrics.json").read_text())
    assert moe["agreement/und"] == 1.0 and moe["agreement/gen"] < 1.0  # dense for answers, routed for images


def test_accelerate_measures_each_technique_and_says_why_the_head_cache_does_not_apply(unified_run):
    _, _, _, out = unified_run
    report = json.loads((out["accelerate"] / "accelerate.json").read_text())
    assert set(report["not_applicable"]) == {"head_cache"}
    rows, work = report["rows"], report["work"]
    assert {"baseline", "task_pruning", "layer_skip", "cfg_schedule", "token_pruning", "combined"} <= set(rows)
    for r in rows.values():
        assert r["speedup/und"] > 0 and r["speedup/gen"] > 0 and r["speedup_cpu/gen"] > 0
    base = rows["baseline"]
    assert rows["task_pruning"]["params/active_und"] < base["params/active_und"]
    assert rows["task_pruning"]["flops/gen_decode_per_sample"] < base["flops/gen_decode_per_sample"]
    assert rows["layer_skip"]["flops/gen_decode_per_sample"] < base["flops/gen_decode_per_sample"]
    assert work["layer_skip"]["layer_skips_per_image"] > 0
    assert work["cfg_schedule"]["uncond_passes_per_image"] < work["cfg_schedule"]["image_tokens"]
    assert work["token_pruning"]["image_tokens_hidden_per_answer"] > 0
    assert rows["layer_skip"]["nll/gen"] == base["nll/gen"]  # a decode-time technique: teacher forcing unchanged
    assert "not applicable" in (out["accelerate"] / "accelerate.md").read_text()


def test_pruning_90_percent_of_the_neurons_raises_both_nlls(unified_run, tmp_path):
    """90% of the LM's MLP neurons gone: held-out answer NLL and image-token NLL both rise by over 10%."""
    from tests.conftest import stage_config
    from unislim.pipelines.context import StageContext
    from unislim.pipelines.store import Artifact
    from unislim.stages import prune
    from unislim.stages.evaluate import evaluate_checkpoint

    name, source, _, out = unified_run
    data = yaml.safe_load((REPO / "examples" / f"{name}.yaml").read_text())
    data["model"]["path"] = str(source)
    data["prune"].update({"sparsity": 0.9, "allocation": "uniform"})
    cfg = stage_config(data, "prune")
    prune.run(cfg, {"checkpoint": Artifact("source", str(source), "h"),
                    "scores": Artifact("score", str(out["score"] / "scores"), "h")}, StageContext.local("prune", tmp_path))
    base = json.loads((out["evaluate"] / "metrics.json").read_text())
    metrics = evaluate_checkpoint(tmp_path / "checkpoint", source=source, heldout=out["shard"] / "heldout",
                                  model_cfg=cfg.model, n_gen=1, progress=lambda m: None)
    # 2026-12-01 (models of `trained`, 200 steps): Janus und 0.81 -> 1.73, gen 2.70 -> 3.30 (+22%);
    # Emu3 und 0.69 -> 3.01, gen 1.49 -> 1.76 (+18%).
    for task in ("und", "gen"):
        assert metrics[f"nll/{task}"] > 1.10 * base[f"nll/{task}"], (task, metrics[f"nll/{task}"], base[f"nll/{task}"])
