"""Shared fixtures: one Ray cluster per test session, one tiny pipeline run reused by many tests."""

from __future__ import annotations

import copy
import json
import os
import secrets
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Ray 2.60 turns token auth on for a new local cluster and would write ~/.ray/auth_token: give
# this test session (and the subprocesses it starts) its own token. Ray reads these when it is
# imported, so they are set here, before any test module imports it.
_TOKEN = Path(tempfile.mkdtemp(prefix="unislim-ray-token-")) / "auth_token"
_TOKEN.write_text(secrets.token_hex(32))
os.environ["RAY_AUTH_MODE"] = "token"
os.environ["RAY_AUTH_TOKEN_PATH"] = str(_TOKEN)
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def pytest_collection_modifyitems(config, items):
    """`cluster` tests start their own drivers (SIGKILLed ones, two at once, a second Ray node) and
    take minutes each, too long for `make test`'s 25: `make test-cluster` runs them."""
    if os.environ.get("UNISLIM_CLUSTER_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="a cluster test: `make test-cluster` (UNISLIM_CLUSTER_TESTS=1) runs it")
    for item in items:
        if "cluster" in item.keywords:
            item.add_marker(skip)


# The smallest pipeline that exercises every stage: the tiny reference model, a few steps.
TINY_PIPELINE = {
    "name": "test",
    "experiment": "unislim-test",
    "seed": 0,
    "model": {"source": "reference", "size": "tiny", "variant": "shared"},
    "pretrain": {"steps": 40, "batch_size": 16, "lr": 3e-3, "warmup_steps": 5, "checkpoint_every": 20,
                 "log_every": 10, "num_workers": 1, "cpus_per_worker": 1},
    "shard": {"n": 6, "rows_per_file": 3},
    "score": {"num_workers": 1, "batch_size": 6, "gen_steps": 2, "step_buckets": 1},
    "prune": {"method": "neurons", "component": "gen", "sparsity": 0.5},
    "evaluate": {"n_und": 3, "n_gen": 2, "steps": 4, "seed": 0},
}


def tiny_pipeline(**sections) -> dict:
    """A copy of TINY_PIPELINE with sections updated (`pretrain={"steps": 10}`)."""
    data = copy.deepcopy(TINY_PIPELINE)
    for name, values in sections.items():
        if isinstance(values, dict):
            data.setdefault(name, {}).update(values)
        else:
            data[name] = values
    return data


# The acceptance runs of real architectures (tests/stages/test_causal_lm.py, test_unified.py): every
# stage and its evaluation. For the suite's 25 minutes some kinds leave stages out;
# UNISLIM_FULL_STAGES=1 runs every stage on every kind.
ALL_STAGES = frozenset({"shard", "score", "prune", "partition", "adapt", "search", "mod", "accelerate", "evaluate",
                        "evaluate-prune", "evaluate-partition", "evaluate-adapt-eft", "evaluate-adapt",
                        "evaluate-mod", "evaluate-search"})
FULL_STAGES = os.environ.get("UNISLIM_FULL_STAGES") == "1"


def flow_yaml(value) -> str:
    """`value` as one line of YAML, for a `key=value` override."""
    import yaml

    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()


def stage_outputs(runs: Path, left_out: set[str]) -> dict[str, Path]:
    """The one complete output folder of every stage but `left_out` (and their evaluations)."""
    outputs = {}
    for stage in ALL_STAGES - left_out - {f"evaluate-{s}" for s in left_out}:
        manifests = [json.loads(p.read_text()) for p in (runs / stage).glob("*/manifest.json")]
        assert len(manifests) == 1 and manifests[0]["complete"], stage
        outputs[stage] = Path(manifests[0]["dir"])
    return outputs


def stage_config(data: dict, stage: str):
    """What stage `stage` receives as its config (`StageSpec.config`) for the pipeline `data`."""
    from unislim.config import load_config
    from unislim.pipelines.graph import plan

    cfg = load_config(data=data)
    return next(s for s in plan(cfg) if s.id == stage).config(cfg)


@pytest.fixture(scope="session")
def ray_cluster():
    """The session's one local Ray cluster (2 CPUs); yields its GCS address for subprocesses."""
    import ray

    ray.init(num_cpus=2, log_to_driver=True)  # with the dashboard: Ray Train's state queries use it
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_run(ray_cluster, tmp_path_factory):
    """One tiny pipeline run (pretrain → evaluate) shared by the tests that only read its outputs."""
    from unislim.config import load_config
    from unislim.pipelines.runner import run_pipeline

    runs = tmp_path_factory.mktemp("tiny-runs")
    result = run_pipeline(load_config(data=tiny_pipeline()), runs_dir=runs)
    assert result.ok, result.stages
    return runs, result
