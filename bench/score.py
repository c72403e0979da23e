"""Scoring throughput against a plain forward pass of the same model and batch.

For 1 and 2 Ray workers (one thread each, or the GPU), every worker runs the same batches twice:
plainly and under `CalibrationRecorder` (layer cosines + neuron + head statistics), and reports
tokens/s of each; the overhead ratio is plain-time / scored-time's inverse (scored ÷ plain time).

    python bench/score.py --model qwen2-0.5b-shape --tokens 256 --batches 8   # a random Qwen2 of 0.5B widths
    python bench/score.py --model small-cpu                                    # a narrower Qwen2 for CPUs

Prints a table and writes bench/results/score-<model>-<device>.json.
"""

from __future__ import annotations

from pathlib import Path
import sys

# bench/accelerate.py is named like the `accelerate` package, which transformers imports when it is on the path;
# take bench/ (sys.path[0] for a script, inherited by Ray workers) off the path before anything imports it.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import json
import platform
import time

import ray
import torch

SHAPES = {  # Qwen2 widths: the 0.5B model, and a narrow one that runs in seconds on a laptop CPU
    "qwen2-0.5b-shape": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                             num_key_value_heads=2, vocab_size=151_936),
    "small-cpu": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=8192),
}


def _model(shape: str, device: str):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(**SHAPES[shape], max_position_embeddings=4096, tie_word_embeddings=True)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return Qwen2ForCausalLM(config).to(device, dtype).eval()


def measure(shape: str, batch: int, tokens: int, batches: int, device: str, threads: int) -> dict:
    """(plain tokens/s, scored tokens/s) for `batches` forwards of (batch, tokens)."""
    from unislim.modeling.adapters import adapter_for
    from unislim.modeling.importance import CalibrationRecorder

    torch.set_num_threads(threads)
    model = _model(shape, device)
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, model.config.vocab_size, (batch, tokens), generator=g).to(device) for _ in range(batches)]

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def plain():
        for ids in data:
            model.model(input_ids=ids)  # the backbone: scoring never needs the LM head

    def scored():
        with CalibrationRecorder(model, adapter_for(model)):
            plain()

    with torch.no_grad():
        plain(), scored()  # warm-up
        times = {}
        for name, fn in (("plain", plain), ("scored", scored), ("plain2", plain), ("scored2", scored)):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name] = time.perf_counter() - t0
    n = batch * tokens * batches
    t_plain, t_scored = min(times["plain"], times["plain2"]), min(times["scored"], times["scored2"])
    return {"plain_tok_s": n / t_plain, "scored_tok_s": n / t_scored, "overhead": t_scored / t_plain}


@ray.remote
def _worker(*args) -> dict:
    return measure(*args)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(SHAPES), default="small-cpu")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    if device == "cuda":  # one GPU: the in-process figure is the one that matters
        rows.append({"workers": 1, **measure(args.model, args.batch, args.tokens, args.batches, device, 1)})
    else:
        ray.init(num_cpus=max(args.workers), include_dashboard=False, log_to_driver=False)
        for w in args.workers:
            t0 = time.perf_counter()
            parts = ray.get([_worker.options(num_cpus=1).remote(args.model, args.batch, args.tokens, args.batches,
                                                                 device, 1) for _ in range(w)])
            rows.append({"workers": w, "plain_tok_s": sum(p["plain_tok_s"] for p in parts),
                         "scored_tok_s": sum(p["scored_tok_s"] for p in parts),
                         "overhead": sum(p["overhead"] for p in parts) / w, "wall_s": time.perf_counter() - t0})
        ray.shutdown()
    print(f"model {args.model}, batch {args.batch}×{args.tokens} tokens, {args.batches} batches, {device}")
    print("| workers | plain tok/s | scored tok/s | scored ÷ plain time |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['workers']} | {r['plain_tok_s']:,.0f} | {r['scored_tok_s']:,.0f} | {r['overhead']:.3f}× |")
    out = Path(__file__).parent / "results" / f"score-{args.model}-{device}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "device": device, "host": platform.node(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
