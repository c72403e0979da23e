"""pipeline.yaml validation: every shipped YAML validates; every mistake is reported at once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from unislim.config import ConfigError, PipelineConfig, flatten, load_config

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p for p in REPO.rglob("*.y*ml")
                 if p.suffix in (".yaml", ".yml") and not any(part.startswith(".") for part in p.relative_to(REPO).parts)
                 and "runs" not in p.relative_to(REPO).parts)


def _pipeline_files():
    return [p for p in SHIPPED if p.parent.name != "cluster"]


@pytest.mark.parametrize("path", _pipeline_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_pipeline_validates(path):
    cfg = load_config(path)
    assert isinstance(cfg, PipelineConfig)


@pytest.mark.parametrize("path", [p for p in SHIPPED if p.parent.name == "cluster"], ids=lambda p: p.name)
def test_cluster_yaml_parses(path):
    assert list(yaml.safe_load_all(path.read_text()))


def test_three_mistakes_reported_together_with_paths(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("colour: blue\nevaluate: {steps: 0}\npretrain: {steps: 100, warmup_steps: 500}\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    text = str(e.value)
    assert "colour: unknown key" in text
    assert "evaluate.steps:" in text and "(got 0)" in text
    assert "pretrain.warmup_steps: must be < pretrain.steps (got 500 >= 100)" in text
    assert len(e.value.errors) == 3


def test_validate_cli_exit_codes_and_prints_every_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("colour: blue\nevaluate: {steps: 0}\npretrain: {batch_size: 10, num_workers: 3}\n")
    cli = [sys.executable, "-m", "unislim.cli"]
    proc = subprocess.run([*cli, "validate", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    for path in ("colour", "evaluate.steps", "pretrain.batch_size"):
        assert f"\n  {path}:" in proc.stderr, proc.stderr
    ok = subprocess.run([*cli, "validate", str(REPO / "pipeline.yaml")], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr


def test_overrides_are_typed_and_validated():
    cfg = load_config(data={}, overrides=["pretrain.lr=3e-4", "model.variant=mot", "evaluate.cfg_scale=3"])
    assert cfg.pretrain.lr == pytest.approx(3e-4) and cfg.model.variant == "mot" and cfg.evaluate.cfg_scale == 3.0
    with pytest.raises(ConfigError) as e:
        load_config(data={}, overrides=["pretrain.lrr=1", "model.variant=big", "seed"])
    assert {err.split(":")[0] for err in e.value.errors} == {"seed", "pretrain.lrr", "model.variant"}


def test_cross_section_rule_names_both_sides():
    with pytest.raises(ConfigError) as e:
        load_config(data={"model": {"source": "path", "path": "/x"}})
    assert any(err.startswith("pretrain.enabled: pretraining only applies") for err in e.value.errors)
    with pytest.raises(ConfigError) as e:
        load_config(data={"model": {"source": "path"}, "pretrain": {"enabled": False}})
    assert e.value.errors[0].startswith("model.path: is required")


def test_flatten_and_digest_are_stable():
    cfg = load_config(data={})
    flat = flatten(cfg)
    assert flat["pretrain.lr"] == cfg.pretrain.lr and "model.size" in flat
    assert cfg.digest() == load_config(data={}).digest() != load_config(data={"seed": 1}).digest()


def test_every_field_is_documented():
    def walk(model):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, PipelineConfig.__mro__[1]):
                walk(ann)
    walk(PipelineConfig)


@pytest.mark.parametrize("overrides, message", [
    (["partition.enabled=true", "partition.num_shared=64"],
     "partition.num_shared: must be < partition.num_experts (got 64 >= 64)"),
    (["partition.enabled=true", "partition.active_fraction=0.1"], "partition.active_fraction: "),
    (["adapt.enabled=true"], "adapt.enabled: adaptation trains the partitioned model"),
    (["partition.enabled=true", "adapt.enabled=true", "adapt.fail_at_step=50", "adapt.max_failures=1"],
     "adapt.fail_at_step: must come after the first checkpoint"),
    (["partition.enabled=true", "adapt.enabled=true", "adapt.fail_at_step=200"],
     "adapt.fail_at_step: an injected failure needs adapt.max_failures >= 1"),
    (["partition.enabled=true", "partition.calibration=nope"], "partition.calibration: must be 'all' or a task"),
])
def test_moe_rules_name_the_bad_key(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(REPO / "pipeline.yaml", overrides)
    assert any(message in line for line in e.value.errors), e.value.errors


def test_partition_top_k_is_the_active_budget_minus_shared():
    cfg = load_config(REPO / "pipeline.yaml", ["partition.enabled=true"])
    assert cfg.partition.top_k == 24  # 50% of 64 experts = 8 shared + 24 routed (the paper's layout)
