"""FlashU on the unified families (Janus, Emu3): training-free, task-aware acceleration of
autoregressive image-token generation and of understanding, measured against the unaccelerated
model in this process.

| technique | here |
|---|---|
| task pruning | each task runs its own copy of the model, every LM MLP cut to that task's top neurons (its own Eq. 7 scores): `keep_und` for answers, `keep_gen` for image tokens |
| layer skipping | `RedundancySkip`: every `every` image tokens the step runs every layer and measures each layer's cos(input, output) at the new position; the `count` most similar layers are skipped until the next measurement, KV-cache safe (`LayerSkip`: the skipped layer still writes the token's K/V) |
| CFG schedule | the piecewise scale through the family's loop (HF's logits processors hold one constant scale). A step at scale 1 runs no unconditional pass where the loop can spare it: Emu3's separate branch catches up later; Janus's batched rows leave the batch once the schedule stays at 1 |
| V-norm token pruning | understanding: the image tokens with the smallest value norms at layer l are hidden from every later layer (`VisualTokenPruner`) |
| head cache | not applicable (`HEAD_CACHE`) |

`task_pruning.full_last_steps` (τ: the last denoising steps run the full network) has no
counterpart either: an image token is decided once, in one step, not refined over steps.

Each variant is measured on the held-out rows (teacher-forced NLL, top-1 agreement and KL with the
baseline, FLOPs per sample) and by decoding (answers: exact match and agreement with the baseline's
answers; images: share of image tokens equal to the baseline's), with the decode FLOPs per sample
counted as the variant runs and latency per sample in interleaved rounds.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from unislim.modeling.accelerate import Acceleration, interleaved_latency

from ._metrics import answer_budget, exact_match, head

HEAD_CACHE = ("autoregressive image tokens have no diffusion head that reruns over the same tokens at every "
              "step: each step predicts a new token at a new position, and what adjacent steps share (the keys "
              "and values of earlier tokens) is the KV cache already; reusing a layer's update from the "
              "previous token must still write the new token's K/V, so it costs what a KV-safe layer skip "
              "costs — a variant of layer skipping, not a separate technique")
TAU = ("task_pruning.full_last_steps is not applied: an image token is decided in one step, not refined over "
       "denoising steps, so there is no 'last steps' to run in full")


class RedundancySkip:
    """A step hook (with forward hooks on the decoder layers) for FlashU's dynamic layer skipping."""

    def __init__(self, layers: nn.ModuleList, every: int, count: int):
        self.layers, self.every, self.count = layers, every, count
        self.cos: torch.Tensor | None = None  # (L,) at the last measurement
        self.measuring = False
        self.skips = 0  # (step, layer) pairs skipped
        self._handles: list[Any] = []

    def __enter__(self) -> RedundancySkip:
        self.cos = torch.zeros(len(self.layers))
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_hook(
                lambda m, a, k, out, i=i: self._measure(i, a, k, out), with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _measure(self, i: int, args, kwargs, out) -> None:
        if self.measuring:
            x = args[0] if args else kwargs["hidden_states"]
            y = out[0] if isinstance(out, tuple) else out
            self.cos[i] = F.cosine_similarity(x[:, -1].float(), y[:, -1].float(), dim=-1).mean().cpu()

    def __call__(self, step) -> None:
        self.measuring = step.index % self.every == 0
        if not self.measuring and self.count:
            chosen = torch.argsort(self.cos, descending=True, stable=True)[: self.count].tolist()
            step.skip_layers |= set(chosen)
            self.skips += len(chosen)


def segment_schedule(segments) -> Callable[[int, int], float]:
    """((start fraction, scale), ...) → (step, steps) → the scale of the segment the step is in."""

    def scale(index: int, total: int) -> float:
        return float([v for start, v in segments if start <= index / total][-1])

    return scale


class Variant:
    """One set of techniques: the model each task runs, the family copy understanding runs through
    (V-norm pruning), the options image generation runs with, and what they saved."""

    def __init__(self, family, model: nn.Module, techniques: list[str], acceleration: Acceleration,
                 scores: dict | None):
        from unislim.modeling.surgery.prune import keep_neurons

        self.techniques = techniques
        self.models = {"und": model, "gen": model}
        self.family = copy.copy(family)
        self.family.token_pruning = None
        if "task_pruning" in techniques:
            p = acceleration.task_pruning
            missing = [k for k in ("und", "gen") if not scores or k not in scores]
            if missing:
                raise ValueError(f"accelerate.task_pruning needs the {missing} tasks' neuron scores (score stage)")
            for kind, keep in (("und", p.keep_und), ("gen", p.keep_gen)):
                pruned = copy.deepcopy(model)
                keep_neurons(pruned, family.adapter(pruned), kind, scores[kind], keep=keep)
                self.models[kind] = pruned.eval()
        if "token_pruning" in techniques:
            self.family.token_pruning = (acceleration.token_pruning.layer, acceleration.token_pruning.keep)
        self.skip = acceleration.layer_skip if "layer_skip" in techniques else None
        self.schedule = (segment_schedule(acceleration.cfg_schedule.segments) if "cfg_schedule" in techniques
                         else None)
        self.work: dict[str, float] = {}

    def answers(self, rows: dict, max_new_tokens: int):
        return self.family.generate(self.models["und"], "und", rows, max_new_tokens=max_new_tokens)

    def images(self, rows: dict, cfg_scale: float | None):
        model = self.models["gen"]
        if self.skip is None:
            return self.family.generate(model, "gen", rows, cfg_scale=cfg_scale, cfg_schedule=self.schedule)
        with RedundancySkip(self.family.decoder_layers(model), self.skip.every, self.skip.count) as hook:
            out = self.family.generate(model, "gen", rows, cfg_scale=cfg_scale, cfg_schedule=self.schedule,
                                       step_hook=hook)
        self.work["layer_skips_per_image"] = hook.skips
        return out


@torch.no_grad()
def accelerate(family, model: nn.Module, acceleration: Acceleration, scores: dict | None, *,
               combined: list[str] | None, evaluate: dict, latency: dict, heldout=None, tasks=None,
               out_dir=None, progress=print, **_) -> dict[str, Any]:
    from unislim.modeling.evaluation import heldout_rows
    from unislim.modeling.flops import count_flops

    not_applicable = {"head_cache": HEAD_CACHE} if acceleration.head_cache is not None else {}
    usable = [t for t in acceleration.enabled if t not in not_applicable]
    if not usable:
        raise ValueError(f"accelerate: none of {acceleration.enabled} applies to the {family.name} family: "
                         + "; ".join(f"{t}: {why}" for t, why in not_applicable.items()))
    notes = {"task_pruning.full_last_steps": TAU} if "task_pruning" in usable else {}
    rows = heldout_rows(family, heldout, tasks, 64, evaluate["seed"])
    by_kind = {kind: (task, r) for task, (kind, r) in reversed(list(rows.items()))}  # the first task of a kind
    if set(by_kind) != {"und", "gen"}:
        raise ValueError(f"accelerate: the {family.name} family needs held-out rows of an und and a gen task "
                         f"(the shard stage's heldout/); got kinds {sorted(by_kind)}")
    chosen = [t for t in (combined or usable) if t in usable]
    sets = {t: [t] for t in usable}
    if len(chosen) > 1:
        sets["combined"] = chosen
    if len(usable) > 1 and usable != chosen:
        sets["all"] = usable
    reported = "combined" if "combined" in sets else chosen[0]
    variants = {"baseline": Variant(family, model, [], acceleration, scores)}
    variants.update({name: Variant(family, model, ts, acceleration, scores) for name, ts in sets.items()})

    (und_task, und_rows), (gen_task, gen_rows) = by_kind["und"], by_kind["gen"]
    und_sample = head(und_rows, latency["und"])
    gen_sample = {"prompt": gen_rows["prompt"][:latency["gen"]]}
    budget = answer_budget(family, model, und_sample["answer"])
    cfg = evaluate["cfg_scale"]
    base_answers = variants["baseline"].answers(und_sample, budget)
    base_images = variants["baseline"].images(gen_sample, cfg)
    table: dict[str, dict[str, Any]] = {}
    for name, v in variants.items():
        progress(f"{name}: {'+'.join(v.techniques) or 'no technique'}")
        r: dict[str, Any] = {"model": "baseline" if name == "baseline" else "accelerate:" + "+".join(v.techniques)}
        for task, (kind, task_rows) in rows.items():  # teacher-forced, against the unaccelerated model
            r.update(teacher_forced(v, variants["baseline"], task, kind, task_rows))
        answers = v.answers(und_sample, budget)
        images = v.images(gen_sample, cfg)
        n_und, n_gen = len(answers.texts), len(gen_sample["prompt"])
        r[f"exact_match/{und_task}"] = exact_match(answers.texts, und_sample["answer"])
        r[f"answer_agreement/{und_task}"] = exact_match(answers.texts, base_answers.texts)
        r[f"token_agreement/{gen_task}"] = float((images.tokens == base_images.tokens).float().mean())
        r[f"flops/{und_task}_decode_per_sample"] = count_flops(lambda: v.answers(und_sample, budget)) / n_und
        r[f"flops/{gen_task}_decode_per_sample"] = count_flops(lambda: v.images(gen_sample, cfg)) / n_gen
        r["params/total"] = float(sum(m.num_parameters() for m in {id(m): m for m in v.models.values()}.values()))
        for kind in ("und", "gen"):
            r[f"params/active_{kind}"] = float(family.active_parameters(v.models[kind], kind))
        r["params/active"] = r["params/active_gen"]
        v.work["uncond_passes_per_image"] = images.uncond_passes
        v.work["image_tokens"] = int(images.tokens.shape[1])
        if v.family.token_pruning is not None:
            v.work["image_tokens_hidden_per_answer"] = _hidden_image_tokens(v, und_sample)
        table[name] = r
    progress(f"latency: {latency['repeats']} interleaved rounds of {len(base_answers.texts)} answers and "
             f"{len(gen_sample['prompt'])} images per variant")
    calls = {f"{und_task}": {n: (lambda v=v: v.answers(und_sample, budget)) for n, v in variants.items()},
             f"{gen_task}": {n: (lambda v=v: v.images(gen_sample, cfg)) for n, v in variants.items()}}
    sizes = {und_task: len(base_answers.texts), gen_task: len(gen_sample["prompt"])}
    for task, fns in calls.items():
        times = interleaved_latency(fns, latency["repeats"])
        for n in variants:
            table[n][f"latency_ms/{task}_decode_per_sample"] = 1000 * times[n]["wall"] / sizes[task]
            table[n][f"cpu_ms/{task}_decode_per_sample"] = 1000 * times[n]["cpu"] / sizes[task]
            table[n][f"speedup/{task}"] = times["baseline"]["wall"] / times[n]["wall"]
            table[n][f"speedup_cpu/{task}"] = times["baseline"]["cpu"] / times[n]["cpu"]
    return {"rows": table, "reported": reported, "table": markdown(table, und_task, gen_task, notes),
            "not_applicable": not_applicable, "notes": notes,
            "work": {n: dict(v.work) for n, v in variants.items() if n != "baseline"}}


@torch.no_grad()
def teacher_forced(v: Variant, base: Variant, task: str, kind: str, rows: dict, batch: int = 16) -> dict[str, float]:
    """Held-out NLL, top-1 agreement and KL(baseline ‖ variant) at every predicted position, and
    FLOPs per sample, of the variant's model *through its family copy* (V-norm pruning is a family
    option, so the baseline must run through its own)."""
    from unislim.modeling.flops import count_flops

    n = len(next(iter(rows.values())))
    nll = agree = kl = 0.0
    positions = 0
    for lo in range(0, n, batch):
        part = {k: x[lo:lo + batch] for k, x in rows.items()}
        out = v.family.eval_batch(v.models[kind], kind, part, torch.Generator())
        ref = base.family.eval_batch(base.models[kind], kind, part, torch.Generator())
        logp, ref_logp = F.log_softmax(out.logits.double(), -1), F.log_softmax(ref.logits.double(), -1)
        nll += float(F.nll_loss(logp, out.targets.to(logp.device), reduction="sum"))
        agree += float((out.logits.argmax(-1) == ref.logits.argmax(-1)).sum())
        kl += float((ref_logp.exp() * (ref_logp - logp)).sum())
        positions += len(out.targets)
    sample = head(rows, min(n, batch))
    flops = count_flops(lambda: v.family.eval_batch(v.models[kind], kind, sample, torch.Generator()))
    return {f"nll/{task}": nll / positions, f"agreement/{task}": agree / positions,
            f"kl/{task}": max(0.0, kl / positions), f"flops/{task}_per_sample": flops / min(n, batch)}


def _hidden_image_tokens(v: Variant, rows: dict) -> float:
    """Image tokens per answer that V-norm pruning hides from the later layers."""
    fam, model = v.family, v.models["und"]
    enc = fam.encode_und(rows, model, with_answer=False)
    image = fam.image_token_mask(model, enc["input_ids"])
    layer, keep = fam.token_pruning
    kept = np.ceil(keep * image.sum(1).double().numpy())
    return float((image.sum(1).double().numpy() - kept).mean())


def markdown(table: dict[str, dict[str, Any]], und: str, gen: str, notes: dict[str, str]) -> str:
    """One row per variant: decode speed-ups (wall; CPU time of this process in parentheses),
    agreement with the baseline, held-out NLL, decode FLOPs per sample."""
    lines = [f"| variant | speed-up {und} | speed-up {gen} | answer agreement | image-token agreement | "
             f"NLL {und} / {gen} | decode GFLOPs {und} / {gen} | active params {und} / {gen} |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in table.items():
        lines.append(
            f"| {name} | {r[f'speedup/{und}']:.2f}× ({r[f'speedup_cpu/{und}']:.2f}×) | "
            f"{r[f'speedup/{gen}']:.2f}× ({r[f'speedup_cpu/{gen}']:.2f}×) | {r[f'answer_agreement/{und}']:.3f} | "
            f"{r[f'token_agreement/{gen}']:.3f} | {r[f'nll/{und}']:.3f} / {r[f'nll/{gen}']:.3f} | "
            f"{r[f'flops/{und}_decode_per_sample'] / 1e9:.4f} / {r[f'flops/{gen}_decode_per_sample'] / 1e9:.4f} | "
            f"{r['params/active_und']:,.0f} / {r['params/active_gen']:,.0f} |")
    return "\n".join(lines) + "\n" + "".join(f"\n- `{k}`: {why}" for k, why in notes.items())
