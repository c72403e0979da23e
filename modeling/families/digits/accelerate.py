"""FlashU on the digits family: each technique alone, the `combined` ones together and all of them,
against the unaccelerated model — digits-MME / GenEval / FID, FLOPs, active parameters
(`evaluate_reference` on the samples the evaluate stage uses) and wall-clock latency per sample,
measured in this process in interleaved rounds against the baseline (median of `latency_repeats`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from unislim.modeling.accelerate import Acceleration

from .accelerate_compare import latency_ms, variants


def accelerate(family, model, acceleration: Acceleration, scores: dict | None, *, combined: list[str] | None,
               evaluate: dict[str, Any], latency: dict[str, int], out_dir: Path,
               progress: Callable[[str], None]) -> dict[str, Any]:
    """Rows per variant (the metrics.json keys plus `speedup/*`), the reported variant, what each
    technique claims it saved (`work`), the markdown table; writes the reported variant's plots and
    `plots/side_by_side.png`."""
    from .evaluate import evaluate_reference
    from .judge import DigitJudge

    models = variants(model, acceleration, scores, combined)
    DigitJudge.get()  # trained once per process, with gradients on
    e = evaluate
    rows: dict[str, dict[str, Any]] = {}
    reported = "combined" if "combined" in models else (combined or acceleration.enabled)[0]
    for name, m in models.items():
        rows[name] = evaluate_reference(m, n_und=e["n_und"], n_gen=e["n_gen"], steps=e["steps"],
                                        cfg_scale=e["cfg_scale"], seed=e["seed"],
                                        out_dir=out_dir if name == reported else None)
        progress(f"{name}: mme {rows[name]['mme/overall']:.3f}  geneval {rows[name]['geneval/overall']:.3f}  "
                 f"fid {rows[name]['fid/gen']:.2f}")
    progress(f"latency: {latency['repeats']} interleaved rounds of {latency['und']} und samples and "
             f"{latency['gen']} gen prompts per variant")
    times = latency_ms(models, n_und=latency["und"], n_gen=latency["gen"], steps=e["steps"],
                       cfg_scale=e["cfg_scale"], repeats=latency["repeats"], seed=e["seed"])
    for name, row in rows.items():
        row["latency_ms/und_per_sample"], row["latency_ms/gen_per_sample"] = times[name]["und"], times[name]["gen"]
        row["cpu_ms/und_per_sample"] = times[name]["und_cpu"]
        row["cpu_ms/gen_per_sample"] = times[name]["gen_cpu"]
        for task in ("und", "gen"):
            row[f"speedup/{task}"] = times["baseline"][task] / times[name][task]
            row[f"speedup_cpu/{task}"] = times["baseline"][f"{task}_cpu"] / times[name][f"{task}_cpu"]
        row["model"] = models[name].acceleration.describe() if name != "baseline" else "baseline"
    side_by_side(out_dir / "plots" / "side_by_side.png", model, models[reported], steps=e["steps"],
                 cfg_scale=e["cfg_scale"], seed=e["seed"])
    return {"rows": rows, "reported": reported, "table": table(rows), "not_applicable": {},
            "work": {n: dict(m.work) for n, m in models.items() if n != "baseline"}}


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

    from .judge import DigitJudge
    from .scenes import GEN_CATEGORIES, encode_prompt, sample_prompt, to_digit_units

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
