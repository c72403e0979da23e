"""Each technique alone and all combined, against the unaccelerated model, on the same samples.

`variants` builds the models; `latency_ms` times them in the same process, interleaved (see
`interleaved_latency`); quality and FLOPs come from `evaluate_reference`, which runs the
accelerated models through their `answer` / `generate_images` like any reference model.
"""

from __future__ import annotations

import torch
from torch import nn

from .scenes import (
    ANSWER_LEN,
    GEN_CATEGORIES,
    QUESTION_TYPES,
    encode_prompt,
    make_und_batch,
    sample_prompt,
)

from unislim.modeling.accelerate.latency import interleaved_latency
from .accelerate_runtime import AcceleratedModel
from unislim.modeling.accelerate.settings import Acceleration


def variants(model: nn.Module, acceleration: Acceleration, scores: dict[str, dict[str, torch.Tensor]] | None,
             combined: list[str] | None = None) -> dict[str, nn.Module]:
    """{"baseline": model, <technique>: that technique alone, ..., "combined": the techniques
    `combined` (default: all), "all": every technique, when that is not what "combined" holds}."""
    combined = combined or acceleration.enabled
    out: dict[str, nn.Module] = {"baseline": model}
    for technique in acceleration.enabled:
        out[technique] = AcceleratedModel(model, acceleration.only(technique), scores)
    if len(combined) > 1:
        out["combined"] = AcceleratedModel(model, acceleration.subset(combined), scores)
    if len(acceleration.enabled) > 1 and set(combined) != set(acceleration.enabled):
        out["all"] = AcceleratedModel(model, acceleration, scores)
    return out


def timing_batches(n_und: int, n_gen: int, seed: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Held-out understanding samples (images (n, 8, 16), questions (n, L)) and prompts (m, P),
    spread over the question types and GenEval categories."""
    g = torch.Generator().manual_seed(seed)
    und, _ = make_und_batch([QUESTION_TYPES[i % len(QUESTION_TYPES)] for i in range(n_und)], g, "heldout")
    questions = und["und_input_ids"][:, :-ANSWER_LEN]
    prompts = [encode_prompt(sample_prompt(GEN_CATEGORIES[i % len(GEN_CATEGORIES)], g).prompt) for i in range(n_gen)]
    return und["und_images"].to(device), questions.to(device), torch.tensor(prompts, device=device)


@torch.no_grad()
def latency_ms(models: dict[str, nn.Module], *, n_und: int, n_gen: int, steps: int, cfg_scale: float | None,
               repeats: int, seed: int = 0) -> dict[str, dict[str, float]]:
    """{name: {"und", "gen": wall-clock ms per sample, "und_cpu", "gen_cpu": this process's CPU ms per
    sample}}, each the median over `repeats` interleaved rounds."""
    device = next(iter(models.values())).device
    images, questions, prompts = timing_batches(n_und, n_gen, seed, device)
    # Run the baseline once on 4x the batch first: in a fresh process the allocator maps and unmaps
    # every large tensor (page faults, counted as time) until freeing bigger ones has raised its
    # threshold, which slows the baseline's larger tensors more than the accelerated ones (measured:
    # 4.9 -> 3.5 ms per understanding sample) and would inflate the speed-ups.
    baseline = next(iter(models.values()))
    baseline.answer(images.repeat(4, 1, 1), questions.repeat(4, 1), max_new_tokens=ANSWER_LEN)
    baseline.generate_images(prompts.repeat(4, 1), steps=steps, cfg_scale=cfg_scale,
                             generator=torch.Generator().manual_seed(seed))
    und = {n: (lambda m=m: m.answer(images, questions, max_new_tokens=ANSWER_LEN)) for n, m in models.items()}
    gen = {n: (lambda m=m: m.generate_images(prompts, steps=steps, cfg_scale=cfg_scale,
                                             generator=torch.Generator().manual_seed(seed)))
           for n, m in models.items()}  # fmt: skip
    und_s, gen_s = interleaved_latency(und, repeats), interleaved_latency(gen, repeats)
    return {n: {"und": 1000 * und_s[n]["wall"] / n_und, "gen": 1000 * gen_s[n]["wall"] / n_gen,
                "und_cpu": 1000 * und_s[n]["cpu"] / n_und, "gen_cpu": 1000 * gen_s[n]["cpu"] / n_gen} for n in models}
