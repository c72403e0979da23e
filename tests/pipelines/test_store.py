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
