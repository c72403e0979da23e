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
