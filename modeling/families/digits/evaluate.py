"""digits-MME, digits-GenEval, digits-FID, parameter counts, FLOPs and latency of a reference model.

All samples are drawn from the held-out digits with fixed seeds, so two models evaluated with
the same arguments see exactly the same questions, prompts and starting noise.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .judge import DigitJudge, frechet_distance
from .scenes import (
    ANSWER_LEN,
    GEN_CATEGORIES,
    QUESTION_TYPES,
    encode_prompt,
    make_und_batch,
    render,
    sample_prompt,
    to_digit_units,
    to_model_units,
)
from .vocab import TOKENIZER


def _flops_of(model: nn.Module, fn: Callable[[], object]) -> int:
    from unislim.modeling.flops import count_flops

    return count_flops(fn)


def _timed(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


@torch.no_grad()
def evaluate_reference(
    model,
    *,
    n_und: int = 40,
    n_gen: int = 24,
    steps: int = 20,
    cfg_scale: float | None = None,
    seed: int = 0,
    out_dir: str | Path | None = None,
    active: Callable[[str], int] | None = None,
) -> dict:
    """Evaluates understanding on n_und held-out samples per question type and generation on
    n_gen prompts per GenEval category; returns the flat metrics dict (MLflow metric names).

    `mme/*`: exact-match answer accuracy. `geneval/*`: share of scenes the judge finds to satisfy
    the prompt. `fid/gen`: Fréchet distance between the generated scenes and real held-out scenes
    drawn for the same prompts, each paired with its prompt (`DigitJudge.fid_features`).
    `flops/*`: one und sample incl. its greedy decode, one gen sample incl. all steps and both
    CFG passes (`modeling.flops`: every matmul as it runs). `params/active_<task>`: parameters a
    token of the task passes through (`active(task)`, default the model's `num_active_parameters`);
    `params/active` is the generation task's. `latency_ms/*`: the batched run's wall clock divided by its samples.
    """
    was_training = model.training
    model.eval()
    device = model.device
    cfg = float(model.config.cfg_scale if cfg_scale is None else cfg_scale)
    judge = DigitJudge.get()
    metrics: dict[str, float] = {}

    # ---- understanding (digits-MME)
    g = torch.Generator().manual_seed(seed)
    qtypes = [q for q in QUESTION_TYPES for _ in range(n_und)]
    und, meta = make_und_batch(qtypes, g, "heldout")
    question_ids = und["und_input_ids"][:, : -ANSWER_LEN].to(device)  # (N, QUESTION_LEN), left-padded
    images = und["und_images"].to(device)
    answers, und_s = _timed(lambda: model.answer(images, question_ids, max_new_tokens=ANSWER_LEN))
    predicted = [TOKENIZER.decode(a) for a in answers.tolist()]
    correct = torch.tensor([p == m[2] for p, m in zip(predicted, meta)])
    for i, q in enumerate(QUESTION_TYPES):
        metrics[f"mme/{q}"] = float(correct[i * n_und : (i + 1) * n_und].float().mean())
    metrics["mme/overall"] = sum(metrics[f"mme/{q}"] for q in QUESTION_TYPES) / len(QUESTION_TYPES)

    # ---- generation (digits-GenEval, digits-FID)
    g = torch.Generator().manual_seed(seed + 1)
    specs = [sample_prompt(c, g) for c in GEN_CATEGORIES for _ in range(n_gen)]
    prompt_ids = torch.tensor([encode_prompt(s.prompt) for s in specs], device=device)
    real = torch.stack([to_model_units(render(s.scene(g), g, "heldout")) for s in specs])  # (N, 8, 16)
    noise_g = torch.Generator().manual_seed(seed + 2)
    scenes, gen_s = _timed(lambda: model.generate_images(prompt_ids, steps=steps, cfg_scale=cfg, generator=noise_g))
    scenes = scenes.float().cpu()
    ok = judge.satisfies(specs, scenes)
    for i, c in enumerate(GEN_CATEGORIES):
        metrics[f"geneval/{c}"] = float(ok[i * n_gen : (i + 1) * n_gen].float().mean())
    metrics["geneval/overall"] = sum(metrics[f"geneval/{c}"] for c in GEN_CATEGORIES) / len(GEN_CATEGORIES)
    metrics["fid/gen"] = frechet_distance(judge.fid_features(specs, scenes), judge.fid_features(specs, real))

    # ---- cost
    metrics["params/total"] = float(sum(p.numel() for p in model.parameters()))
    active = active or getattr(model, "num_active_parameters")
    metrics["params/active_und"], metrics["params/active_gen"] = (float(active(t)) for t in ("und", "gen"))
    metrics["params/active"] = metrics["params/active_gen"]  # the primary task (what MoE and pruning of gen cut)
    metrics["flops/und_per_sample"] = float(
        _flops_of(model, lambda: model.answer(images[:1], question_ids[:1], max_new_tokens=ANSWER_LEN))
    )
    metrics["flops/gen_per_sample"] = float(
        _flops_of(model, lambda: model.generate_images(prompt_ids[:1], steps=steps, cfg_scale=cfg,
                                                       generator=torch.Generator().manual_seed(0)))
    )  # fmt: skip
    metrics["latency_ms/und_per_sample"] = 1000.0 * und_s / len(qtypes)
    metrics["latency_ms/gen_per_sample"] = 1000.0 * gen_s / len(specs)

    if out_dir is not None:
        _write_artifacts(Path(out_dir), specs, scenes, ok, meta, predicted, n_und, n_gen)
    model.train(was_training)
    return metrics


def _write_artifacts(out_dir: Path, specs, scenes, ok, meta, predicted, n_und: int, n_gen: int, per_row: int = 6) -> None:
    """`plots/generated_grid.png` (scenes per category, prompt as label, green = judged right)
    and `samples.json` (a few questions and prompts with the model's outputs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out_dir / "plots").mkdir(parents=True, exist_ok=True)
    cols = min(per_row, n_gen)
    fig, axes = plt.subplots(len(GEN_CATEGORIES), cols, figsize=(2.2 * cols, 1.45 * len(GEN_CATEGORIES)), squeeze=False)
    for r, cat in enumerate(GEN_CATEGORIES):
        for c in range(cols):
            i, ax = r * n_gen + c, axes[r][c]
            ax.imshow(to_digit_units(scenes[i]).numpy(), cmap="gray", vmin=0, vmax=16)
            ax.set_title(specs[i].prompt.removeprefix("draw "), fontsize=6, color="green" if ok[i] else "red")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.axvline(7.5, color="tab:blue", lw=0.5)
        axes[r][0].set_ylabel(cat, fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "plots" / "generated_grid.png", dpi=120)
    plt.close(fig)

    samples = {
        "understanding": [
            {"type": QUESTION_TYPES[i // n_und], "question": meta[i][1], "expected": meta[i][2], "answer": predicted[i]}
            for t in range(len(QUESTION_TYPES)) for i in range(t * n_und, t * n_und + min(3, n_und))
        ],
        "generation": [
            {"category": specs[i].category, "prompt": specs[i].prompt, "satisfied": bool(ok[i])}
            for c in range(len(GEN_CATEGORIES)) for i in range(c * n_gen, c * n_gen + min(3, n_gen))
        ],
    }  # fmt: skip
    (out_dir / "samples.json").write_text(json.dumps(samples, indent=2))
