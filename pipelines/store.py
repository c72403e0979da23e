"""Stage outputs on disk: cache keys, manifests, atomic writes.

`<runs-dir>/<stage>/<key>/` holds a stage's files and, written last, `manifest.json`
(`{"stage", "key", "inputs", "files", "complete": true, ...}`). A stage writes into a temp
folder beside it which is renamed into place only once the manifest is inside, so a stage killed
half-way never leaves an output that looks complete, and a rerun finds and reuses what finished.
"""

from __future__ import annotations

import ast
import functools
import hashlib
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


def hash_tree(root: Path, large: int | None = None) -> dict[str, str]:
    """sha256 of every file under root, by relative path (the manifest's `files`). With `large`,
    files of at least that many bytes are identified by size and modification time instead of
    read in full (a user's multi-GB checkpoint, hashed on every run otherwise)."""
    root = Path(root)

    def ident(p: Path) -> str:
        st = p.stat()
        return f"size={st.st_size},mtime={st.st_mtime_ns}" if large is not None and st.st_size >= large else \
            file_sha256(p)

    if root.is_file():
        return {root.name: ident(root)}
    return {str(p.relative_to(root)): ident(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != MANIFEST}


def _imports(path: Path, package: str) -> set[str]:
    """unislim modules `path` imports anywhere (top level or inside functions), as dotted names."""
    tree = ast.parse(path.read_text(), str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)  # `from pkg import submodule`
    return {m for m in found if m == "unislim" or m.startswith("unislim.")}


def _module_file(name: str) -> Path | None:
    """The source file of a unislim module by its dotted name, without importing it (the top-level
    folders pipelines/, stages/ and modeling/ are the subpackages unislim.pipelines, ...)."""
    root = Path(unislim.__file__).resolve().parents[1]
    parts = name.split(".")
    base = {"modeling": root / "modeling", "stages": root / "stages", "pipelines": root / "pipelines"}.get(
        parts[1] if len(parts) > 1 else "", None)
    folder, rest = (base, parts[2:]) if base is not None else (root / "unislim", parts[1:])
    target = folder.joinpath(*rest)
    for candidate in (target.with_suffix(".py"), target / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None  # `from module import name`: an attribute, not a module


@functools.cache
def code_closure(module: str) -> tuple[Path, ...]:
    """The source files of `module` and of every unislim module it imports, transitively (found by
    reading the sources, so nothing is imported)."""
    seen: dict[str, Path | None] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = seen[name] = _module_file(name)
        if path is None:
            continue
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        todo.extend(_imports(path, package))
        parent = name.rpartition(".")[0]
        if parent:
            todo.append(parent)  # importing a submodule runs its packages' __init__
    return tuple(sorted({p for p in seen.values() if p is not None}))


def code_hash(module: str) -> str:
    """Hash of the source of `module` and of everything it imports from unislim."""
    root = Path(unislim.__file__).resolve().parents[1]
    parts = []
    for path in code_closure(module):
        try:
            name = str(path.resolve().relative_to(root))
        except ValueError:
            name = path.name
        parts.append(f"{name}\n{_source(path)}")
    return _sha("".join(parts))[:16]


def _source(path: Path) -> str:
    return path.read_text()


def cache_key(stage: str, config_slice: dict[str, Any], inputs: dict[str, str], module: Any) -> str:
    """Hash of (stage, its config slice, its inputs' hashes, package version, the code it runs: the
    stage module and every unislim module it imports, transitively)."""
    name = module if isinstance(module, str) else module.__name__
    payload = {
        "stage": stage,
        "config": config_slice,
        "inputs": inputs,
        "version": unislim.__version__,
        "code": code_hash(name),
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
