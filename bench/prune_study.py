"""The pruning study of RESULTS.md (the paper's Tables 2, 3, 6 and its calibration ablation).

Given a pipeline's `pretrain` checkpoint and `score` output, prunes the model several ways with the
`prune` stage and evaluates each with the `evaluate` stage, in this process (no Ray, no MLflow):

    python bench/prune_study.py --checkpoint runs/pretrain/<key>/checkpoint \
        --scores runs/score/<key>/scores --out runs/studies/prune-shared

Prints a markdown table and writes `<out>/prune_study.json`.
"""

from __future__ import annotations

from pathlib import Path
import sys

# bench/accelerate.py is named like the `accelerate` package, which transformers imports when it is on the path;
# take bench/ (sys.path[0] for a script, inherited by Ray workers) off the path before anything imports it.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import json
import time
from types import SimpleNamespace

from unislim.config import EvaluateConfig, ModelConfig, PruneConfig
from unislim.pipelines.context import StageContext
from unislim.pipelines.store import Artifact
from unislim.stages import prune
from unislim.stages.evaluate import evaluate_checkpoint

# (label, prune settings): depth vs neurons on the understanding component at equal sparsity,
# neurons of the generation component, and task-aligned vs mismatched calibration.
VARIANTS = [
    ("und: blocks 25%", dict(method="blocks", component="und", sparsity=0.25)),
    ("und: neurons 25%", dict(method="neurons", component="und", sparsity=0.25)),
    ("und: blocks 50%", dict(method="blocks", component="und", sparsity=0.5)),
    ("und: neurons 50%", dict(method="neurons", component="und", sparsity=0.5)),
    ("gen: blocks 25%", dict(method="blocks", component="gen", sparsity=0.25)),
    ("gen: neurons 25%", dict(method="neurons", component="gen", sparsity=0.25)),
    ("gen: neurons 50%", dict(method="neurons", component="gen", sparsity=0.5)),
    ("und: neurons 50%, gen calibration", dict(method="neurons", component="und", sparsity=0.5, calibration="gen")),
    ("gen: neurons 50%, und calibration", dict(method="neurons", component="gen", sparsity=0.5, calibration="und")),
]
KEYS = ("mme/overall", "geneval/overall", "fid/gen", "params/total", "params/active")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--scores", required=True, help="the score stage's scores/ folder")
    ap.add_argument("--out", required=True)
    ap.add_argument("--n-und", type=int, default=40)
    ap.add_argument("--n-gen", type=int, default=24)
    ap.add_argument("--only", nargs="*", default=None, help="labels to run (default: all)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ev = EvaluateConfig(n_und=args.n_und, n_gen=args.n_gen)

    def evaluate(path: Path) -> dict:
        return evaluate_checkpoint(path, n_und=ev.n_und, n_gen=ev.n_gen, steps=ev.steps, cfg_scale=ev.cfg_scale,
                                   seed=ev.seed, progress=lambda m: None)

    rows = [("baseline", {}, evaluate(Path(args.checkpoint)))]
    print(f"baseline: {_fmt(rows[0][2])}", flush=True)
    for label, settings in VARIANTS:
        if args.only and label not in args.only:
            continue
        t0 = time.time()
        folder = out / label.replace(" ", "_").replace(":", "").replace(",", "").replace("%", "pct")
        cfg = SimpleNamespace(model=ModelConfig(), prune=PruneConfig(**settings))
        inputs = {"checkpoint": Artifact("pretrain", args.checkpoint, ""), "scores": Artifact("score", args.scores, "")}
        try:
            prune.run(cfg, inputs, StageContext.local("prune", folder))
        except ValueError as e:  # e.g. a mixture-of-transformers copy the calibration task never runs through
            print(f"{label}: n/a ({e})", flush=True)
            continue
        metrics = evaluate(folder / "checkpoint")
        rows.append((label, settings, metrics))
        print(f"{label}: {_fmt(metrics)}  ({time.time() - t0:.0f}s)", flush=True)

    (out / "prune_study.json").write_text(json.dumps([{"label": l, "settings": s, "metrics": m} for l, s, m in rows],
                                                     indent=1))
    print()
    print("| variant | " + " | ".join(KEYS) + " |")
    print("|---|" + "---|" * len(KEYS))
    for label, _, m in rows:
        print(f"| {label} | " + " | ".join(_cell(m[k]) for k in KEYS) + " |")


def _cell(v) -> str:
    return f"{v:,}" if isinstance(v, int) else f"{v:.3f}"


def _fmt(m: dict) -> str:
    return "  ".join(f"{k}={_cell(m[k])}" for k in KEYS)


if __name__ == "__main__":
    main()
