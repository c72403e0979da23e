"""Stage outputs: cache keys, atomic commit, stale temp folders (no Ray needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from unislim.pipelines.store import MANIFEST, Manifest, StageOutput, cache_key, hash_tree, load_complete
from unislim.pipelines import context as stage_a, graph as stage_b  # any two modules stand in for stage code


def test_cache_key_depends_on_config_inputs_and_code():
    base = cache_key("evaluate", {"evaluate": {"steps": 20}}, {"checkpoint": "abc"}, stage_a)
    assert base == cache_key("evaluate", {"evaluate": {"steps": 20}}, {"checkpoint": "abc"}, stage_a)
    assert base != cache_key("evaluate", {"evaluate": {"steps": 21}}, {"checkpoint": "abc"}, stage_a)
    assert base != cache_key("evaluate", {"evaluate": {"steps": 20}}, {"checkpoint": "abd"}, stage_a)
    assert base != cache_key("evaluate", {"evaluate": {"steps": 20}}, {"checkpoint": "abc"}, stage_b)


@pytest.mark.parametrize("stage,changed", [("adapt", "pipelines/training.py"), ("prune", "stages/prune.py"),
                                           ("partition", "modeling/surgery/moe/mlp.py"),
                                           ("evaluate", "modeling/families/digits/family.py"),
                                           ("search", "stages/adapt.py")])
def test_cache_key_covers_every_unislim_module_a_stage_imports(stage, changed, monkeypatch):
    """An edit to any module a stage runs (imported anywhere in it, transitively) changes its key."""
    from pathlib import Path

    from unislim.pipelines import store

    module = f"unislim.stages.{stage}"
    root = Path(store.__file__).resolve().parents[1]
    assert root / changed in store.code_closure(module)
    before = cache_key(stage, {}, {}, module)
    original = store._source
    monkeypatch.setattr(store, "_source", lambda p: original(p) + ("\n# edited" if p == root / changed else ""))
    assert cache_key(stage, {}, {}, module) != before
    unrelated = "stages/mod.py" if stage != "search" else "stages/accelerate.py"
    assert root / unrelated not in store.code_closure(module)


def test_cache_key_changes_with_the_adapter():
    """model.adapter is part of the `model` section every stage that reads a model keys on."""
    from tests.conftest import tiny_pipeline
    from unislim.config import load_config
    from unislim.pipelines.graph import plan

    def keys(adapter):
        cfg = load_config(data=tiny_pipeline(model={"adapter": adapter}))
        return {s.id: cache_key(s.id, s.config_slice(cfg), {}, s.module.__name__) for s in plan(cfg)}

    plain, custom = keys(None), keys({"mlp_act": "act_fn"})
    for stage in ("score", "prune", "evaluate", "pretrain"):
        assert plain[stage] != custom[stage], stage
    assert plain["shard"] == custom["shard"]  # reads no model


def test_commit_is_atomic_and_complete(tmp_path):
    with StageOutput(tmp_path, "s", "k1") as out:
        (out.tmp / "a.txt").write_text("hello")
        (out.tmp / "sub").mkdir()
        (out.tmp / "sub" / "b.bin").write_bytes(b"\0\1")
        assert load_complete(out.final) is None  # nothing visible before the commit
        out.commit(Manifest(stage="s", key="k1", dir="", outputs={"a": "a.txt"}))
    m = load_complete(tmp_path / "s" / "k1")
    assert m is not None and m.cached and set(m.files) == {"a.txt", "sub/b.bin"}
    assert m.artifact("a").path == str(tmp_path / "s" / "k1" / "a.txt")
    assert m.hash == Manifest(stage="x", key="y", dir="", files=hash_tree(tmp_path / "s" / "k1")).hash
    assert not list((tmp_path / "s").glob(".tmp-*"))


def test_failed_stage_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with StageOutput(tmp_path, "s", "k") as out:
            (out.tmp / "half.txt").write_text("...")
            raise RuntimeError("boom")
    assert os.listdir(tmp_path / "s") == []


def test_killed_writer_leaves_no_complete_output_and_is_cleaned(tmp_path):
    code = f"""
import os, signal
from unislim.pipelines.store import StageOutput
out = StageOutput({str(tmp_path)!r}, "s", "k").__enter__()
(out.tmp / "x").write_text("partial")
os.kill(os.getpid(), signal.SIGKILL)
"""
    subprocess.run([sys.executable, "-c", code])
    stale = list((tmp_path / "s").glob(".tmp-k~*"))
    assert len(stale) == 1 and load_complete(tmp_path / "s" / "k") is None
    with StageOutput(tmp_path, "s", "k") as out:  # the next writer removes the dead one's folder
        out.commit(Manifest(stage="s", key="k", dir=""))
    assert not stale[0].exists() and load_complete(tmp_path / "s" / "k") is not None


def test_incomplete_manifest_is_not_reused(tmp_path):
    folder = tmp_path / "s" / "k"
    folder.mkdir(parents=True)
    (folder / MANIFEST).write_text(json.dumps({"stage": "s", "key": "k", "dir": "", "complete": False}))
    assert load_complete(folder) is None
    (folder / MANIFEST).write_text("{not json")
    assert load_complete(folder) is None
