"""RESULTS.md "causal LMs": every stage on three tiny causal LMs, what each checkpoint costs and how
close it stays to its source.

Builds the tiny Qwen2-, Llama- and GPT-J-style models of the test suite (`tests/causal_lms.py`:
config classes, a few seconds of training on a synthetic language, nothing downloaded), runs
`unislim run examples/causal_lm.yaml` on each with the test's tiny overrides, then prints one table
per model: every evaluated checkpoint's held-out NLL, agreement and KL with the source, total and
active parameters, FLOPs and latency per sample; plus the prune 10% / 90% NLL check.

    python -P bench/causal_lm.py --out runs/studies/causal-lm [--kinds qwen2,llama,gptj]
"""

from __future__ import annotations

from pathlib import Path
import sys

# bench/accelerate.py is named like the `accelerate` package, which transformers imports when it is on the path;
# take bench/ (sys.path[0] for a script, inherited by Ray workers) off the path before anything imports it.
HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE.parent))  # the repo root: tests/causal_lms.py builds the models

import argparse
import json

KEYS = ("nll/text", "agreement/text", "kl/text", "params/total", "params/active", "flops/text_per_sample",
        "latency_ms/text_per_sample")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--kinds", default="qwen2,llama,gptj")
    args = parser.parse_args()

    import ray

    from tests.causal_lms import trained_lm, write_text
    from tests.stages.test_causal_lm import overrides
    from unislim.cli import main as unislim

    out = Path(args.out)
    text = write_text(out / "text.parquet", 160, seed=1)
    ray.init(num_cpus=2)
    tables = {}
    for kind in args.kinds.split(","):
        model = out / "models" / kind
        if not (model / "config.json").exists():
            trained_lm(kind, model)
        runs = out / f"runs-{kind}"
        rc = unislim(["run", str(HERE.parent / "examples" / "causal_lm.yaml"), *overrides(kind, model, text),
                      "--runs-dir", str(runs)])
        if rc != 0:
            raise SystemExit(f"{kind}: unislim run exited {rc}")
        rows = {}
        for manifest in sorted(runs.glob("evaluate*/*/manifest.json")):
            m = json.loads((manifest.parent / "metrics.json").read_text())
            rows[m["model"]] = {k: m.get(k) for k in KEYS}
        accel = next(runs.glob("accelerate/*/accelerate.json"))
        report = json.loads(accel.read_text())
        tables[kind] = {"evaluate": rows, "accelerate": {n: {k: v for k, v in r.items() if k.startswith(
            ("speedup", "flops", "nll", "agreement", "params"))} for n, r in report["rows"].items()},
            "not_applicable": report["not_applicable"]}
        print(f"\n### {kind}\n\n| checkpoint | " + " | ".join(KEYS) + " |\n|---" * (len(KEYS) + 1) + "|")
        for name, r in rows.items():
            print(f"| {name} | " + " | ".join("-" if r[k] is None else f"{r[k]:.4g}" for k in KEYS) + " |")
        for name, r in tables[kind]["accelerate"].items():
            print(f"accelerate {name}: " + "  ".join(f"{k}={v:.4g}" for k, v in r.items()))
    (out / "causal_lm.json").write_text(json.dumps(tables, indent=1))
    ray.shutdown()


if __name__ == "__main__":
    main()
