"""The unified families' own evaluation (beyond the generic held-out NLL / agreement / cost):
exact-match accuracy of greedy answers, and a grid of generated images.

Exact match compares the decoded answer with the held-out one after lower-casing and collapsing
whitespace: a tiny random model scores ~0, a trained one what its answers are worth. The grid is
`plots/generated_<task>.png` (the stage's output folder goes to MLflow as artifacts): one image per
held-out prompt, decoded by the family's own loop (greedy, the model's CFG scale unless given).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

EVAL_BATCH = 16
MAX_GRID = 16  # generated images in one grid


def normalise(text: str) -> str:
    return " ".join(str(text).lower().split())


def head(rows: dict[str, np.ndarray], n: int) -> dict[str, np.ndarray]:
    return {k: v[:n] for k, v in rows.items()}


def answer_budget(family, model, answers) -> int:
    """Tokens a greedy answer may take: the longest held-out answer and its EOS (at most 32)."""
    tok = family.processor(model).tokenizer
    return min(32, 1 + max(len(tok(str(a), add_special_tokens=False)["input_ids"]) for a in answers))


@torch.no_grad()
def greedy_answers(family, model, rows: dict[str, np.ndarray], max_new_tokens: int, **options) -> list[str]:
    n = len(rows["question"])
    texts: list[str] = []
    for lo in range(0, n, EVAL_BATCH):
        out = family.generate(model, "und", head({k: v[lo:] for k, v in rows.items()}, EVAL_BATCH),
                              max_new_tokens=max_new_tokens, **options)
        texts += out.texts
    return texts


def exact_match(predicted: list[str], truth) -> float:
    return float(np.mean([normalise(p) == normalise(t) for p, t in zip(predicted, truth)]))


@torch.no_grad()
def evaluate_unified(family, model, rows: dict[str, tuple[str, dict]], *, out_dir: Path | None,
                     progress: Callable[[str], None], n_und: int, n_gen: int, cfg_scale: float | None,
                     seed: int) -> dict[str, Any]:
    metrics: dict[str, Any] = {}
    for task, (kind, task_rows) in rows.items():
        n = len(next(iter(task_rows.values())))
        if kind == "und":
            sub = head(task_rows, min(n, n_und))
            answers = greedy_answers(family, model, sub, answer_budget(family, model, sub["answer"]))
            metrics[f"exact_match/{task}"] = exact_match(answers, sub["answer"])
            progress(f"{task}: exact match {metrics[f'exact_match/{task}']:.3f} on {len(answers)} held-out rows")
        elif kind == "gen" and out_dir is not None:
            prompts = [str(p) for p in task_rows["prompt"][:min(n, n_gen, MAX_GRID)]]
            out = family.generate(model, "gen", {"prompt": np.array(prompts, dtype=object)}, cfg_scale=cfg_scale,
                                  decode=True)
            path = Path(out_dir) / "plots" / f"generated_{task}.png"
            save_grid(out.images, prompts, path, title=f"{task}: generated, greedy, "
                      f"CFG {out.cfg_scales[0]:g} ({family.name})")
            progress(f"{task}: {len(prompts)} generated images → {path.name}")
    return metrics


def save_grid(images: list, captions: list[str], path: Path, title: str = "", cols: int = 4) -> None:
    """Images in rows of `cols`, each with its caption (the prompt)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = (len(images) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, caption in zip(axes.flat, images, captions):
        ax.imshow(np.asarray(image))
        ax.set_title(caption, fontsize=6)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
