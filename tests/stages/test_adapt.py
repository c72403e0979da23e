"""partition → adapt on the tiny model: the partition deals every neuron once with the top scores
shared, Expert-Frozen Tuning leaves the experts untouched while the MoE phase trains them, and 2 Ray
Train workers under DeepSpeed ZeRO-2 survive a worker death by resuming from their last checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from tests.conftest import tiny_pipeline
from unislim.config import load_config
from unislim.modeling.loading import load_model
from unislim.pipelines.runner import run_pipeline
from unislim.modeling.scores import calibration_scores
from unislim.modeling.surgery.moe.convert import moe_mlps

pytestmark = pytest.mark.slow

# tiny: ff 96 → 8 experts of 12 neurons; 2 shared + top-2 routed = half the neurons per token
PARTITION = {"enabled": True, "layers": [0, 1], "num_experts": 8, "num_shared": 2, "active_fraction": 0.5,
             "impl": "loop"}
ADAPT = {"enabled": True, "eft_steps": 4, "moe_steps": 12, "batch_size": 8, "num_workers": 2, "zero_stage": 2,
         "warmup_steps": 1, "checkpoint_every": 4, "log_every": 2, "max_failures": 1, "fail_at_step": 6}


@pytest.fixture(scope="module")
def adapt_run(tiny_run, ray_cluster, tmp_path_factory):
    # a copy of the session's tiny run: shard, pretrain and score are cached
    runs = Path(shutil.copytree(tiny_run[0], tmp_path_factory.mktemp("adapt-runs") / "runs"))
    cfg = load_config(data=tiny_pipeline(partition=PARTITION, adapt=ADAPT, evaluate={"enabled": False}))
    result = run_pipeline(cfg, runs_dir=runs, only=["adapt"])
    assert result.ok, {k: v.error for k, v in result.stages.items() if v.error}
    return runs, result


def _out(result, stage: str) -> Path:
    return Path(result.stages[stage].manifest.dir)


def _weights(folder: Path, part: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(folder / "model.safetensors").items() if part in k}


def test_partition_deals_every_neuron_once_with_the_top_scores_shared(adapt_run):
    _, result = adapt_run
    part = json.loads((_out(result, "partition") / "partition.json").read_text())
    _, scores = calibration_scores(_out(result, "score") / "scores", "all", "gen")
    assert part["top_k"] == 2 and sorted(part["experts"]) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    for name, experts in part["experts"].items():
        assert len(experts) == 8 and all(len(e) == 12 for e in experts)
        assert sorted(i for e in experts for i in e) == list(range(96))  # every neuron exactly once
        top = set(torch.topk(scores[f"{name}.neuron"].double(), 24).indices.tolist())
        assert set(experts[0]) | set(experts[1]) == top  # Eq. 8: the shared experts hold the top scores


def test_eft_freezes_the_experts_and_moe_adaptation_trains_them(adapt_run):
    _, result = adapt_run
    partitioned, adapted = _out(result, "partition") / "checkpoint", _out(result, "adapt")
    experts = {k: _weights(f, ".w_") for k, f in
               (("partition", partitioned), ("eft", adapted / "checkpoint-eft"), ("moe", adapted / "checkpoint"))}
    routers = {k: _weights(f, "router") for k, f in
               (("partition", partitioned), ("eft", adapted / "checkpoint-eft"))}
    assert experts["partition"] and routers["partition"]
    assert all(torch.equal(experts["partition"][k], experts["eft"][k]) for k in experts["partition"])
    assert any(not torch.equal(routers["partition"][k], routers["eft"][k]) for k in routers["partition"])
    assert any(not torch.equal(experts["eft"][k], experts["moe"][k]) for k in experts["eft"])
    model = load_model(adapted / "checkpoint")  # reloads through load_model, experts rebuilt
    assert model.config.unislim["surgery"][-1]["op"] == "moe" and len(moe_mlps(model)) == 2


def test_adapt_reads_its_batches_from_the_ray_data_shards(adapt_run):
    import pyarrow.parquet as pq

    from unislim.modeling.evaluation import columns
    from unislim.pipelines.training import row_fingerprints

    _, result = adapt_run
    log = json.loads((_out(result, "adapt") / "history.json").read_text())
    train = _out(result, "shard") / "train"
    for phase in ("eft", "moe"):
        assert log["data"][phase]["rows_per_step"] == {"und": 2, "gen": 2}  # batch 8, 2 workers, mix 0.5 / 0.5
        for task, seen in log["data"][phase]["first_rows"].items():
            written = set(row_fingerprints(columns(pq.read_table(sorted((train / task).glob("*.parquet"))))))
            assert len(seen) == 2 and set(seen) <= written, (phase, task)


def test_a_worker_death_resumes_from_the_last_checkpoint(adapt_run):
    runs, result = adapt_run
    log = json.loads((_out(result, "adapt") / "history.json").read_text())
    assert log["resumed_from"] == {"eft": [], "moe": [4]}  # died at step 6, restarted from the step-4 checkpoint
    assert [e["step"] for e in log["history"]["moe"]] == [2, 4, 6, 8, 10, 12]
    assert [e["step"] for e in log["history"]["eft"]] == [2, 4]
    (train_run,) = (runs / "ray_train").glob("adapt-*")  # both phases in one Ray Train run
    last = sorted(p for p in train_run.glob("checkpoint_*") if p.is_dir())[-1]
    assert {p.name for p in last.glob("engine-rank*.pt")} == {"engine-rank0.pt", "engine-rank1.pt"}
    assert json.loads((last / "state.json").read_text())["phase"] == 1 and not (last / "snapshots").exists()
    eft = train_run / "phases" / "eft"  # the EFT model, saved once beside the checkpoints
    assert load_file(eft / "model.safetensors").keys() == load_file(last / "model" / "model.safetensors").keys()
    client = MlflowClient(result.tracking_uri)
    run = client.search_runs([result.experiment_id], filter_string="tags.`unislim.stage` = 'adapt'")[0]
    losses = client.get_metric_history(run.info.run_id, "moe/loss")
    assert {m.step for m in losses} == {6, 8, 10, 12, 14, 16}  # logged live by rank 0, steps counted over phases
    assert (_out(result, "adapt") / "plots" / "expert_activation.png").stat().st_size > 0
