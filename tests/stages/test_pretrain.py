"""The pretrain stage's checkpoint is the trained model: it reloads with from_pretrained and gives
the same outputs as the weights Ray Train's last checkpoint holds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel

from unislim.modeling.families.digits import UniDigitsModel, make_batch, reference_config

pytestmark = pytest.mark.slow


def test_checkpoint_reloads_with_identical_outputs(tiny_run):
    runs, result = tiny_run
    out = Path(result.stages["pretrain"].manifest.dir)
    reloaded = AutoModel.from_pretrained(out / "checkpoint").eval()
    assert json.loads((out / "checkpoint" / "unislim.json").read_text())["description"] == "reference-tiny-shared"

    ray_checkpoints = sorted(p for p in (runs / "ray_train").glob("pretrain-*/checkpoint_*") if p.is_dir())
    trained = UniDigitsModel(reference_config("tiny", "shared")).eval()
    trained.load_state_dict(load_file(ray_checkpoints[-1] / "model" / "model.safetensors"))
    batch = make_batch(8, torch.Generator().manual_seed(123))
    with torch.no_grad():
        a, b = reloaded(**batch), trained(**batch)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.velocity, b.velocity)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    prompts = batch["gen_prompt_ids"]
    assert torch.equal(reloaded.generate_images(prompts, steps=3, generator=g1),
                       trained.generate_images(prompts, steps=3, generator=g2))
    snapshot = out / "snapshots" / "step-4"  # 10% of 40 steps
    assert AutoModel.from_pretrained(snapshot).num_parameters() == reloaded.num_parameters()


def test_pretrain_reads_its_batches_from_the_ray_data_shards(tiny_run):
    """The rows of the first step are rows of the shard stage's train/ Parquet (not batches drawn in
    the worker), in the proportions of the mix."""
    import pyarrow.parquet as pq

    from unislim.pipelines.training import row_fingerprints
    from unislim.modeling.evaluation import columns

    _, result = tiny_run
    log = json.loads((Path(result.stages["pretrain"].manifest.dir) / "history.json").read_text())
    assert log["data"]["rows_per_step"] == {"und": 8, "gen": 8}  # batch 16, mix 0.5 / 0.5
    train = Path(result.stages["shard"].manifest.dir) / "train"
    for task, seen in log["data"]["first_rows"].items():
        table = pq.read_table(sorted((train / task).glob("*.parquet")))
        written = set(row_fingerprints(columns(table)))
        assert len(seen) == 8 and set(seen) <= written, task
