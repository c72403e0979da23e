"""`unislim validate | run | evaluate | ui` — see DESIGN.md "Contracts" for the exit codes."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .config import ConfigError, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="unislim", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check a pipeline file; exit 2 listing every error")
    p.add_argument("file")
    p.add_argument("overrides", nargs="*", metavar="key=value")

    p = sub.add_parser("run", help="run the pipeline as a Ray DAG of stages")
    p.add_argument("file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. pretrain.lr=3e-4")
    p.add_argument("--runs-dir", default="runs", help="stage outputs, mlflow.db and artifacts (default ./runs)")
    p.add_argument("--only", action="append", default=[], metavar="STAGE",
                   help="run STAGE and what it needs (repeatable)")
    p.add_argument("--force", action="append", default=[], metavar="STAGE",
                   help="recompute STAGE even if its output is cached (repeatable)")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local cluster)")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default sqlite:///<runs-dir>/mlflow.db)")

    p = sub.add_parser("evaluate", help="evaluate a checkpoint folder and print its metrics")
    p.add_argument("checkpoint")
    p.add_argument("--json", action="store_true", help="print metrics as JSON")
    p.add_argument("--n-und", type=int, default=40)
    p.add_argument("--n-gen", type=int, default=24)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg-scale", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default=None, help="also write metrics.json, metrics.md and plots here")

    p = sub.add_parser("ui", help="MLflow UI over the runs dir, on 127.0.0.1")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)

    args = parser.parse_args(argv)
    return {"validate": _validate, "run": _run, "evaluate": _evaluate, "ui": _ui}[args.command](args)


def _validate(args) -> int:
    try:
        cfg = load_config(args.file, args.overrides)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    from unislim.pipelines.graph import plan

    print(f"{args.file}: valid; stages: {' → '.join(s.id for s in plan(cfg))}")
    return 0


def _run(args) -> int:
    try:
        cfg = load_config(args.file, args.overrides)  # before Ray starts
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 2
    from unislim.pipelines.runner import ClusterError, run_pipeline

    try:
        result = run_pipeline(cfg, runs_dir=args.runs_dir, only=args.only, force=args.force,
                              address=args.address, tracking_uri=args.tracking_uri)
    except (ClusterError, ValueError, FileNotFoundError) as e:
        print(f"unislim run: {e}", file=sys.stderr)
        return 2
    return 0 if result.ok else 1


def _evaluate(args) -> int:
    from unislim.stages.evaluate import evaluate_checkpoint, metrics_table

    progress = (lambda m: print(m, file=sys.stderr)) if args.json else print
    try:
        metrics = evaluate_checkpoint(args.checkpoint, n_und=args.n_und, n_gen=args.n_gen, steps=args.steps,
                                      cfg_scale=args.cfg_scale, seed=args.seed, out_dir=args.out_dir,
                                      progress=progress)
    except (FileNotFoundError, ValueError) as e:
        print(f"unislim evaluate: {e}", file=sys.stderr)
        return 2
    print(json.dumps(metrics, indent=2) if args.json else metrics_table(metrics))
    return 0


def _ui(args) -> int:
    runs = Path(args.runs_dir).resolve()
    runs.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", f"sqlite:///{runs / 'mlflow.db'}",
           "--default-artifact-root", (runs / "artifacts").as_uri(), "--host", args.host, "--port", str(args.port),
           "--workers", "1"]  # one local user: 1 worker starts in seconds instead of half a minute
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")  # no background job runners
    print(f"MLflow UI on http://{args.host}:{args.port}  (store {runs / 'mlflow.db'})", flush=True)
    os.execv(sys.executable, cmd)


if __name__ == "__main__":
    sys.exit(main())
