"""`unislim validate | run | evaluate | ui` — see DESIGN.md "Contracts" for the exit codes.

Exit codes: 0 ok; 1 a pipeline stage failed; 2 the input is wrong (the config, a path it names,
a flag, a checkpoint, an address): one line naming it, with a traceback only under --debug.
Overrides (`key=value`) may come anywhere after the command, before or after the flags.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

from .config import ConfigError, load_config
from .errors import CheckpointError, StorageError, UserError

CONNECT_TIMEOUT_S = 30.0  # --connect-timeout default (env UNISLIM_CONNECT_TIMEOUT)


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    overrides = [a for a in extra if "=" in a and not a.startswith("-")]
    unknown = [a for a in extra if a not in overrides]
    if unknown or (overrides and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
    if overrides:  # `unislim run FILE --runs-dir D key=value`: overrides after the flags
        args.overrides = [*args.overrides, *overrides]
    args.debug = args.debug or os.environ.get("UNISLIM_DEBUG", "") not in ("", "0")
    try:
        return _COMMANDS[args.command](args)
    except UserError as e:
        return _report(args.command, e, args.debug)


def _report(command: str, e: BaseException, debug: bool, code: int = 2) -> int:
    if debug:
        traceback.print_exception(e)
    print(f"unislim {command}: {e}", file=sys.stderr, flush=True)
    return getattr(e, "exit_code", code)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unislim", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true",
                        help="print the traceback of an input error too (env UNISLIM_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="print the traceback of an input error too (env UNISLIM_DEBUG=1)")
    offline = "do not check the paths the config names (a config meant for a cluster whose paths are not here)"

    p = sub.add_parser("validate", parents=[common], help="check a pipeline file; exit 2 listing every error")
    p.add_argument("file")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--offline", action="store_true", help=offline)

    p = sub.add_parser("run", parents=[common], help="run the pipeline as a Ray DAG of stages")
    p.add_argument("file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. pretrain.lr=3e-4 (anywhere among the args)")
    p.add_argument("--runs-dir", default="runs", help="stage outputs, mlflow.db and artifacts (default ./runs)")
    p.add_argument("--only", action="append", default=[], metavar="STAGE",
                   help="run STAGE and what it needs (repeatable)")
    p.add_argument("--force", action="append", default=[], metavar="STAGE",
                   help="recompute STAGE even if its output is cached (repeatable)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local cluster)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default sqlite:///<runs-dir>/mlflow.db)")
    p.add_argument("--connect-timeout", type=float, default=None, metavar="SECONDS",
                   help=f"wait at most this long for the Ray cluster (--address) and the MLflow server "
                        f"(--tracking-uri http://...) to answer (default {CONNECT_TIMEOUT_S:g}, env "
                        "UNISLIM_CONNECT_TIMEOUT)")
    p.add_argument("--offline", action="store_true", help=offline)

    p = sub.add_parser("evaluate", parents=[common], help="evaluate a checkpoint folder and print its metrics")
    p.add_argument("checkpoint")
    p.add_argument("--json", action="store_true", help="print metrics as JSON")
    p.add_argument("--n-und", type=int, default=40, help="samples per understanding question type (>= 1)")
    p.add_argument("--n-gen", type=int, default=24, help="prompts per GenEval category (>= 1)")
    p.add_argument("--steps", type=int, default=20, help="denoising steps (1..1000)")
    p.add_argument("--cfg-scale", type=float, default=None, help="CFG scale in [1, 50] (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=None, help="also write metrics.json, metrics.md and plots here")
    p.add_argument("--heldout", default=None, metavar="DIR",
                   help="held-out rows: a folder of <task>/*.parquet (a shard stage's heldout/) for NLL, agreement, "
                        "FLOPs and latency per task (default: the family's own held-out data, where it has some)")
    p.add_argument("--source", default=None, metavar="CHECKPOINT",
                   help="the model the checkpoint was made from, for agreement and KL (default: itself)")

    p = sub.add_parser("ui", parents=[common], help="MLflow UI over the runs dir, on 127.0.0.1")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    return parser


# ---------------------------------------------------------------------------------------------
# Commands


def _validate(args) -> int:
    cfg = _load(args)
    if not args.offline:
        _check_paths(cfg, args.file)
    note = " (paths not checked: --offline)" if args.offline else ""
    print(f"{args.file}: valid{note}; stages: {' → '.join(s.id for s in _plan(cfg, args.file))}")
    return 0


def _run(args) -> int:
    cfg = _load(args)  # everything here runs before Ray starts
    if not args.offline:
        _check_paths(cfg, args.file)
    timeout = _connect_timeout(args.connect_timeout)
    runs_dir = _writable_dir(args.runs_dir, "--runs-dir")
    from unislim.pipelines import tracking

    uri = tracking.default_tracking_uri(runs_dir, args.tracking_uri)
    flag = "--tracking-uri" if args.tracking_uri else "MLFLOW_TRACKING_URI"
    tracking.check_tracking_uri(uri, flag)
    tracking.check_server(uri, timeout, flag)
    from unislim.pipelines.runner import ClusterError, run_pipeline

    previous = os.environ.get("UNISLIM_CONNECT_TIMEOUT")
    os.environ["UNISLIM_CONNECT_TIMEOUT"] = str(timeout)  # read by the runner's Ray connect
    try:
        result = run_pipeline(cfg, runs_dir=runs_dir, only=args.only, force=args.force,
                              address=args.address, tracking_uri=args.tracking_uri)
    except (ClusterError, ValueError, FileNotFoundError) as e:
        return _report("run", e, args.debug)
    except KeyboardInterrupt:
        print("unislim run: interrupted (Ctrl-C); the stages it stopped and the pipeline run are marked KILLED "
              f"in MLflow, finished stage outputs stay cached in {runs_dir}", file=sys.stderr, flush=True)
        return 130
    finally:
        if previous is None:
            os.environ.pop("UNISLIM_CONNECT_TIMEOUT", None)
        else:
            os.environ["UNISLIM_CONNECT_TIMEOUT"] = previous
    if result.ok:
        return 0
    failed = [r for r in result.stages.values() if r.status == "failed"]
    if failed and all(r.user_error for r in failed):  # bad input met inside a stage: exit 2, one line
        print(f"unislim run: {'; '.join(f'stage {r.id}: {r.error}' for r in failed)}", file=sys.stderr, flush=True)
        return 2
    return 1


_EVALUATE_FLAGS = {"n_und": "--n-und", "n_gen": "--n-gen", "steps": "--steps", "cfg_scale": "--cfg-scale",
                   "seed": "--seed"}


def _evaluate(args) -> int:
    from pydantic import ValidationError

    from unislim.config import EvaluateConfig
    from unislim.modeling.checks import check_checkpoint

    values = {field: getattr(args, field) for field in _EVALUATE_FLAGS}
    try:  # the same bounds as the config's evaluate section
        EvaluateConfig(**values)
    except ValidationError as e:
        raise ConfigError("command line", [
            f"{_EVALUATE_FLAGS[err['loc'][0]]}: {err['msg']} (got {err['input']!r})" for err in e.errors()]) from None
    out_dir = _writable_dir(args.out_dir, "--out-dir") if args.out_dir is not None else None
    check_checkpoint(args.checkpoint)
    if args.source is not None:
        check_checkpoint(args.source)
    if args.heldout is not None and not Path(args.heldout).is_dir():
        raise StorageError(f"--heldout {args.heldout}", "is not a folder of <task>/*.parquet")
    from unislim.stages.evaluate import evaluate_checkpoint, metrics_table

    progress = (lambda m: print(m, file=sys.stderr)) if args.json else print
    try:
        metrics = evaluate_checkpoint(args.checkpoint, **values, source=args.source, heldout=args.heldout,
                                      out_dir=out_dir, progress=progress)
    except (FileNotFoundError, ValueError) as e:
        return _report("evaluate", e, args.debug)
    print(json.dumps(metrics, indent=2) if args.json else metrics_table(metrics))
    return 0


def _ui(args) -> int:
    if not 1 <= args.port <= 65535:
        raise ConfigError("command line", [f"--port: must be in 1..65535 (got {args.port})"])
    runs = _writable_dir(args.runs_dir, "--runs-dir")
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", f"sqlite:///{runs / 'mlflow.db'}",
           "--default-artifact-root", (runs / "artifacts").as_uri(), "--host", args.host, "--port", str(args.port),
           "--workers", "1"]  # one local user: 1 worker starts in seconds instead of half a minute
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")  # no background job runners
    print(f"MLflow UI on http://{args.host}:{args.port}  (store {runs / 'mlflow.db'})", flush=True)
    os.execv(sys.executable, cmd)


_COMMANDS = {"validate": _validate, "run": _run, "evaluate": _evaluate, "ui": _ui}


# ---------------------------------------------------------------------------------------------
# Checks before any work starts


def _load(args):
    cfg = load_config(args.file, args.overrides)
    _plan(cfg, args.file)
    return cfg


def _plan(cfg, source: str):
    """The stage graph; a config the planner refuses is a config error (exit 2), not a crash."""
    from unislim.pipelines.graph import plan

    try:
        return plan(cfg)
    except ValueError as e:
        raise ConfigError(source, [str(e)]) from None


def _connect_timeout(flag: float | None) -> float:
    raw = flag if flag is not None else os.environ.get("UNISLIM_CONNECT_TIMEOUT") or CONNECT_TIMEOUT_S
    name = "--connect-timeout" if flag is not None else "UNISLIM_CONNECT_TIMEOUT"
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 3600:
        raise ConfigError("command line", [f"{name}: must be seconds in (0, 3600] (got {raw!r})"])
    return value


def _writable_dir(path: str, flag: str) -> Path:
    """`path` as a folder unislim can write to (created if missing); `StorageError` naming `flag`."""
    folder = Path(path).expanduser()
    where = f"{flag} {path}"
    if folder.exists() and not folder.is_dir():
        raise StorageError(where, "is a file; expected a folder (it is created if missing)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StorageError(where, f"cannot be created ({e.strerror or e})") from None
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".unislim-write-check-"):
            pass
    except OSError as e:
        raise StorageError(where, f"is not writable ({e.strerror or e})") from None
    return folder.resolve()


def _check_paths(cfg, source: str) -> None:
    """Every field named `path` in the config: exists, is the right kind, is readable (all at once)."""
    problems = []
    for key, value, section in _named_paths(cfg.model_dump(mode="json")):
        try:
            _check_path(key, value, section, cfg)
        except UserError as e:
            problems.append(f"{key}: {e}")
    if not problems:
        problems = _check_data(cfg)
    if problems:
        raise ConfigError(source, problems)


DATA_CHECK_ROWS = 100_000  # rows per Parquet file checked up front (shard checks every row again)


def _check_data(cfg) -> list[str]:
    """Every Parquet task's rows against the checkpoint's family (finite values and ranges, lengths
    against the model's context, token ids against its vocabulary): one line per rejected task,
    with counts, before anything starts."""
    from unislim.errors import DataError

    tasks = [("shard.tasks", t) for t in cfg.shard.tasks] + [("data.tasks", t) for t in (cfg.data.tasks or [])]
    tasks = [(k, t) for k, t in tasks if t.source == "parquet"]
    if not tasks:
        return []
    import pyarrow.parquet as pq

    from unislim.modeling.families import from_model_config, get_family
    from unislim.modeling.loading import read_config

    if cfg.model.source == "path":
        family, model_config = from_model_config(cfg.model.path, cfg.model), read_config(cfg.model.path)
    else:
        family, model_config = get_family("digits"), None
    problems = []
    for section, task in tasks:
        path = Path(task.path).expanduser()
        for f in sorted(path.rglob("*.parquet")) if path.is_dir() else [path]:
            try:
                table = pq.ParquetFile(f).read_row_group(0) if pq.ParquetFile(f).num_row_groups else pq.read_table(f)
                table = table.slice(0, DATA_CHECK_ROWS)
                family.check_table(task.kind, table, f"{section}[{task.name}] ({f})", model_config)
            except DataError as e:
                problems.append(str(e))
            except Exception as e:  # noqa: BLE001 - an unreadable file: say which
                problems.append(f"{section}[{task.name}] ({f}): cannot be read as Parquet ({type(e).__name__}: {e})")
    return problems


def _named_paths(node: Any, prefix: str = "") -> list[tuple[str, str, dict]]:
    """(dotted key, value, the mapping that holds it) of every non-null field called `path`."""
    found = []
    if isinstance(node, dict):
        for k, v in node.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if k == "path" and isinstance(v, str):
                found.append((key, v, node))
            else:
                found += _named_paths(v, key)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found += _named_paths(v, f"{prefix}[{i}]")
    return found


def _check_path(key: str, value: str, section: dict, cfg) -> None:
    path = Path(value).expanduser()
    shown = value if path.is_absolute() else f"{value} (relative to {Path.cwd()})"
    if section.get("source") == "path" or key == "model.path":  # a checkpoint folder
        from unislim.modeling.checks import check_checkpoint

        try:
            check_checkpoint(path, trust_remote_code=bool(getattr(cfg.model, "trust_remote_code", False)))
        except CheckpointError as e:
            raise CheckpointError(shown if e.where == str(path) else e.where, e.problem) from None
        return
    if not path.exists():
        raise StorageError(shown, "does not exist")
    if not os.access(path, os.R_OK):
        raise StorageError(shown, "is not readable (permission denied)")
    if section.get("source") == "parquet":
        files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
        if not files:
            raise StorageError(shown, "is a folder with no .parquet files; expected a Parquet file or a folder of them")
        for f in files:
            _check_parquet(f)


def _check_parquet(file: Path) -> None:
    """A Parquet file starts and ends with the magic bytes PAR1 (no pyarrow needed to tell)."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as fh:
            head = fh.read(4)
            fh.seek(max(size - 4, 0))
            tail = fh.read(4)
    except OSError as e:
        raise StorageError(str(file), f"cannot be read ({e.strerror or e})") from None
    if size < 12 or head != b"PAR1" or tail != b"PAR1":
        hint = ", truncated?" if head == b"PAR1" else ""
        raise StorageError(str(file), f"is not a Parquet file ({size:,} bytes{hint}; a Parquet file starts and "
                           "ends with the bytes PAR1)")


if __name__ == "__main__":
    sys.exit(main())
