"""MoE MLP against the dense MLP it was cut from: forward and forward + backward, each layout x impl.

    python -P bench/moe.py [--device cpu|cuda] [--widths 0.5b,7b] [--tokens 2048] [--repeats 7] \
        [--layouts 8/2/2,16/2/6,64/8/24] [--impls loop,grouped,fused,grouped_padded,masked,auto] \
        [--modes fwd,fwd+bwd] [--threads 1] [--out bench/results/moe.json]
    python -P bench/moe.py --digits [--repeats 15]   # generation of the digits model: dense vs its MoE, per impl
    python -P bench/moe.py --profile 64/8/24:fused    # torch.profiler's top ops of one case, fwd and fwd+bwd

One process. For each width and token count: a dense SwiGLU MLP (three nn.Linear, as in Qwen2),
a half-width one (the limit for 50% activation) and one `MoEMLP` per layout E/S/k (E experts, S
shared, top-k of the E - S routed), cut from the dense weights (random neuron scores) with the
weight-estimated router of `init_router`. All impls of a layout run the same module (its `impl`
switched between calls), so they see the same weights and the same routing. Every round times
each case once, the order rotated each round; a cell is the median over rounds of the case's time
divided by the dense MLP's time in the same round and mode (a ratio within a round cancels most
of the drift in other jobs' load). `fwd`: eval, no_grad (generation);
`fwd+bwd`: train mode, gradients for the input and every weight (what adapt runs). On CPU the
table shows wall clock and, in brackets, this process's CPU time (which moves less with other
jobs' load); on CUDA, wall clock. Defaults: CPU fp32, 0.5B widths, 2,048 tokens, one thread;
CUDA bf16, 0.5B and 7B widths, 256 and 4,096 tokens.

Prints a markdown table and writes JSON (default bench/results/moe-<device>.json).
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
import torch.nn.functional as F
from torch import nn

WIDTHS = {"0.5b": (896, 4864), "7b": (3584, 18944), "digits": (128, 384)}  # Qwen2-0.5B, Qwen2-7B, digits `small`
LAYOUTS = ("8/2/2", "16/2/6", "64/8/24")


class DenseMLP(nn.Module):
    """Qwen2MLP: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, d: int, ff: int):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, ff, bias=False), nn.Linear(d, ff, bias=False)
        self.down_proj = nn.Linear(ff, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def build(d: int, ff: int, layouts: list[str], device: str, dtype: torch.dtype):
    from unislim.modeling.surgery.moe import MoEMLP, partition_neurons

    torch.manual_seed(0)
    dense = DenseMLP(d, ff)
    for p in dense.parameters():
        nn.init.normal_(p, std=0.02)
    half = DenseMLP(d, ff // 2)
    half.load_state_dict({k: v[: ff // 2] if k != "down_proj.weight" else v[:, : ff // 2]
                          for k, v in dense.state_dict().items()})
    moes = {}
    for layout in layouts:
        E, S, k = map(int, layout.split("/"))
        moe = MoEMLP(d, ff, E, S, k)
        parts = partition_neurons(torch.rand(ff, generator=torch.Generator().manual_seed(1)), E, S)
        moe.load_dense(dense.gate_proj.weight, dense.up_proj.weight, dense.down_proj.weight, parts)
        moes[layout] = moe.to(device, dtype)
    return dense.to(device, dtype), half.to(device, dtype), moes


def cases(dense, half, moes, impls: list[str], x: torch.Tensor) -> dict[str, tuple[nn.Module, str | None]]:
    """name -> (module, impl to set or None); impls a layout's widths refuse are left out."""
    out = {"dense": (dense, None), "half-dense": (half, None)}
    for layout, moe in moes.items():
        for impl in impls:
            moe.impl = impl
            try:
                with torch.no_grad():
                    moe(x[:64])
            except ValueError as e:  # e.g. `grouped` off the 16-byte rule
                print(f"  {layout} {impl}: skipped ({e})")
                continue
            out[f"{layout} {impl}"] = (moe, impl)
    return out


def timed(case: tuple[nn.Module, str | None], x: torch.Tensor, grad: torch.Tensor, mode: str):
    module, impl = case

    def fwd():
        if impl is not None:
            module.impl = impl
        module.eval()
        with torch.no_grad():
            module(x)

    def fwd_bwd():
        if impl is not None:
            module.impl = impl
        module.train()
        module.zero_grad(set_to_none=True)
        xi = x.detach().requires_grad_()
        module(xi).backward(grad)

    return fwd if mode == "fwd" else fwd_bwd


def interleaved(fns: dict, repeats: int, warmup: int = 1) -> dict[str, dict[str, list[float]]]:
    """{name: {"wall": [s per round], "cpu": [s of this process's CPU time per round]}}; each round
    runs every fn once, the order rotated by one each round; CUDA is synchronised around each."""
    names = list(fns)
    times = {n: {"wall": [], "cpu": []} for n in names}
    sync = torch.cuda.synchronize if torch.cuda.is_available() and torch.cuda.is_initialized() else (lambda: None)
    for r in range(warmup + repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            sync()
            w, c = time.perf_counter(), time.process_time()
            fns[name]()
            sync()
            if r >= warmup:
                times[name]["wall"].append(time.perf_counter() - w)
                times[name]["cpu"].append(time.process_time() - c)
    return times


def summary(times: dict, name: str, base: str = "dense") -> dict:
    """Medians of a case's times and of its per-round ratios to `base`."""
    t, b = times[name], times[base]
    ratio = lambda k: statistics.median(x / y for x, y in zip(t[k], b[k]) if y > 0) if any(b[k]) else None  # noqa: E731
    return {"wall_ms": 1e3 * statistics.median(t["wall"]), "cpu_ms": 1e3 * statistics.median(t["cpu"]),
            "ratio": ratio("wall"), "cpu_ratio": ratio("cpu"),
            "wall_ms_rounds": [round(1e3 * v, 2) for v in t["wall"]]}


def run_mlp(args, device: str, dtype: torch.dtype) -> list[dict]:
    rows = []
    for widths in args.widths:
        d, ff = WIDTHS[widths]
        dense, half, moes = build(d, ff, args.layouts, device, dtype)
        for tokens in args.tokens:
            g = torch.Generator(device=device).manual_seed(2)
            x = torch.randn(tokens, d, generator=g, device=device, dtype=dtype)
            grad = torch.randn(tokens, d, generator=g, device=device, dtype=dtype)
            table = cases(dense, half, moes, args.impls, x)
            picked = {}
            for layout, moe in moes.items():
                moe.impl = "auto"
                picked[layout] = moe.resolve_impl(x)
            result = {}
            for mode in args.modes:
                print(f"timing {widths} widths, {tokens} tokens, {mode}: {len(table)} cases x {args.repeats} rounds",
                      flush=True)
                fns = {name: timed(case, x, grad, mode) for name, case in table.items()}
                result[mode] = interleaved(fns, repeats=args.repeats)
            for name, (module, impl) in table.items():
                layout = name.split(" ")[0] if impl is not None else None
                row = {"widths": widths, "d": d, "ff": ff, "tokens": tokens, "case": name, "layout": layout,
                       "impl": impl, "auto_picks": picked.get(layout) if impl == "auto" else None}
                for mode, res in result.items():
                    row[mode] = summary(res, name)
                if layout is not None:
                    load = moes[layout].last_load.float()
                    row["load_max_over_mean"] = float(load.max() / load.mean())
                rows.append(row)
            print_table([r for r in rows if r["widths"] == widths and r["tokens"] == tokens], args.modes, device)
        del dense, half, moes
    return rows


def print_table(rows: list[dict], modes: list[str], device: str) -> None:
    r0 = rows[0]
    print(f"\nd {r0['d']}, ff {r0['ff']}, {r0['tokens']} tokens; time / dense time"
          + (" (CPU-time ratio in brackets)" if device == "cpu" else ""))
    print("| case | " + " | ".join(modes) + " | dense ms |")
    print("|---|" + "---|" * (len(modes) + 1))
    for r in rows:
        name = r["case"] + (f" (-> {r['auto_picks']})" if r["auto_picks"] else "")
        cells = []
        for m in modes:
            c = r[m]
            cpu = f" ({c['cpu_ratio']:.2f}×)" if device == "cpu" and c["cpu_ratio"] is not None else ""
            cells.append(f"{c['ratio']:.2f}×{cpu}")
        dense_ms = "" if r["case"] != "dense" else " / ".join(f"{r[m]['wall_ms']:.1f}" for m in modes)
        print(f"| {name} | " + " | ".join(cells) + f" | {dense_ms} |")
    print()


def run_profile(args, device: str, dtype: torch.dtype) -> list[dict]:
    """Self time by op of one layout:impl (and of the dense MLP) at the first width and token count."""
    from torch.profiler import ProfilerActivity, profile

    layout, impl = args.profile.split(":")
    d, ff = WIDTHS[args.widths[0]]
    dense, _, moes = build(d, ff, [layout], device, dtype)
    g = torch.Generator(device=device).manual_seed(2)
    x = torch.randn(args.tokens[0], d, generator=g, device=device, dtype=dtype)
    grad = torch.randn(args.tokens[0], d, generator=g, device=device, dtype=dtype)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    rows = []
    for name, case in (("dense", (dense, None)), (f"{layout} {impl}", (moes[layout], impl))):
        for mode in args.modes:
            fn = timed(case, x, grad, mode)
            fn()  # warm-up
            with profile(activities=activities) as prof:
                fn()
            events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
            total = sum(e.self_cpu_time_total for e in events)
            print(f"\n{name}, {mode}: {total / 1e3:.1f} ms of self CPU time")
            print("| op | ms | share | calls |\n|---|---|---|---|")
            top = [{"op": e.key, "ms": e.self_cpu_time_total / 1e3, "share": e.self_cpu_time_total / total,
                    "calls": e.count} for e in events[:12]]
            for t in top:
                print(f"| {t['op']} | {t['ms']:.1f} | {t['share']:.1%} | {t['calls']} |")
            rows.append({"case": name, "mode": mode, "total_ms": total / 1e3, "top": top})
    return rows


def run_digits(args, device: str) -> list[dict]:
    """Generation (`generate_images`) of the `small` digits model, dense vs MoE with each impl.
    Random weights (timing only); MoE in the default layers with the default 64/8/24 layout."""
    from unislim.modeling.accelerate import timing_batches
    from unislim.modeling.families.digits import UniDigitsModel, convert_to_moe, reference_config

    torch.manual_seed(0)
    dense = UniDigitsModel(reference_config("small", "shared")).to(device).eval()
    ff = dense.config.intermediate_size
    names = [f"model.layers.{i}.mlp" for i in range(1, dense.config.num_hidden_layers - 1)]
    scores = {n: torch.rand(ff, generator=torch.Generator().manual_seed(i)) for i, n in enumerate(names)}
    moe, _ = convert_to_moe(dense, scores, num_experts=64, num_shared=8, top_k=24, impl="auto")
    moe = moe.to(device).eval()
    prompts = timing_batches(1, args.digits_prompts, seed=3, device=device)[2]  # (prompts, P), as bench/accelerate.py
    mlps = list(moe.moe_mlps().values())
    x_probe = torch.zeros(prompts.shape[0] * 2 * (prompts.shape[1] + dense.config.num_image_tokens),
                          dense.config.hidden_size, device=device)
    picked = mlps[0].resolve_impl(x_probe)

    def gen(model, impl=None):
        def fn():
            for m in mlps:
                if impl is not None:
                    m.impl = impl
            with torch.no_grad():
                model.generate_images(prompts, generator=torch.Generator().manual_seed(4))
        return fn

    fns = {"dense": gen(dense), **{f"moe {impl}": gen(moe, impl) for impl in args.impls if impl != "grouped"}}
    res = interleaved(fns, repeats=args.repeats)
    print(f"\ndigits `small` generation, {len(prompts)} prompts, {dense.config.sample_steps} steps; MoE 64/8/24 in "
          f"layers {names}; auto picks {picked!r} at {len(x_probe)} rows")
    print("| model | ms per call | time / dense" + (" (CPU time)" if device == "cpu" else "") + " |")
    print("|---|---|---|")
    rows = []
    for name in res:
        r = summary(res, name)
        cpu = f" ({r['cpu_ratio']:.2f}×)" if device == "cpu" else ""
        print(f"| {name} | {r['wall_ms']:.1f} | {r['ratio']:.2f}×{cpu} |")
        rows.append({"case": name, **r, "auto_picks": picked if name == "moe auto" else None})
    return rows


def _cpu_name() -> str:
    try:
        names = [ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")]
        return f"{names[0]} x {len(names)}" if names else platform.processor()
    except OSError:
        return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default: fp32 CPU, bf16 CUDA")
    ap.add_argument("--widths", default=None,
                    help=f"comma list of {sorted(WIDTHS)} or DxFF, e.g. 896x4864 (default: 0.5b CPU, 0.5b,7b CUDA)")
    ap.add_argument("--tokens", default=None, help="comma list (default: 2048 CPU; 256,4096 CUDA)")
    ap.add_argument("--layouts", default=",".join(LAYOUTS), help="comma list of E/S/k")
    ap.add_argument("--impls", default="loop,grouped,fused,grouped_padded,masked,auto")
    ap.add_argument("--modes", default="fwd,fwd+bwd")
    ap.add_argument("--repeats", type=int, default=7, help="timed rounds (medians)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--digits", action="store_true", help="time digits-model generation instead of the MLP alone")
    ap.add_argument("--digits-prompts", type=int, default=6)
    ap.add_argument("--profile", default=None, metavar="LAYOUT:IMPL", help="profile one case instead of timing")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cuda = args.device == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    args.widths = (args.widths or ("0.5b,7b" if cuda else "0.5b")).split(",")
    args.tokens = [int(t) for t in (args.tokens or ("256,4096" if cuda else "2048")).split(",")]
    args.layouts, args.impls, args.modes = args.layouts.split(","), args.impls.split(","), args.modes.split(",")
    for w in args.widths:
        if w not in WIDTHS:
            try:
                WIDTHS[w] = tuple(int(v) for v in w.split("x"))
                assert len(WIDTHS[w]) == 2
            except (ValueError, AssertionError):
                ap.error(f"--widths: {w!r} is neither one of {sorted(WIDTHS)} nor DxFF")
    torch.set_num_threads(args.threads)

    if args.profile:
        rows, kind = run_profile(args, args.device, dtype), "profile-"
    elif args.digits:
        rows, kind = run_digits(args, args.device), "digits-"
    else:
        rows, kind = run_mlp(args, args.device, dtype), ""
    default = f"moe-{kind}{args.device}.json"
    out = Path(args.out or Path(__file__).parent / "results" / default)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"command": " ".join(["python -P bench/moe.py", *sys.argv[1:]]), "date": datetime.date.today().isoformat(),
            "device": args.device, "device_name": torch.cuda.get_device_name() if cuda else _cpu_name(),
            "dtype": str(dtype), "threads": args.threads, "torch": torch.__version__, "host": platform.node()}
    out.write_text(json.dumps({**meta, "args": {k: v for k, v in vars(args).items()}, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
