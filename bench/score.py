"""What importance scoring costs: a forward under `CalibrationRecorder` against plain forwards.

On a random causal LM of Qwen2-0.5B's shape (hidden 896, ff 4864, 14 heads / 2 KV, vocab 151,936,
24 layers; random weights, nothing downloaded) and one batch, four forwards (five with --baseline)
are timed in rounds, interleaved in one process (the order rotates each round, after a warm-up
round):

    full         model(input_ids, attention_mask): the plain causal-LM forward, LM head included
    decoder      model.model(...): the plain decoder alone (no head)
    scored       recorder.run(lambda: model(...), stop_early=True): what scoring runs
    scored_full  model(...) under the recorder without stop_early: the hooks' own cost, head included
    baseline     (with --baseline FILE) model(...) under FILE's CalibrationRecorder, e.g. an older
                 importance.py from `git show <commit>:modeling/importance.py > FILE`

Then, apart from the model's own noise, one layer (layer 0) alone: its plain forward against the
recorder's statistics of that layer (its hooks called on the layer's captured tensors), for this
recorder and the --baseline one.

Each ratio (scored ÷ full, scored ÷ decoder, scored_full ÷ full) is taken within a round and the
median over rounds is reported, so load that drifts between rounds cancels. Both wall-clock and
this process's CPU time are recorded; on a CPU shared with other jobs the CPU time is the figure
to read (wall-clock of one forward moved 3× from round to round on a loaded 2-core VM, CPU time
within ±10 %), on CUDA the wall-clock (synchronised).

    python bench/score.py                                  # 24 layers, batch 4 × 512 tokens (CPU: minutes)
    python bench/score.py --layers 4 --tokens 256          # quicker
    python bench/score.py --pad 0.25 --profile             # a quarter of the tokens padding; profile
    git show a1fe954:modeling/importance.py > /tmp/importance_a1fe954.py
    python bench/score.py --baseline /tmp/importance_a1fe954.py   # against the recorder before issue 15

Runs on CUDA when there is one (bfloat16 there unless --dtype; float32 on CPU, one thread unless
--threads). Prints a table and writes bench/results/score-<layers>L-<batch>x<tokens>-<device>.json.
"""

from __future__ import annotations

from pathlib import Path
import sys

# bench/accelerate.py is named like the `accelerate` package, which transformers imports when it is on the path;
# take bench/ (sys.path[0] for a script) off the path before anything imports it.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import datetime
import json
import platform
import statistics
import time

import torch

QWEN2_05B = dict(hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2,
                 vocab_size=151_936, tie_word_embeddings=True)
RATIOS = {"scored / full": ("scored", "full"), "scored / decoder": ("scored", "decoder"),
          "scored_full / full": ("scored_full", "full"), "decoder / full": ("decoder", "full"),
          "baseline / full": ("baseline", "full")}


def build(layers: int, device: str, dtype: torch.dtype):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(**QWEN2_05B, num_hidden_layers=layers, max_position_embeddings=4096)
    return Qwen2ForCausalLM(config).to(device, dtype).eval()


def _recorder_from(path: str):
    """CalibrationRecorder of another importance.py, loaded as a sibling of unislim.modeling.importance
    (so its relative imports resolve)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("unislim.modeling._baseline_importance", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.CalibrationRecorder


def forwards(model, ids: torch.Tensor, mask: torch.Tensor, baseline: str | None = None) -> dict:
    """The timed callables (see the module docstring)."""
    from unislim.modeling.adapters import adapter_for
    from unislim.modeling.importance import CalibrationRecorder

    adapter, attention_mask = adapter_for(model), mask.long()

    def full():
        model(input_ids=ids, attention_mask=attention_mask)

    def decoder():
        model.model(input_ids=ids, attention_mask=attention_mask)

    def scored(stop_early: bool = True):
        with CalibrationRecorder(model, adapter) as recorder:
            recorder.token_mask = mask
            recorder.run(full, stop_early=stop_early)
        recorder.stats()  # the one point that waits for the device

    fns = {"full": full, "decoder": decoder, "scored": scored, "scored_full": lambda: scored(False)}
    if baseline:
        Baseline = _recorder_from(baseline)

        def baseline_full():
            with Baseline(model, adapter) as recorder:
                recorder.token_mask = mask
                full()
            recorder.stats()

        fns["baseline"] = baseline_full
    return fns


def measure(fns: dict, rounds: int, sync) -> dict[str, dict[str, list[float]]]:
    """{"wall" | "cpu": {name: seconds per call}}, `rounds` interleaved rounds after a warm-up round."""
    times = {"wall": {name: [] for name in fns}, "cpu": {name: [] for name in fns}}
    names = list(fns)
    for r in range(rounds + 1):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            sync()
            w0, c0 = time.perf_counter(), time.process_time()
            fns[name]()
            sync()
            if r:  # round 0 warms up allocator and caches
                times["wall"][name].append(time.perf_counter() - w0)
                times["cpu"][name].append(time.process_time() - c0)
    return times


class _Captured(Exception):
    pass


def layer_costs(model, ids: torch.Tensor, mask: torch.Tensor, recorders: dict, rounds: int, sync) -> dict:
    """CPU and wall seconds of layer 0's plain forward and of each recorder's statistics of it."""
    from unislim.modeling.adapters import adapter_for

    layer, cap = model.model.layers[0], {}

    def keep(key, value, stop=False):
        cap[key] = value[0] if isinstance(value, tuple) else value
        if stop:
            raise _Captured

    hooks = [layer.register_forward_pre_hook(lambda m, a, k: cap.update(x=a[0] if a else k["hidden_states"],
                                                                        kwargs=k), with_kwargs=True),
             layer.self_attn.register_forward_hook(lambda m, a, o: keep("attn", o)),
             layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: keep("h", a[0])),
             layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a: keep("z", a[0])),
             layer.register_forward_hook(lambda m, a, o: keep("out", o, stop=True))]
    try:  # no KV cache: the captured kwargs are replayed, and a cache would grow with every replay
        model.model(input_ids=ids, attention_mask=mask.long(), use_cache=False)
    except _Captured:
        pass
    finally:
        for h in hooks:
            h.remove()
    mlp, o_proj = "model.layers.0.mlp", "model.layers.0.self_attn.o_proj"
    fns = {"layer 0 forward": lambda: layer(cap["x"], **cap["kwargs"])}
    for name, cls in recorders.items():
        rec = cls(model, adapter_for(model))
        rec.token_mask = mask

        def stats(rec=rec):  # what the hooks of one layer do, in forward order
            rec._layer_in(0, (cap["x"],), {})
            rec._o_in(o_proj, cap["z"])
            rec._attn_out(0, cap["attn"])
            rec._mlp_in(mlp, cap["h"])
            rec._layer_out(0, cap["out"])

        fns[f"{name} statistics"] = stats
    times = measure(fns, rounds, sync)
    return {c: {k: statistics.median(v) for k, v in times[c].items()} for c in times}


def profile(fns: dict, rows: int, device: str) -> dict[str, str]:
    """torch.profiler tables (top ops by self time) of one decoder and one scored forward."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    out = {}
    for name in ("decoder", "scored"):
        with torch_profile(activities=activities) as prof:
            fns[name]()
        out[name] = prof.key_averages().table(sort_by=key, row_limit=rows)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=24, help="decoder layers (Qwen2-0.5B: 24)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=512, help="tokens per row")
    ap.add_argument("--pad", type=float, default=0.0, help="fraction of each row that is left padding (masked)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                    help="auto: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--baseline", metavar="FILE", help="also time the full forward under FILE's CalibrationRecorder")
    ap.add_argument("--profile", action="store_true", help="also print torch.profiler tables of decoder and scored")
    args = ap.parse_args()

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else torch.bfloat16 if device == "cuda" else torch.float32
    torch.set_num_threads(args.threads)
    model = build(args.layers, device, dtype)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, QWEN2_05B["vocab_size"], (args.batch, args.tokens), generator=g).to(device)
    mask = torch.ones(args.batch, args.tokens, dtype=torch.bool)
    mask[:, :int(args.pad * args.tokens)] = False
    mask = mask.to(device)
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None

    fns = forwards(model, ids, mask, args.baseline)
    from unislim.modeling.importance import CalibrationRecorder

    recorders = {"recorder": CalibrationRecorder, **({"baseline": _recorder_from(args.baseline)} if args.baseline else {})}
    with torch.no_grad():
        times = measure(fns, args.rounds, sync)
        layer = layer_costs(model, ids, mask, recorders, 3 * args.rounds, sync)
        tables = profile(fns, 15, device) if args.profile else {}

    tokens = args.batch * args.tokens
    clocks = ("wall", "cpu")
    median = {c: {k: statistics.median(v) for k, v in times[c].items()} for c in clocks}
    ratios = {c: {label: statistics.median(a / b for a, b in zip(times[c][num], times[c][den]))
                  for label, (num, den) in RATIOS.items() if num in times[c]} for c in clocks}
    primary = "wall" if device == "cuda" else "cpu"
    what = (f"Qwen2-0.5B shape, {args.layers} layers, batch {args.batch} × {args.tokens} tokens"
            f"{f', {args.pad:.0%} padding' if args.pad else ''}, {device} {str(dtype).removeprefix('torch.')}, "
            f"{args.threads} thread(s), {args.rounds} rounds")
    print(what)
    print("| forward | median wall s | median CPU s | tok/s (wall) |")
    print("|---|---|---|---|")
    for name in times["wall"]:
        print(f"| {name} | {median['wall'][name]:.3f} | {median['cpu'][name]:.3f} | "
              f"{tokens / median['wall'][name]:,.0f} |")
    print(f"| ratio (median of per-round ratios; read the {primary} column) | wall | CPU time |")
    print("|---|---|---|")
    for label in ratios["wall"]:
        print(f"| {label} | {ratios['wall'][label]:.3f}× | {ratios['cpu'][label]:.3f}× |")
    print("| one layer (median) | wall ms | CPU ms | ÷ layer forward (CPU) |")
    print("|---|---|---|---|")
    for name in layer["wall"]:
        print(f"| {name} | {layer['wall'][name] * 1e3:.1f} | {layer['cpu'][name] * 1e3:.1f} | "
              f"{layer['cpu'][name] / layer['cpu']['layer 0 forward']:.4f} |")
    for name, table in tables.items():
        print(f"\n# profile: {name}\n{table}")

    out = Path(__file__).parent / "results" / f"score-{args.layers}L-{args.batch}x{args.tokens}-{device}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({
        "what": what, "args": vars(args), "device": device, "dtype": str(dtype), "torch": torch.__version__,
        "host": platform.node(), "cpu": platform.processor() or platform.machine(),
        "date": datetime.date.today().isoformat(), "primary_clock": primary, "seconds": times,
        "median_s": median, "ratios": ratios, "layer_0_median_s": layer,
        "profile": tables,
    }, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
