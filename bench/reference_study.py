"""Do the reference metrics measure what they claim? (RESULTS.md, the reference-model section)

Evaluates a `pretrain` stage output four ways, in this process: the final weights at the default
steps and CFG scale; with CFG off (scale 1); with 2 denoising steps; and the snapshot saved at
10% of training. Quality should drop clearly in the last three.

    python bench/reference_study.py runs/pretrain/<key> --out runs/studies/reference-shared.json
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

from unislim.stages.evaluate import evaluate_checkpoint

ROWS = ("mme/overall", "mme/left", "mme/right", "mme/which", "mme/count", "mme/faint", "mme/sum",
        "geneval/overall", "geneval/single", "geneval/two", "geneval/counting", "geneval/colors",
        "geneval/position", "geneval/color_attr", "fid/gen", "latency_ms/und_per_sample", "latency_ms/gen_per_sample")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pretrain_dir", help="a pretrain stage output folder (holds checkpoint/ and snapshots/)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--n-und", type=int, default=40)
    ap.add_argument("--n-gen", type=int, default=24)
    args = ap.parse_args()
    root = Path(args.pretrain_dir)
    snapshot = sorted((root / "snapshots").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))[0]
    cases = {"final": (root / "checkpoint", {}), "CFG off (scale 1)": (root / "checkpoint", {"cfg_scale": 1.0}),
             "2 steps": (root / "checkpoint", {"steps": 2}), f"10% of training ({snapshot.name})": (snapshot, {})}
    results = {}
    for name, (path, kw) in cases.items():
        t0 = time.time()
        results[name] = evaluate_checkpoint(path, n_und=args.n_und, n_gen=args.n_gen, progress=lambda m: None,
                                            **{"steps": 20, **kw})
        print(f"{name}: mme {results[name]['mme/overall']:.3f}  geneval {results[name]['geneval/overall']:.3f}  "
              f"fid {results[name]['fid/gen']:.2f}  ({time.time() - t0:.0f}s)", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    print("\n| metric | " + " | ".join(results) + " |\n|---|" + "---|" * len(results))
    for k in ROWS:
        print(f"| {k} | " + " | ".join(f"{r[k]:.3f}" for r in results.values()) + " |")


if __name__ == "__main__":
    main()
