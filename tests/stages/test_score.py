"""shard → score on the tiny reference model: 1 and 2 Ray workers give the same scores, and the
neuron score matches a direct computation from captured activations."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from unislim.config import CalibrationTask, DataConfig, ModelConfig, ScoreConfig, ShardConfig
from tests.conftest import stage_config, tiny_pipeline
from unislim.modeling.families import get_family
from unislim.modeling.loading import load_model
from unislim.pipelines.context import StageContext
from unislim.pipelines.store import Artifact
from unislim.stages import score, shard

pytestmark = pytest.mark.slow


def _artifact(path) -> Artifact:
    return Artifact("test", str(path), "h")


@pytest.fixture(scope="module")
def calib(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("shard")
    cfg = stage_config(tiny_pipeline(shard={"n": 10, "rows_per_file": 3}), "shard")
    outputs = shard.run(cfg, {}, StageContext.local("shard", out))
    return {k: _artifact(out / v) for k, v in outputs.items()}


def _score(calib, checkpoint, workers, out):
    cfg = SimpleNamespace(model=ModelConfig(size="tiny"),
                          score=ScoreConfig(num_workers=workers, batch_size=3, gen_steps=4, step_buckets=2))
    score.run(cfg, {**calib, "checkpoint": _artifact(checkpoint)}, StageContext.local("score", out))
    return {t: load_file(out / "scores" / f"{t}.safetensors") for t in ("und", "gen")}


def test_shards_are_parquet_with_every_row(calib):
    files = sorted(Path(calib["calib"].path, "und").glob("part-*.parquet"))
    assert len(files) == 4 and sum(pq.read_metadata(f).num_rows for f in files) == 10
    assert set(pq.read_schema(files[0]).names) >= {"image", "question", "answer"}


def test_one_and_two_workers_agree_and_neuron_score_is_direct(tiny_run, calib, tmp_path):
    runs, result = tiny_run
    checkpoint = Path(result.stages["pretrain"].manifest.dir) / "checkpoint"
    one = _score(calib, checkpoint, 1, tmp_path / "one")
    two = _score(calib, checkpoint, 2, tmp_path / "two")
    for task in one:
        assert one[task].keys() == two[task].keys()
        for k in one[task]:
            torch.testing.assert_close(two[task][k], one[task][k], rtol=1e-6, atol=1e-12)
    assert "bucket.1/model.layers.0.mlp.neuron" in one["gen"] and "layer_importance.block" in one["und"]
    assert (tmp_path / "one" / "plots" / "neuron_overlap.png").stat().st_size > 5000

    # direct: capture h entering down_proj over the same rows, E|h| · ‖W_down[:, i]‖
    model = load_model(checkpoint)
    table = pq.read_table(Path(calib["calib"].path) / "und")
    captured = []
    down = model.model.layers[1].mlp.down_proj
    handle = down.register_forward_pre_hook(lambda m, a: captured.append(a[0].detach()))

    class _Mask:  # the family's calibrate sets these; nothing else is recorded here
        token_mask = None
        bucket = None

    recorder = _Mask()
    masks = []
    for start in range(0, table.num_rows, 4):
        get_family("digits").calibrate(model, "und", table.slice(start, 4).to_pydict(), recorder)
        masks.append(recorder.token_mask)
    handle.remove()
    h = torch.cat([c[m] for c, m in zip(captured, masks)]).double()  # (N, ff) real tokens only
    direct = h.abs().mean(0) * down.weight.double().norm(dim=0)
    torch.testing.assert_close(one["und"]["model.layers.1.mlp.neuron"], direct, rtol=1e-6, atol=1e-12)


def test_bad_user_parquet_is_named(tmp_path, ray_cluster):
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"text": ["a", "b"]}), bad)
    def cfg(task):
        return SimpleNamespace(shard=ShardConfig(tasks=[task]), data=DataConfig(), training_tasks=[], train_rows={},
                               family="causal_lm", trust_remote_code=False)

    with pytest.raises(ValueError, match=r"shard.tasks\[mine\] \(.*bad.parquet\).*missing \['input_ids'\]"):
        shard.run(cfg(CalibrationTask(name="mine", kind="text", source="parquet", path=str(bad))), {},
                  StageContext.local("shard", tmp_path / "o"))
    missing = cfg(CalibrationTask(name="gone", kind="text", source="parquet", path=str(tmp_path / "nope")))
    with pytest.raises(FileNotFoundError, match=r"shard.tasks\[gone\]"):
        shard.run(missing, {}, StageContext.local("shard", tmp_path / "o2"))
