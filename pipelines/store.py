"""Stage outputs on disk: cache keys, manifests, atomic writes.

`<runs-dir>/<stage>/<key>/` holds a stage's files and, written last, `manifest.json`
(`{"stage", "key", "inputs", "files", "complete": true, ...}`). A stage writes into a temp
folder beside it which is renamed into place only once the manifest is inside, so a stage killed
half-way never leaves an output that looks complete, and a rerun finds and reuses what finished.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import unislim

MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Artifact:
    """One named output of a stage, as a downstream stage sees it."""

    stage: str
    path: str  # absolute path of the file or folder
    hash: str  # content hash of the producing stage's whole output


@dataclass
class Manifest:
    stage: str
    key: str
    dir: str  # absolute path of the output folder
    inputs: dict[str, str] = field(default_factory=dict)  # input name -> upstream output hash
    outputs: dict[str, str] = field(default_factory=dict)  # output name -> path relative to dir
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    metrics: dict[str, Any] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    elapsed_s: float = 0.0
    complete: bool = True
    cached: bool = False  # set on load, never saved

    @property
    def hash(self) -> str:
        """Content hash of the output: what downstream cache keys depend on."""
        return _sha(json.dumps(self.files, sort_keys=True))[:16]

    def artifact(self, output: str) -> Artifact:
        if output not in self.outputs:
            raise KeyError(f"stage {self.stage!r} has no output {output!r} (it has {sorted(self.outputs)})")
        return Artifact(self.stage, str(Path(self.dir) / self.outputs[output]), self.hash)

    def save(self, folder: Path) -> None:
        data = asdict(self)
        data.pop("cached")
        data["dir"] = str(folder)  # where it will live, not the temp folder
        (Path(folder) / MANIFEST).write_text(json.dumps(data, indent=2, sort_keys=True))


def _sha(data: str | bytes) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def hash_tree(root: Path) -> dict[str, str]:
    """sha256 of every file under root, by relative path (the manifest's `files`)."""
    root = Path(root)
    if root.is_file():
        return {root.name: file_sha256(root)}
    return {str(p.relative_to(root)): file_sha256(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != MANIFEST}


@functools.lru_cache(maxsize=1)
def modeling_code_hash() -> str:
    """Hash of every source file under modeling/: a change to model code invalidates outputs."""
    root = Path(__file__).resolve().parents[1] / "modeling"
    return _sha("".join(f"{p.relative_to(root)}\n{p.read_text()}" for p in sorted(root.rglob("*.py"))))[:16]


def cache_key(stage: str, config_slice: dict[str, Any], inputs: dict[str, str], module: Any) -> str:
    """Hash of (stage, its config slice, its inputs' hashes, package version, stage and model code)."""
    payload = {
        "stage": stage,
        "config": config_slice,
        "inputs": inputs,
        "version": unislim.__version__,
        "code": _sha(inspect.getsource(module))[:16],
        "modeling": modeling_code_hash(),
    }
    return _sha(json.dumps(payload, sort_keys=True, default=str))[:16]


def load_complete(folder: Path) -> Manifest | None:
    """The manifest of a finished output, or None if the folder is missing or incomplete."""
    try:
        data = json.loads((Path(folder) / MANIFEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if not data.get("complete"):
        return None
    data["dir"] = str(folder)
    return Manifest(**{**data, "cached": True})


class StageOutput:
    """A temp folder that becomes `<runs>/<stage>/<key>/` only when `commit` is called.

    Usage: `with StageOutput(runs, stage, key) as out: write into out.tmp ...; out.commit(manifest)`.
    Leaving the block without a commit (an exception) deletes the temp folder.
    """

    def __init__(self, runs_dir: Path, stage: str, key: str):
        self.final = Path(runs_dir) / stage / key
        self.tmp = self.final.parent / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:6]}"

    def __enter__(self) -> StageOutput:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        for stale in self.final.parent.glob(f".tmp-{self.final.name}-*"):  # left by a killed run
            pid = stale.name.split("-")[2]
            if not _pid_alive(int(pid)):
                shutil.rmtree(stale, ignore_errors=True)
        self.tmp.mkdir()
        return self

    def commit(self, manifest: Manifest) -> Manifest:
        manifest.files = hash_tree(self.tmp)
        manifest.dir = str(self.final)
        manifest.save(self.tmp)
        if self.final.exists():  # a forced rerun replaces the old output
            old = self.final.parent / f".old-{self.final.name}-{uuid.uuid4().hex[:6]}"
            os.rename(self.final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.rename(self.tmp, self.final)
        return manifest

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
