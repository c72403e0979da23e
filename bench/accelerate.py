"""FlashU acceleration: latency of each technique alone and combined against the unaccelerated model.

Latency table (any device; interleaved rounds in one process, medians; wall clock, and on CPU
also this process's CPU time, which moves less with other jobs' load):

    python bench/accelerate.py --checkpoint runs/pretrain/<key>/checkpoint --scores runs/score/<key>/scores \
        --out runs/bench/accelerate [--device cuda] [--repeats 7] [accelerate.head_cache.every=3 ...]

With `--stage`, runs the `accelerate` stage itself (CPU, no Ray): quality (digits-MME, -GenEval,
-FID), FLOPs and latency per variant, as in RESULTS.md; its files land in --out.
Settings are the pipeline's `accelerate` and `evaluate` sections (defaults of unislim/config.py),
overridable as key=value. Writes `<out>/accelerate_bench.json`.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from types import SimpleNamespace

# This file's name is the `accelerate` package's, which transformers imports when it is on the path:
# take bench/ (sys.path[0] when run as a script) off the path before anything imports transformers.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402

from unislim.config import load_config  # noqa: E402
from unislim.modeling.families.digits.accelerate_compare import latency_ms, variants  # noqa: E402
from unislim.modeling.loading import load_model  # noqa: E402
from unislim.pipelines.context import StageContext  # noqa: E402
from unislim.pipelines.store import Artifact  # noqa: E402
from unislim.stages import accelerate  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--scores", required=True, help="the score stage's scores/ folder")
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default: accelerate.latency_repeats)")
    ap.add_argument("--batch", type=int, nargs=2, default=None, metavar=("UND", "GEN"),
                    help="samples per timed call (default: accelerate.latency_{und,gen}_samples)")
    ap.add_argument("--stage", action="store_true", help="run the accelerate stage (quality + latency, CPU)")
    ap.add_argument("overrides", nargs="*", help="pipeline keys, e.g. accelerate.head_cache.every=3")
    args = ap.parse_args()
    cfg = load_config(data={"accelerate": {"enabled": True}}, overrides=args.overrides)
    a, e = cfg.accelerate, cfg.evaluate
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    inputs = {"checkpoint": Artifact("pretrain", args.checkpoint, ""), "scores": Artifact("score", args.scores, "")}

    if args.stage:
        stage_cfg = SimpleNamespace(model=cfg.model, evaluate=e, accelerate=a)
        accelerate.run(stage_cfg, inputs, StageContext.local("accelerate", out))
        print((out / "accelerate.md").read_text())
        return

    model = load_model(args.checkpoint, device=args.device, dtype=getattr(torch, args.dtype))
    models = variants(model, accelerate.acceleration_from_config(a), accelerate.task_scores(Path(args.scores)),
                      a.combined)
    n_und, n_gen = args.batch or (a.latency_und_samples, a.latency_gen_samples)
    ms = latency_ms(models, n_und=n_und, n_gen=n_gen, steps=e.steps, cfg_scale=e.cfg_scale,
                    repeats=args.repeats or a.latency_repeats, seed=e.seed)
    base = ms["baseline"]
    cpu = args.device == "cpu"
    print(f"{models.get('combined', list(models.values())[-1]).acceleration.describe()} on {args.device} ({_machine(args.device)}), "
          f"{n_und} und samples / {n_gen} gen prompts per call, {e.steps} steps")
    print("| variant | und ms/sample | speed-up und | gen ms/sample | speed-up gen |" + (" CPU-time speed-up und / gen |" if cpu else ""))
    print("|---|---|---|---|---|" + ("---|" if cpu else ""))
    for name, r in ms.items():
        extra = f" {base['und_cpu'] / r['und_cpu']:.2f}× / {base['gen_cpu'] / r['gen_cpu']:.2f}× |" if cpu else ""
        print(f"| {name} | {r['und']:.3f} | {base['und'] / r['und']:.2f}× | {r['gen']:.2f} | "
              f"{base['gen'] / r['gen']:.2f}× |{extra}")
    (out / "accelerate_bench.json").write_text(json.dumps({
        "device": args.device, "machine": _machine(args.device), "dtype": args.dtype, "torch": torch.__version__,
        "batch": [n_und, n_gen], "steps": e.steps, "settings": a.model_dump(mode="json"), "ms_per_sample": ms,
    }, indent=1))  # fmt: skip


def _machine(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


if __name__ == "__main__":
    main()
