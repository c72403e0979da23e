"""Stage outputs on disk: cache keys, manifests, atomic writes, locks.

`<runs-dir>/<stage>/<key>/` holds a stage's files and, written last, `manifest.json`
(`{"stage", "key", "dir", "inputs", "files", "stats", "complete": true, ...}`). A stage writes into a
temp folder beside it (`.tmp-<key>~<host>~<pid>~<random>`) which is renamed into place only once
the manifest is inside, so a stage killed half-way never leaves an output that looks complete, and
a rerun finds and reuses what finished.

Several writers (two `unislim run` on one runs dir, nodes sharing it over NFS):
- `stage_lock` (`.unislim/locks/<stage>/<key>.run`, held while a stage computes a key) makes a second run wait for
  the first and then reuse its output, instead of computing it twice into one Ray Train folder;
- `commit` swaps the temp folder in under `.unislim/locks/<stage>/<key>.commit`, and a reader that finds no
  complete output looks again under that lock, so it never sees the gap of a forced replace;
- a temp folder is swept only by its own host, and only once its PID is gone there.
The locks are `filelock` (flock) files: on NFS they need a server with lock support (NFSv4, or
v3 with lockd).

A cached output is trusted only if its files are as committed: each file's size, and its
modification time or else its sha256 (`verify`), so a deleted or edited file means a recompute.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from filelock import FileLock

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
    stats: dict[str, list[int]] = field(default_factory=dict)  # relative path -> [size, mtime_ns]
    metrics: dict[str, Any] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    elapsed_s: float = 0.0
    complete: bool = True
    cached: bool = False  # set on load, never saved
    warnings: list[str] = field(default_factory=list)  # this run's MLflow trouble with it, never saved

    @property
    def hash(self) -> str:
        """Content hash of the output: what downstream cache keys depend on."""
        return _sha(json.dumps(self.files, sort_keys=True))[:16]

    def artifact(self, output: str) -> Artifact:
        if output not in self.outputs:
            raise KeyError(f"stage {self.stage!r} has no output {output!r} (it has {sorted(self.outputs)})")
        return Artifact(self.stage, str(Path(self.dir) / self.outputs[output]), self.hash)

    def save(self, folder: Path) -> None:
        """Write `manifest.json` into `folder` (the temp folder: `dir` is where it will live)."""
        data = asdict(self)
        data.pop("cached")
        data.pop("warnings")
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


def file_stats(root: Path) -> dict[str, list[int]]:
    """[size, mtime_ns] of every file under root, by relative path (the manifest's `stats`)."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            st = p.stat()
            out[str(p.relative_to(root))] = [st.st_size, st.st_mtime_ns]
    return out


def verify(folder: Path, manifest: Manifest) -> str | None:
    """None if every file of `manifest` is in `folder` as committed, else what is wrong (one line).

    Cheap: a file whose size and modification time match is trusted; one whose time changed but
    size did not is hashed (a `cp` without -p keeps the content); a missing file or another size
    is a change. Manifests written before `stats` existed are checked by hash."""
    missing, changed = [], []
    for rel, sha in manifest.files.items():
        path = Path(folder) / rel
        try:
            st = path.stat()
        except OSError:
            missing.append(rel)
            continue
        size_mtime = manifest.stats.get(rel)
        if size_mtime is not None and st.st_size != size_mtime[0]:
            changed.append(rel)
        elif size_mtime is None or st.st_mtime_ns != size_mtime[1]:
            if not path.is_file() or file_sha256(path) != sha:
                changed.append(rel)
    if not missing and not changed:
        return None
    parts = [f"{len(missing)} missing (e.g. {missing[0]})"] if missing else []
    parts += [f"{len(changed)} changed (e.g. {changed[0]})"] if changed else []
    return f"{' and '.join(parts)} of {len(manifest.files)} files"


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


def _read(folder: Path, check_files: bool) -> tuple[Manifest | None, str | None]:
    """(manifest, None) for a complete output; (None, why) otherwise (why is None: nothing there)."""
    try:
        data = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        return None, None if isinstance(e, (FileNotFoundError, NotADirectoryError)) else f"manifest unreadable ({e})"
    if not isinstance(data, dict) or not data.get("complete"):
        return None, None
    data["dir"] = str(folder)  # where it is now (a runs dir may be moved or mounted elsewhere)
    known = set(Manifest.__dataclass_fields__) - {"cached", "warnings"}
    try:
        manifest = Manifest(**{k: v for k, v in data.items() if k in known}, cached=True)
    except TypeError as e:
        return None, f"manifest malformed ({e})"
    problem = verify(folder, manifest) if check_files else None
    return (None, problem) if problem else (manifest, None)


def check_complete(folder: Path, check_files: bool = True) -> tuple[Manifest | None, str | None]:
    """The manifest of a finished output whose files are intact, else (None, what is wrong).

    What is wrong is None when there is simply no complete output (never written, or half-written
    by a run that was killed). A miss is confirmed under the commit lock: a forced rerun replacing
    the output in another process leaves a moment with no folder at `folder`, and a reader must not
    take that moment for a miss."""
    manifest, problem = _read(folder, check_files)
    if manifest is not None:
        return manifest, None
    lock = _commit_lock_path(Path(folder))
    if not lock.exists():
        return None, problem
    try:
        with FileLock(lock):
            return _read(folder, check_files)
    except OSError:  # a read-only runs dir (someone browsing it): no lock to take
        return _read(folder, check_files)


def load_complete(folder: Path, check_files: bool = True) -> Manifest | None:
    """The manifest of a finished, intact output, or None (see `check_complete`)."""
    return check_complete(folder, check_files)[0]


def _host() -> str:
    """This machine's name as it may appear in a file name ('~' separates the fields)."""
    return "".join(c if c.isalnum() or c in ".-_" else "_" for c in socket.gethostname()) or "localhost"


def _lock_path(final: Path, kind: str) -> Path:
    """`<runs>/.unislim/locks/<stage>/<key>.<kind>`: the `commit` and `run` locks, the `holder` note
    (outside the stage folder, which holds outputs and temp folders only)."""
    return final.parent.parent / ".unislim" / "locks" / final.parent.name / f"{final.name}.{kind}"


def _commit_lock_path(final: Path) -> Path:
    return _lock_path(final, "commit")


@contextmanager
def stage_lock(runs_dir: Path, stage: str, key: str,
               on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold `<runs>/.unislim/locks/<stage>/<key>.run` while computing that output.

    A second run that needs the same output waits here (`on_wait` is told once who holds it) and
    then finds it complete. The lock goes with its holder's process, so a killed run frees it."""
    final = Path(runs_dir) / stage / key
    _lock_path(final, "run").parent.mkdir(parents=True, exist_ok=True)
    lock, holder = FileLock(_lock_path(final, "run")), _lock_path(final, "holder")
    try:
        lock.acquire(timeout=0)
    except TimeoutError:
        if on_wait is not None:
            try:
                who = holder.read_text().strip()
            except OSError:
                who = "another process"
            on_wait(who or "another process")
        lock.acquire()
    try:
        holder.write_text(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}\n")
        yield
    finally:
        lock.release()


class StageOutput:
    """A temp folder that becomes `<runs>/<stage>/<key>/` only when `commit` is called.

    Usage: `with StageOutput(runs, stage, key) as out: write into out.tmp ...; out.commit(manifest)`.
    Leaving the block without a commit (an exception) deletes the temp folder.
    """

    def __init__(self, runs_dir: Path, stage: str, key: str):
        self.final = Path(runs_dir) / stage / key
        self.tmp = self.final.parent / f".tmp-{key}~{_host()}~{os.getpid()}~{uuid.uuid4().hex[:6]}"

    def __enter__(self) -> StageOutput:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        for prefix in (".tmp-", ".old-"):  # left by a killed run
            for stale in self.final.parent.glob(f"{prefix}{self.final.name}~*"):
                _, host, pid, _ = (stale.name.split("~") + ["", "", ""])[:4]
                # a PID means something only on its own host: another node's folder is never touched
                if host == _host() and pid.isdigit() and not _pid_alive(int(pid)):
                    shutil.rmtree(stale, ignore_errors=True)
        self.tmp.mkdir()
        return self

    def commit(self, manifest: Manifest, replace: bool = True) -> Manifest:
        """Move the temp folder into place with `manifest` inside; return the manifest in place.

        If a complete output is already there (another run finished the same key first), it is
        replaced when `replace` (a forced rerun), else kept and this one discarded: the manifest
        returned is then the other run's (`mlflow_run_id` names it)."""
        manifest.files = hash_tree(self.tmp)
        manifest.stats = file_stats(self.tmp)
        manifest.dir = str(self.final)
        manifest.complete = True
        manifest.save(self.tmp)
        old = None
        _commit_lock_path(self.final).parent.mkdir(parents=True, exist_ok=True)
        with FileLock(_commit_lock_path(self.final)):
            if self.final.exists():
                if not replace:
                    theirs, _ = _read(self.final, check_files=True)
                    if theirs is not None:
                        return theirs
                old = self.final.parent / f".old-{self.final.name}~{_host()}~{os.getpid()}~{uuid.uuid4().hex[:6]}"
                os.rename(self.final, old)
            os.rename(self.tmp, self.final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
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
