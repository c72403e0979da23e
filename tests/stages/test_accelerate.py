"""Stage `accelerate` without Ray: a tiny reference checkpoint, synthetic per-task scores, every
technique alone and combined; the files and keys DESIGN.md "Contracts" promises; the wiring."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from unislim.config import AccelerateConfig, ConfigError, EvaluateConfig, ModelConfig, load_config
from unislim.modeling.adapters import adapter_for
from unislim.modeling.families.digits import UniDigitsModel, reference_config
from unislim.pipelines.context import StageContext
from unislim.pipelines.graph import plan
from unislim.pipelines.store import Artifact
from unislim.stages import accelerate

from ..conftest import tiny_pipeline


def _inputs(tmp_path) -> dict[str, Artifact]:
    torch.manual_seed(0)
    model = UniDigitsModel(reference_config("tiny", "shared"))
    model.save_pretrained(tmp_path / "checkpoint")
    (tmp_path / "scores").mkdir()
    g = torch.Generator().manual_seed(1)
    for task in ("und", "gen"):
        scores = {f"{m.name}.neuron": torch.rand(m.width, generator=g) for m in adapter_for(model).mlps(model, task)}
        save_file(scores, tmp_path / "scores" / f"{task}.safetensors", metadata={"kind": task, "task": task})
    return {"checkpoint": Artifact("pretrain", str(tmp_path / "checkpoint"), "h"),
            "scores": Artifact("score", str(tmp_path / "scores"), "h")}


def test_stage_reports_each_technique_and_the_combination(tmp_path):
    a = AccelerateConfig(enabled=True, task_pruning={"full_last_steps": 1}, layer_skip={"every": 2},
                         latency_repeats=1, latency_und_samples=3, latency_gen_samples=2)
    cfg = SimpleNamespace(model=ModelConfig(size="tiny"), evaluate=EvaluateConfig(n_und=2, n_gen=1, steps=4),
                          accelerate=a)
    out = tmp_path / "out"
    files = accelerate.run(cfg, _inputs(tmp_path), StageContext.local("accelerate", out))
    assert all((out / f).exists() for f in files.values())

    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("speedup/und", "speedup/gen", "mme/overall", "geneval/overall", "fid/gen", "flops/gen_per_sample",
                "latency_ms/und_per_sample", "params/total", "params/active_und", "params/active_gen"):
        assert isinstance(metrics[key], float | int), key
    report = json.loads((out / "accelerate.json").read_text())
    names = ["baseline", "task_pruning", "layer_skip", "cfg_schedule", "head_cache", "token_pruning", "combined", "all"]
    assert list(report["rows"]) == names
    rows = report["rows"]
    assert rows["combined"]["model"] == metrics["model"] == "accelerate:prune=0.5/0.5,tau=1+cache=backbone/2+vnorm=0.75@0"
    assert rows["all"]["model"].startswith("accelerate:prune=0.5/0.5,tau=1+skip=1/2+cfg=")
    assert rows["baseline"]["speedup/und"] == 1.0 and rows["baseline"]["speedup/gen"] == 1.0
    assert rows["all"]["flops/gen_per_sample"] < rows["combined"]["flops/gen_per_sample"] < rows["baseline"][
        "flops/gen_per_sample"] / 2
    assert rows["token_pruning"]["flops/und_per_sample"] < rows["baseline"]["flops/und_per_sample"]
    assert rows["task_pruning"]["params/total"] > rows["baseline"]["params/total"]  # two cuts stored besides the full
    assert rows["task_pruning"]["params/active_und"] < rows["baseline"]["params/active"]
    assert report["work"]["head_cache"]["backbone_calls"] < report["work"]["head_cache"]["head_calls"]
    assert (out / "accelerate.md").read_text().count("\n| ") == len(names)
    assert (out / "plots" / "side_by_side.png").stat().st_size > 5000
    assert (out / "plots" / "generated_grid.png").exists()


def test_combined_must_name_enabled_techniques():
    with pytest.raises(ConfigError, match=r"accelerate.combined: must name enabled techniques.*\['layer_skip'\]"):
        load_config(data=tiny_pipeline(accelerate={"enabled": True, "layer_skip": {"enabled": False},
                                                   "combined": ["layer_skip", "head_cache"]}))


def test_off_by_default_and_wired_after_score():
    assert not AccelerateConfig().enabled
    assert "accelerate" not in [s.id for s in plan(load_config("pipeline.yaml"))]
    spec = {s.id: s for s in plan(load_config(data=tiny_pipeline(accelerate={"enabled": True})))}["accelerate"]
    assert spec.inputs == {"checkpoint": ("pretrain", "checkpoint"), "scores": ("score", "scores"),
                           "heldout": ("shard", "heldout"), "tasks": ("shard", "tasks")}
    assert spec.num_cpus == 1 and spec.sections == ("model", "evaluate", "accelerate")
