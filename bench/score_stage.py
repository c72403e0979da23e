"""The score stage's fixed cost: its wall time on N text rows minus the compute of those rows.

In one process: a random causal LM built from a Qwen2 config (saved to a temp folder, nothing
downloaded), N rows of token ids as calibration Parquet (written by the shard stage's own code),
then (1) the plain scored forwards over the same rows in this process (`CalibrationRecorder` +
the family's `calibrate`, the stage's compute), and (2) the score stage as the pipeline runs it
(`stages/score.py`: Ray actor start, model load, rows handed to the actor, scores saved, plots).
The difference is what the stage costs beyond its compute. Repeated `--repeats` times (the stage
reuses the running Ray instance, as a pipeline does).

    python -P bench/score_stage.py [--rows 256] [--tokens 32] [--layers 4] [--hidden 256] [--repeats 3]
"""

from __future__ import annotations

from pathlib import Path
import sys

# bench/accelerate.py is named like the `accelerate` package, which transformers imports when it is on the path;
# take bench/ (sys.path[0] for a script, inherited by Ray workers) off the path before anything imports it.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import json
import statistics
import tempfile
import time
from types import SimpleNamespace


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "score_stage.json"))
    args = parser.parse_args()

    import pyarrow as pa
    import ray
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    from unislim.config import ModelConfig, ScoreConfig
    from unislim.modeling.families import get_family
    from unislim.modeling.importance import CalibrationRecorder
    from unislim.pipelines.context import StageContext
    from unislim.pipelines.store import Artifact
    from unislim.stages import score
    from unislim.stages.shard import _write

    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="unislim-score-stage-"))
    config = Qwen2Config(vocab_size=4096, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=2)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "model")
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, 4096, (args.rows, args.tokens), generator=g).tolist()
    _write(pa.table({"input_ids": rows}), root / "calib" / "text", 32)
    (root / "tasks.json").write_text(json.dumps({"text": {"kind": "text", "rows": args.rows}}))

    family = get_family("causal_lm")
    model = family.load(root / "model")
    adapter = family.adapter(model)
    batch_size = 16

    def compute() -> float:
        t0 = time.perf_counter()
        with CalibrationRecorder(model, adapter, ("und",)) as recorder:
            for lo in range(0, args.rows, batch_size):
                family.calibrate(model, "text", {"input_ids": rows[lo:lo + batch_size]}, recorder)
        return time.perf_counter() - t0

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    cfg = SimpleNamespace(model=ModelConfig(source="path", path=str(root / "model")),
                          score=ScoreConfig(num_workers=1, batch_size=batch_size))
    inputs = {"checkpoint": Artifact("source", str(root / "model"), "h"),
              "calib": Artifact("shard", str(root / "calib"), "h"),
              "tasks": Artifact("shard", str(root / "tasks.json"), "h")}
    compute_s, stage_s = [], []
    for i in range(args.repeats):
        compute_s.append(compute())
        t0 = time.perf_counter()
        score.run(cfg, inputs, StageContext.local("score", root / f"out{i}"))
        stage_s.append(time.perf_counter() - t0)
        print(f"round {i}: compute {compute_s[-1]:.2f}s  stage {stage_s[-1]:.2f}s  "
              f"overhead {stage_s[-1] - compute_s[-1]:.2f}s", flush=True)
    ray.shutdown()
    result = {"rows": args.rows, "tokens": args.tokens, "layers": args.layers, "hidden": args.hidden,
              "compute_s": compute_s, "stage_s": stage_s,
              "overhead_s_median": statistics.median(s - c for s, c in zip(stage_s, compute_s))}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"median overhead above compute: {result['overhead_s_median']:.2f}s  (wrote {args.out})")


if __name__ == "__main__":
    main()
