"""Stage outputs under concurrency and damage: two writers of one key, readers during a forced
replace, temp folders of other hosts, and cached files that went missing or changed (no Ray)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from unislim.pipelines.store import (MANIFEST, Manifest, StageOutput, check_complete, hash_tree, load_complete,
                                     stage_lock)

# One writer: COUNT commits of one key (a forced rerun each time: replace), each with its own
# content; after its first commit it checks the key after every commit of its own. A reader
# process (WRITER=0) reads the key in a loop until told to stop. Each prints a JSON line.
_RACER = """
import json, os, sys, time, traceback
from pathlib import Path
from unislim.pipelines.store import Manifest, StageOutput, load_complete

runs, writer, count, stop = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
final = runs / "s" / "k"
errors, misses, reads, seen = [], 0, 0, False
while not (runs / "go").exists():
    time.sleep(0.01)
if writer:
    for i in range(count):
        try:
            with StageOutput(runs, "s", "k") as out:
                (out.tmp / "w.txt").write_text(f"writer {writer} commit {i}\\n" * (1 + i % 7))
                out.commit(Manifest(stage="s", key="k", dir="", outputs={"w": "w.txt"},
                                    metrics={"writer": writer, "i": i}), replace=True)
            m = load_complete(final)
            misses += m is None
            reads += 1
        except Exception:
            errors.append(traceback.format_exc(limit=3))
else:
    while not stop.exists():
        m = load_complete(final)
        seen = seen or m is not None
        misses += seen and m is None  # once there, never absent again
        reads += 1
print(json.dumps({"errors": errors[:3], "n_errors": len(errors), "misses": misses, "reads": reads}))
"""


def test_two_processes_commit_one_key_200_times_with_no_error_and_no_false_miss(tmp_path):
    script = tmp_path / "racer.py"
    script.write_text(_RACER)
    stop = tmp_path / "stop"
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path), str(w), "200", str(stop)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for w in (1, 2, 0)]
    (tmp_path / "go").touch()
    results = []
    for i, p in enumerate(procs):
        if i == 2:
            stop.touch()  # the writers are done: stop the reader
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    writers, reader = results[:2], results[2]
    assert [w["n_errors"] for w in writers] == [0, 0], [w["errors"] for w in writers]
    assert [w["reads"] for w in writers] == [200, 200]
    assert sum(w["misses"] for w in writers) == 0 and reader["misses"] == 0, results
    assert reader["reads"] > 0
    final = load_complete(tmp_path / "s" / "k")
    assert final is not None and final.files == hash_tree(tmp_path / "s" / "k")  # the manifest is its folder's
    assert f"commit {final.metrics['i']}" in (tmp_path / "s" / "k" / "w.txt").read_text()
    assert not [p.name for p in (tmp_path / "s").iterdir() if p.name.startswith((".tmp-", ".old-"))]


def test_a_second_writer_without_force_keeps_the_first_output(tmp_path):
    with StageOutput(tmp_path, "s", "k") as a, StageOutput(tmp_path, "s", "k") as b:
        (a.tmp / "x").write_text("a")
        (b.tmp / "x").write_text("b")
        first = a.commit(Manifest(stage="s", key="k", dir="", mlflow_run_id="run-a"))
        second = b.commit(Manifest(stage="s", key="k", dir="", mlflow_run_id="run-b"), replace=False)
    assert first.mlflow_run_id == "run-a" and second.mlflow_run_id == "run-a"  # b is told whose output it is
    assert (tmp_path / "s" / "k" / "x").read_text() == "a" and os.listdir(tmp_path / "s") == ["k"]


def test_the_manifest_on_disk_names_the_final_folder(tmp_path):
    with StageOutput(tmp_path, "s", "k") as out:
        (out.tmp / "a.txt").write_text("hello")
        out.commit(Manifest(stage="s", key="k", dir=str(out.tmp)))
    on_disk = json.loads((tmp_path / "s" / "k" / MANIFEST).read_text())
    assert on_disk["dir"] == str(tmp_path / "s" / "k") and ".tmp-" not in on_disk["dir"]
    assert on_disk["stats"]["a.txt"][0] == 5


def _committed(tmp_path: Path) -> Path:
    with StageOutput(tmp_path, "s", "k") as out:
        (out.tmp / "a.bin").write_bytes(b"\1" * 100)
        (out.tmp / "sub").mkdir()
        (out.tmp / "sub" / "b.txt").write_text("bee")
        out.commit(Manifest(stage="s", key="k", dir=""))
    return tmp_path / "s" / "k"


def test_a_cached_output_with_a_missing_file_is_not_reused(tmp_path):
    folder = _committed(tmp_path)
    (folder / "sub" / "b.txt").unlink()
    manifest, problem = check_complete(folder)
    assert manifest is None and problem == "1 missing (e.g. sub/b.txt) of 2 files"


def test_a_cached_output_with_a_changed_file_is_not_reused(tmp_path):
    folder = _committed(tmp_path)
    (folder / "a.bin").write_bytes(b"\2" * 100)  # same size, new content (and a new mtime)
    assert check_complete(folder) == (None, "1 changed (e.g. a.bin) of 2 files")
    (folder / "a.bin").write_bytes(b"\1" * 101)
    assert check_complete(folder) == (None, "1 changed (e.g. a.bin) of 2 files")


def test_a_touched_file_with_its_content_is_still_good(tmp_path):
    folder = _committed(tmp_path)
    os.utime(folder / "a.bin", ns=(time.time_ns(), time.time_ns() + 10**9))  # a copy without -p
    manifest, problem = check_complete(folder)
    assert problem is None and manifest is not None


def test_a_manifest_from_before_stats_is_checked_by_hash(tmp_path):
    folder = _committed(tmp_path)
    data = json.loads((folder / MANIFEST).read_text())
    del data["stats"]
    (folder / MANIFEST).write_text(json.dumps(data))
    assert load_complete(folder) is not None
    (folder / "sub" / "b.txt").write_text("bzz")
    assert check_complete(folder) == (None, "1 changed (e.g. sub/b.txt) of 2 files")


def test_temp_folders_of_other_hosts_and_live_processes_are_never_swept(tmp_path):
    stage = tmp_path / "s"
    stage.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    host = StageOutput(tmp_path, "s", "k").tmp.name.split("~")[1]
    mine_dead = stage / f".tmp-k~{host}~{dead}~aaaaaa"
    mine_alive = stage / f".tmp-k~{host}~{os.getpid()}~bbbbbb"
    other_host = stage / f".tmp-k~not-{host}~{dead}~cccccc"  # the same PID means nothing over there
    old_dead = stage / f".old-k~{host}~{dead}~dddddd"
    for folder in (mine_dead, mine_alive, other_host, old_dead):
        folder.mkdir()
        (folder / "work").write_text("in progress")
    with StageOutput(tmp_path, "s", "k") as out:
        assert socket.gethostname().split(".")[0][:3] in out.tmp.name or host == "localhost"
        out.commit(Manifest(stage="s", key="k", dir=""))
    assert not mine_dead.exists() and not old_dead.exists()
    assert mine_alive.exists() and other_host.exists()


def test_a_second_holder_of_a_stage_lock_waits_and_is_told_who_holds_it(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", f"""
import sys, time
from unislim.pipelines.store import stage_lock
with stage_lock({str(tmp_path)!r}, "s", "k"):
    print("held", flush=True)
    time.sleep(3)
"""], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    told, t0 = [], time.monotonic()
    with stage_lock(tmp_path, "s", "k", on_wait=told.append):
        waited = time.monotonic() - t0
    holder.wait(timeout=30)
    assert len(told) == 1 and f"pid {holder.pid} on {socket.gethostname()}" in told[0], told
    assert waited > 1.0


def test_a_killed_holder_frees_its_stage_lock(tmp_path):
    subprocess.run([sys.executable, "-c", f"""
import os, signal
from unislim.pipelines.store import stage_lock
with stage_lock({str(tmp_path)!r}, "s", "k"):
    os.kill(os.getpid(), signal.SIGKILL)
"""])
    told = []
    with stage_lock(tmp_path, "s", "k", on_wait=told.append):
        pass
    assert told == []


@pytest.mark.parametrize("content", ["", "{not json", "[1, 2]", '{"complete": true, "stage": "s", "surprise": 1}'])
def test_a_broken_manifest_is_a_miss_not_a_crash(tmp_path, content):
    folder = tmp_path / "s" / "k"
    folder.mkdir(parents=True)
    (folder / MANIFEST).write_text(content)
    assert load_complete(folder) is None
    assert load_complete(tmp_path / "s" / "k" / MANIFEST) is None  # a file where a folder should be
