"""Calibration tasks: what a calibration row holds and how it runs through a model.

Three kinds of task, each a Parquet schema and a runner:

| kind   | columns                                       | runs                                          |
|--------|-----------------------------------------------|-----------------------------------------------|
| `und`  | image (list<float>, 128, in [-1, 1]), question, answer | reference model: forward over image + question + answer |
| `gen`  | prompt (str), seed (int)                      | reference model: the whole denoising loop with CFG, statistics per step bucket |
| `text` | input_ids (list<int>)                         | any causal LM: one forward                     |

`reference_rows` draws rows for the reference tasks from the *train* split (calibration never
sees evaluation images). Runners set the recorder's token mask (padding is never counted) and,
for `gen`, its step bucket, so per-step statistics fall out of the same pass.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

KINDS = ("und", "gen", "text")
COLUMNS = {"und": ("image", "question", "answer"), "gen": ("prompt", "seed"), "text": ("input_ids",)}


def check_columns(kind: str, columns: list[str], where: str) -> None:
    """Raise a ValueError naming `where` (task and file) if a required column is missing."""
    if kind not in KINDS:
        raise ValueError(f"{where}: unknown task kind {kind!r} (one of {KINDS})")
    missing = [c for c in COLUMNS[kind] if c not in columns]
    if missing:
        raise ValueError(f"{where}: a {kind!r} task needs columns {list(COLUMNS[kind])}; missing {missing} "
                         f"(found {sorted(columns)})")


def reference_rows(kind: str, n: int, seed: int) -> list[dict[str, Any]]:
    """n calibration rows of a reference task, drawn from the train split with `seed`."""
    from .families.digits.scenes import (GEN_CATEGORIES, QUESTION_TYPES, render, sample_prompt, sample_question,
                                   to_model_units)

    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        if kind == "und":
            qtype = QUESTION_TYPES[i % len(QUESTION_TYPES)]
            scene, question, answer = sample_question(qtype, g)
            image = to_model_units(render(scene, g, "train")).flatten().tolist()
            rows.append({"image": image, "question": question, "answer": answer, "qtype": qtype})
        elif kind == "gen":
            category = GEN_CATEGORIES[i % len(GEN_CATEGORIES)]
            spec = sample_prompt(category, g)
            rows.append({"prompt": spec.prompt, "category": category, "seed": seed * 100_003 + i})
        else:
            raise ValueError(f"the reference model has tasks 'und' and 'gen', not {kind!r}")
    return rows


def step_bucket(index: int, steps: int, buckets: int) -> int:
    """Denoising step `index` of `steps` → bucket 0 (noisiest) … buckets − 1 (cleanest)."""
    return min(buckets - 1, index * buckets // steps)


@torch.no_grad()
def run_batch(model: torch.nn.Module, kind: str, batch: dict[str, np.ndarray], recorder, *,
              gen_steps: int = 20, cfg_scale: float | None = None, buckets: int = 4) -> int:
    """Run one batch of rows (column → array, as Ray Data hands them) under `recorder`; returns rows."""
    device = next(model.parameters()).device
    if kind == "text":
        ids = [torch.as_tensor(list(r), dtype=torch.long) for r in batch["input_ids"]]
        length = max(len(r) for r in ids)
        input_ids = torch.zeros(len(ids), length, dtype=torch.long)
        mask = torch.zeros(len(ids), length, dtype=torch.bool)
        for i, r in enumerate(ids):  # right padding, masked out of the statistics
            input_ids[i, :len(r)], mask[i, :len(r)] = r, True
        recorder.token_mask = mask.to(device)
        model(input_ids=input_ids.to(device), attention_mask=mask.to(device))
        return len(ids)

    from .families.digits.scenes import encode_answer, encode_prompt, encode_question

    pad = model.config.pad_token_id
    n_img = model.config.num_image_tokens
    if kind == "und":
        images = torch.tensor(np.stack([np.asarray(r, dtype=np.float32) for r in batch["image"]]))
        images = images.view(-1, model.config.image_height, model.config.image_width).to(device)
        ids = torch.tensor([encode_question(str(q)) + encode_answer(str(a))
                            for q, a in zip(batch["question"], batch["answer"])], device=device)
        recorder.token_mask = torch.cat([torch.ones(len(ids), n_img, dtype=torch.bool, device=device), ids != pad], 1)
        model.und_logits(images, ids)
        return len(ids)
    if kind != "gen":
        raise ValueError(f"unknown task kind {kind!r} (one of {KINDS})")

    prompts = torch.tensor([encode_prompt(str(p)) for p in batch["prompt"]], device=device)  # (B, P)
    cfg = float(model.config.cfg_scale if cfg_scale is None else cfg_scale)
    shape = (n_img, model.config.patch_dim)
    x = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in batch["seed"]])
    x = x.to(device, model.dtype)  # (B, 32, 4): per-row noise, so batching never changes a row
    keys = torch.cat([prompts != pad, torch.ones(len(prompts), n_img, dtype=torch.bool, device=device)], 1)
    if cfg != 1.0:
        null = model.null_prompt_like(prompts)
        keys = torch.cat([keys, torch.cat([null != pad, keys[:, -n_img:]], 1)])
    recorder.token_mask = keys
    for i in range(gen_steps):  # the Euler loop of `generate_images`, with a bucket per step
        t, t_next = 1.0 - i / gen_steps, 1.0 - (i + 1) / gen_steps
        recorder.bucket = str(step_bucket(i, gen_steps, buckets))
        x = x + (t_next - t) * model.denoise_velocity(x, t, prompts, cfg)
    recorder.bucket = None
    return len(prompts)
