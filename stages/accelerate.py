"""Stage `accelerate`: FlashU-style training-free acceleration of a checkpoint, measured.

From `accelerate.*` it builds each enabled technique alone, the `combined` ones together and all
of them together (`modeling/accelerate`); for those and the unaccelerated model it reports
digits-MME, digits-GenEval, digits-FID, FLOPs and active parameters (`evaluate_reference` on the
samples the `evaluate` stage uses, `evaluate.*`), and wall-clock latency per sample, measured in
this process in interleaved rounds against the unaccelerated model (median of `latency_repeats`).

Writes `metrics.json` (the `combined` acceleration, with the keys of DESIGN.md "Contracts" plus
`speedup/und` and `speedup/gen`, from wall-clock medians, and `speedup_cpu/*` from this process's
CPU time, which a machine shared with other jobs disturbs less), `accelerate.json` (every
variant's metrics, and `work`: what each technique claims it saved, summed over every call this
stage made), `accelerate.md` (the table), `plots/generated_grid.png` (the combined model's scenes)
and `plots/side_by_side.png` (the same prompts and noise, baseline vs combined).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from unislim.modeling.accelerate import (
    Acceleration,
    CfgSchedule,
    HeadCache,
    LayerSkip,
    TaskPruning,
    TokenPruning,
    latency_ms,
    variants,
)
from unislim.modeling.loading import load_model

QUALITY = ("mme/overall", "geneval/overall", "fid/gen")


def run(cfg: Any, inputs: dict, ctx: Any) -> dict[str, str]:
    from unislim.modeling.families.digits import DigitJudge, evaluate_reference

    a, e = cfg.accelerate, cfg.evaluate
    out = Path(ctx.out_dir)
    model = load_model(inputs["checkpoint"].path, cfg.model.trust_remote_code)
    scores = task_scores(Path(inputs["scores"].path)) if "scores" in inputs else None
    acceleration = acceleration_from_config(a)
    models = variants(model, acceleration, scores, a.combined)
    ctx.progress(f"{acceleration.describe()} on {inputs['checkpoint'].path}")
    DigitJudge.get()  # trained once per process, with gradients on

    rows: dict[str, dict[str, Any]] = {}
    reported = "combined" if "combined" in models else (a.combined or acceleration.enabled)[0]  # in metrics.json
    for name, m in models.items():
        rows[name] = evaluate_reference(m, n_und=e.n_und, n_gen=e.n_gen, steps=e.steps, cfg_scale=e.cfg_scale,
                                        seed=e.seed, out_dir=out if name == reported else None)
        ctx.progress(f"{name}: mme {rows[name]['mme/overall']:.3f}  geneval {rows[name]['geneval/overall']:.3f}  "
                     f"fid {rows[name]['fid/gen']:.2f}")
    ctx.progress(f"latency: {a.latency_repeats} interleaved rounds of {a.latency_und_samples} und samples and "
                 f"{a.latency_gen_samples} gen prompts per variant")
    latency = latency_ms(models, n_und=a.latency_und_samples, n_gen=a.latency_gen_samples, steps=e.steps,
                         cfg_scale=e.cfg_scale, repeats=a.latency_repeats, seed=e.seed)
    for name, row in rows.items():
        row["latency_ms/und_per_sample"], row["latency_ms/gen_per_sample"] = latency[name]["und"], latency[name]["gen"]
        row["cpu_ms/und_per_sample"] = latency[name]["und_cpu"]
        row["cpu_ms/gen_per_sample"] = latency[name]["gen_cpu"]
        for task in ("und", "gen"):
            row[f"speedup/{task}"] = latency["baseline"][task] / latency[name][task]
            row[f"speedup_cpu/{task}"] = latency["baseline"][f"{task}_cpu"] / latency[name][f"{task}_cpu"]
        row["model"] = models[name].acceleration.describe() if name != "baseline" else "baseline"

    metrics = {**rows[reported], "model": rows[reported]["model"]}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    (out / "accelerate.json").write_text(json.dumps({"checkpoint": inputs["checkpoint"].path, "rows": rows,
                                                     "work": {n: dict(m.work) for n, m in models.items()
                                                              if n != "baseline"}}, indent=1))
    (out / "accelerate.md").write_text(table(rows))
    side_by_side(out / "plots" / "side_by_side.png", model, models[reported], steps=e.steps, cfg_scale=e.cfg_scale,
                 seed=e.seed)
    ctx.progress(f"{metrics['model']}: speedup und {metrics['speedup/und']:.2f}x  gen {metrics['speedup/gen']:.2f}x")
    return {"metrics": "metrics.json", "report": "accelerate.json", "table": "accelerate.md"}


def acceleration_from_config(a: Any) -> Acceleration:
    """The pipeline's `accelerate` section as the runtime's settings (disabled techniques are None)."""
    on = lambda section: section.enabled  # noqa: E731
    p, s, c, h, t = a.task_pruning, a.layer_skip, a.cfg_schedule, a.head_cache, a.token_pruning
    return Acceleration(
        task_pruning=TaskPruning(p.keep_und, p.keep_gen, p.full_last_steps) if on(p) else None,
        layer_skip=LayerSkip(s.every, s.count) if on(s) else None,
        cfg_schedule=CfgSchedule(tuple((float(x), float(y)) for x, y in c.segments)) if on(c) else None,
        head_cache=HeadCache(h.every, h.reuse) if on(h) else None,
        token_pruning=TokenPruning(t.layer, t.keep) if on(t) else None,
    )


def task_scores(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """{"und": scores, "gen": scores}: each the first score file of that kind (whole-run scores,
    not the per-step buckets)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            kind = st.metadata()["kind"]
            if kind in ("und", "gen") and kind not in out:
                out[kind] = {k: st.get_tensor(k) for k in st.keys() if "/" not in k}
    return out


def table(rows: dict[str, dict[str, Any]]) -> str:
    """Markdown: one row per variant, speed-up and quality side by side (speed-ups: wall clock, and in
    parentheses this process's CPU time; quality: change from the baseline in points)."""
    base = rows["baseline"]
    lines = ["| variant | speed-up und | speed-up gen | digits-MME | digits-GenEval | digits-FID | "
             "GFLOPs und / gen per sample | latency ms und / gen |", "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        delta = "" if name == "baseline" else (f" ({100 * (r['mme/overall'] - base['mme/overall']):+.1f})",
                                               f" ({100 * (r['geneval/overall'] - base['geneval/overall']):+.1f})")
        d_mme, d_gen = delta or ("", "")
        lines.append(f"| {name} | {r['speedup/und']:.2f}× ({r['speedup_cpu/und']:.2f}×) | "
                     f"{r['speedup/gen']:.2f}× ({r['speedup_cpu/gen']:.2f}×) | {r['mme/overall']:.3f}{d_mme} | "
                     f"{r['geneval/overall']:.3f}{d_gen} | {r['fid/gen']:.2f} | "
                     f"{r['flops/und_per_sample'] / 1e9:.3f} / {r['flops/gen_per_sample'] / 1e9:.2f} | "
                     f"{r['latency_ms/und_per_sample']:.2f} / {r['latency_ms/gen_per_sample']:.1f} |")
    return "\n".join(lines) + "\n"


@torch.no_grad()
def side_by_side(path: Path, baseline, accelerated, *, steps: int, cfg_scale: float | None, seed: int,
                 per_category: int = 2) -> None:
    """A grid of generated scenes: per prompt, the baseline and the accelerated model from the same noise."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from unislim.modeling.families.digits import DigitJudge, GEN_CATEGORIES
    from unislim.modeling.families.digits.scenes import encode_prompt, sample_prompt, to_digit_units

    g = torch.Generator().manual_seed(seed + 1)
    specs = [sample_prompt(c, g) for c in GEN_CATEGORIES for _ in range(per_category)]
    prompts = torch.tensor([encode_prompt(s.prompt) for s in specs], device=baseline.device)
    scenes = {name: m.generate_images(prompts, steps=steps, cfg_scale=cfg_scale,
                                      generator=torch.Generator().manual_seed(seed + 2)).float().cpu()
              for name, m in (("baseline", baseline), ("accelerated", accelerated))}  # fmt: skip
    judged = {name: DigitJudge.get().satisfies(specs, s) for name, s in scenes.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(len(GEN_CATEGORIES), 2 * per_category, squeeze=False,
                             figsize=(2.2 * 2 * per_category, 1.5 * len(GEN_CATEGORIES)))
    for i, spec in enumerate(specs):
        for j, name in enumerate(scenes):
            ax = axes[i // per_category][2 * (i % per_category) + j]
            ax.imshow(to_digit_units(scenes[name][i]).numpy(), cmap="gray", vmin=0, vmax=16)
            ax.set_title(f"{name}\n{spec.prompt.removeprefix('draw ')}", fontsize=5,
                         color="green" if judged[name][i] else "red")
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
