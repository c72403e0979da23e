"""The `janus` family: `JanusForConditionalGeneration` (Janus, Janus-Pro 1B/7B) from transformers.

One checkpoint does both tasks on one Llama LM (`model.language_model`):
- `und`: a SigLIP encoder (`model.vision_model`) and aligner (`model.aligner`) fill the
  `<image_placeholder>` slots of BOS … `<begin_of_image>` + placeholders + `<end_of_image>` +
  question; the answer comes from `lm_head` (tied to `embed_tokens`).
- `gen`: prompt + `<begin_of_image>`, then `vision_config.num_image_tokens` VQ codes, each fed
  back through `model.generation_embeddings` + `model.generation_aligner`
  (`prepare_embeddings_for_image_generation`) and predicted by `model.generation_head`.
  `model.vqmodel` turns a target image into codes (teacher forcing) and codes into pixels.

Image-token positions are the ones that predict a code: the last prompt position (`<begin_of_image>`)
predicts code 0 and the input of code k predicts code k + 1, so a row has `num_image_tokens` of
them, in a teacher-forced forward and in decoding alike; they are bucketed by the index of the code
they predict (`families.base.step_bucket`), as diffusion steps are.

Classifier-free guidance (as HF's `generate(generation_mode="image")`): the batch is doubled, the
second half is the unconditional prompt (every token but BOS and `<begin_of_image>` replaced by pad,
attention mask unchanged), and logits = uncond + scale · (cond − uncond) from the generation head.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from unislim.modeling.families.base import step_bucket
from unislim.modeling.adapters import ADAPTERS, Adapter
from unislim.modeling.surgery.scope import task_scope

from unislim.modeling.surgery.mod.layer import select_cache_rows

from ._decoding import DecodeStep, Generation, LayerSkip, cfg_scale_at, check_guidance, run_step_hook, unguided_from
from ._unified import UnifiedFamily, _column, data_processing, device_of, position_ids, split_rows
from .base import DataError, Rows, TaskKind

# Built-in adapter facts (keys of `modeling.adapters.Adapter`): a Llama LM, sizes in text_config.
ADAPTER: dict[str, Any] = {
    "name": "janus",
    "layers": "model.language_model.layers",
    "mlp": "mlp",
    "mlp_proj": {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
    "mlp_act": "act_fn",
    "attention": "self_attn",
    "attn_proj": {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"},
    "config": "text_config",
}
ADAPTERS.update({"janus": Adapter.from_dict(ADAPTER)})  # the built-in table, by model_type

UND = TaskKind("und", {"image": "PNG/JPEG bytes", "question": "str", "answer": "str"},
               description="image + question → answer; held-out answer NLL")
GEN = TaskKind("gen", {"prompt": "str"},
               optional={"image": "PNG/JPEG bytes: the target, VQ-encoded for the teacher-forced image-token NLL"},
               description="prompt → VQ image tokens; held-out image-token NLL needs the target image")
CFG_PASSES = ("cond", "uncond", "both")


def bucket_ranges(n: int, buckets: int) -> list[tuple[int, int, int]]:
    """(bucket, first, end) of image-token indices 0..n-1 grouped by `step_bucket`."""
    if not 1 <= buckets <= n:
        raise ValueError(f"buckets must be in [1, {n}] (one image has {n} image tokens), got {buckets}")
    ranges = []
    for k in range(n):
        b = step_bucket(k, n, buckets)
        if ranges and ranges[-1][0] == b:
            ranges[-1] = (b, ranges[-1][1], k + 1)
        else:
            ranges.append((b, k, k + 1))
    return ranges


def cfg_rows(cfg: str, b: int) -> torch.Tensor:
    """Which rows of a [cond; uncond] batch of 2·b rows a recorder sees."""
    if cfg not in CFG_PASSES:
        raise ValueError(f"cfg must be one of {CFG_PASSES}, got {cfg!r}")
    return torch.tensor([cfg != "uncond"] * b + [cfg != "cond"] * b)


class JanusFamily(UnifiedFamily):
    name = "janus"
    kinds = {"und": UND, "gen": GEN}
    ADAPTER = ADAPTER
    IMAGE_EXPECTED = ("an image of any size and mode (the processor makes it RGB, scales its longest side to the "
                      "vision size and pads it square)")
    # The VQ model is data processing (image → codes for teacher forcing, codes → pixels for
    # viewing) and counts in params/total only.
    TASK_MODULES = {
        "und": ("model.vision_model", "model.aligner", "model.language_model", "lm_head"),
        "gen": ("model.generation_embeddings", "model.generation_aligner", "model.language_model",
                "model.generation_head"),
    }

    @classmethod
    def matches(cls, config) -> bool:
        return getattr(config, "model_type", None) == "janus"

    def describe(self, model: nn.Module) -> str:
        t = model.config.text_config
        return f"janus-{t.num_hidden_layers}L-d{t.hidden_size}"

    def image_tokens(self, model_config=None) -> int:
        return int(model_config.vision_config.num_image_tokens) if model_config is not None else 576

    def image_token_mask(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) bool: the image placeholder positions of an understanding sequence (V-norm pruning)."""
        return input_ids == model.config.image_token_id

    # ------------------------------------------------------------ rows → tensors
    def unconditional(self, prompt_ids: torch.Tensor, tokenizer) -> torch.Tensor:
        """HF's unconditional prompt: every token but BOS and `<begin_of_image>` becomes pad."""
        boi = tokenizer.convert_tokens_to_ids(tokenizer.boi_token)
        keep = (prompt_ids == tokenizer.bos_token_id) | (prompt_ids == boi)
        return prompt_ids.masked_fill(~keep, tokenizer.pad_token_id)

    def encode_gen(self, rows: Rows, model_or_config=None, generator: torch.Generator | None = None,
                   require_image: bool = False, where: str = "gen rows") -> dict[str, Any]:
        """Prompts (+ `<begin_of_image>`, left-padded) and, where given, the target images as pixels.
        With a `generator` (training) a `cfg_dropout` share of prompts become unconditional."""
        processor = self.processor(model_or_config)
        prompts = _column(rows, "prompt")
        enc = processor(text=prompts, generation_mode="image", padding=True, padding_side="left", return_tensors="pt")
        ids = enc["input_ids"]
        if generator is not None and self.cfg_dropout > 0:
            drop = torch.rand(len(prompts), generator=generator) < self.cfg_dropout
            ids = torch.where(drop[:, None], self.unconditional(ids, processor.tokenizer), ids)
        out: dict[str, Any] = {"prompt_ids": ids, "prompt_mask": enc["attention_mask"]}
        images = self.images(rows, where)
        missing = [i for i in range(len(prompts)) if i >= len(images) or images[i] is None]
        if require_image and missing:
            raise DataError(f"{where}: row {missing[0]}: no target image (a gen row needs one for the "
                            "teacher-forced image-token loss and held-out NLL)")
        if not missing:
            out["pixel_values"] = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return out

    def image_codes(self, model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
        """Target images → VQ codes (B, num_image_tokens); the VQ is frozen data processing (no
        gradients, and outside any FLOP counter: `data_processing`)."""
        with torch.no_grad(), data_processing():
            out = model.model.vqmodel.encode(pixel_values.to(device_of(model), model.dtype))
        return out.image_tokens.view(pixel_values.shape[0], -1)

    # ------------------------------------------------------------ teacher forcing
    def image_token_logits(self, model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                           codes: torch.Tensor, chunks: list[tuple[int, int, int]] | None = None,
                           on_chunk=None) -> torch.Tensor:
        """Generation-head logits (B, N, K) at the N image-token positions, teacher-forced on `codes`.

        The prompt's embeddings, then `prepare_embeddings_for_image_generation(codes[:, :-1])`, through
        the LM. With `chunks` [(bucket, first, end)] the codes run chunk by chunk over a KV cache (one
        forward's worth of compute), `on_chunk(bucket, first, end, length)` before each (the recorder's
        bucket and token mask)."""
        device = device_of(model)
        prompt_ids, prompt_mask, codes = prompt_ids.to(device), prompt_mask.to(device), codes.to(device)
        b, p = prompt_ids.shape
        n = codes.shape[1]
        embeds = torch.cat([model.get_input_embeddings()(prompt_ids),
                            model.prepare_embeddings_for_image_generation(codes[:, :-1])], 1)  # (B, P+N-1, d)
        mask = torch.cat([prompt_mask, prompt_mask.new_ones(b, n - 1)], 1)
        positions = position_ids(mask)
        chunks = chunks or [(0, 0, n)]
        lm, head = model.model.language_model, model.model.generation_head
        cache, logits = None, []
        for bucket, first, end in chunks:
            lo, hi = (0 if first == 0 else p - 1 + first), p - 1 + end  # positions predicting codes first..end-1
            if on_chunk is not None:
                on_chunk(bucket, first, end, hi - lo)
            with task_scope(model, "gen", token_mask=mask[:, lo:hi].bool()):
                out = lm(inputs_embeds=embeds[:, lo:hi], attention_mask=mask[:, :hi], position_ids=positions[:, lo:hi],
                         cache=cache, use_cache=len(chunks) > 1)
            cache = out.cache
            logits.append(head(out.last_hidden_state[:, -(end - first):]))  # (B, end-first, K)
        return torch.cat(logits, 1)

    def _gen_outputs(self, model: nn.Module, enc: dict[str, Any], train: bool = False):
        codes = self.image_codes(model, enc["pixel_values"])
        logits = self.image_token_logits(model, enc["prompt_ids"], enc["prompt_mask"], codes)
        return logits.flatten(0, 1), codes.flatten()

    # ------------------------------------------------------------ calibration
    def _calibrate_gen(self, model: nn.Module, batch: Rows, recorder, *, buckets: int = 4, cfg: str = "cond",
                       cfg_scale: float | None = None, **_) -> int:
        """Rows with a target image: teacher-forced, bucket by bucket; rows without: generated with
        this family's loop. Either way the recorder sees only image-token positions (see the module
        docstring), of the CFG passes `cfg` names."""
        images = _column(batch, "image")
        has = np.array([i < len(images) and images[i] is not None for i in range(len(_column(batch, "prompt")))])
        forced, free = split_rows(batch, has)
        tok = self.processor(model).tokenizer
        n = model.config.vision_config.num_image_tokens
        with torch.no_grad():
            if has.any():
                enc = self.encode_gen(forced, model, require_image=True)
                ids, mask = enc["prompt_ids"], enc["prompt_mask"]
                codes = self.image_codes(model, enc["pixel_values"])
                rows = cfg_rows(cfg, ids.shape[0])
                ids = torch.cat([ids, self.unconditional(ids, tok)])[rows]
                mask, codes = torch.cat([mask, mask])[rows], torch.cat([codes, codes])[rows]

                def on_chunk(bucket, first, end, length):
                    recorder.bucket = str(bucket)
                    m = torch.zeros(ids.shape[0], length, dtype=torch.bool)
                    m[:, length - (end - first):] = True
                    recorder.token_mask = m.to(device_of(model))

                self.image_token_logits(model, ids, mask, codes, bucket_ranges(n, buckets), on_chunk)
            if (~has).any():
                enc = self.encode_gen(free, model)
                self.decode_images(model, enc["prompt_ids"], enc["prompt_mask"], cfg_scale=cfg_scale,
                                   recorder=recorder, record_cfg=cfg, buckets=buckets)
        recorder.bucket = None
        return int(has.size)

    # ------------------------------------------------------------ generation
    def _generate_gen(self, model: nn.Module, rows: Rows, **options) -> Generation:
        enc = self.encode_gen(rows, model)
        return self.decode_images(model, enc["prompt_ids"], enc["prompt_mask"], **options)

    @torch.no_grad()
    def decode_images(self, model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, *,
                      step_hook=None, cfg_schedule=None, cfg_scale: float | None = None, use_cache: bool = True,
                      do_sample: bool = False, temperature: float = 1.0, generator: torch.Generator | None = None,
                      decode: bool = False, recorder=None, record_cfg: str = "cond", buckets: int = 4,
                      **_) -> Generation:
        """`num_image_tokens` codes per prompt, as HF `generate(generation_mode="image")` draws them
        (greedy, the same tokens for a constant scale), with a step hook (CFG scale, KV-safe layer
        skip) and without a cache when `use_cache=False` (every step reruns the whole sequence).
        Positions follow the attention mask (HF's image mode counts left padding as positions, so
        the two agree on unpadded prompts). `recorder`: calibration (see `_calibrate_gen`).
        Once a `cfg_schedule` holds scale 1 for every remaining step, the unconditional rows leave
        the batch and its cache: the rest of the image costs one pass (`Generation.uncond_passes`
        counts the steps that ran the unconditional rows)."""
        device = device_of(model)
        tok = self.processor(model).tokenizer
        n = model.config.vision_config.num_image_tokens
        default = cfg_scale if cfg_scale is not None else (model.generation_config.guidance_scale or 5.0)
        guided = cfg_schedule is not None or step_hook is not None or float(default) != 1.0 or record_cfg != "cond"
        prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
        b = prompt_ids.shape[0]
        ids = torch.cat([prompt_ids, self.unconditional(prompt_ids, tok)]) if guided else prompt_ids
        mask = torch.cat([prompt_mask, prompt_mask]) if guided else prompt_mask
        copies = ids.shape[0] // b
        recorded = cfg_rows(record_cfg, b)[: ids.shape[0]].to(device)
        prompt_embeds = model.get_input_embeddings()(ids)  # (cB, P, d)
        lm, head, layers = model.model.language_model, model.model.generation_head, self.decoder_layers(model)
        tokens: list[torch.Tensor] = []
        history: list[set[int]] = []
        cache = None
        result = Generation(tokens=prompt_ids.new_zeros(b, 0))
        planned = None if cfg_schedule is None else [cfg_scale_at(cfg_schedule, s, n, default) for s in range(n)]
        with LayerSkip(layers) as skip:
            for s in range(n):
                step = run_step_hook(step_hook, DecodeStep(s, n, "gen", cfg_scale_at(cfg_schedule, s, n, default)),
                                     len(layers))
                if copies == 2 and recorder is None and unguided_from(planned, s) and float(step.cfg_scale) == 1.0:
                    keep = torch.arange(b, device=device)  # the conditional rows
                    ids, mask, prompt_embeds, copies = ids[:b], mask[:b], prompt_embeds[:b], 1
                    if cache is not None:
                        select_cache_rows(cache, keep)
                check_guidance(step, copies)
                result.uncond_passes += copies - 1
                result.cfg_scales.append(float(step.cfg_scale))
                result.skipped.append(set(step.skip_layers))
                if use_cache:
                    feed = prompt_embeds if s == 0 else model.prepare_embeddings_for_image_generation(
                        torch.cat([tokens[-1]] * copies)[:, None])
                    skip.set_step(step.skip_layers, feed.shape[:2], device)
                else:
                    done = torch.stack(tokens, 1) if tokens else prompt_ids.new_zeros(b, 0)
                    feed = torch.cat([prompt_embeds,
                                      model.prepare_embeddings_for_image_generation(torch.cat([done] * copies))], 1)
                    history.append(set(step.skip_layers))
                    skip.set_history(history, [ids.shape[1]] + [1] * s, ids.shape[0], device)
                full = torch.cat([mask, mask.new_ones(mask.shape[0], s)], 1)
                length = feed.shape[1]
                if recorder is not None:  # only the position predicting code s, of the recorded passes
                    recorder.bucket = str(step_bucket(s, n, buckets))
                    m = torch.zeros(ids.shape[0], length, dtype=torch.bool, device=device)
                    m[:, -1] = recorded
                    recorder.token_mask = m
                with task_scope(model, "gen", token_mask=full[:, -length:].bool()):
                    out = lm(inputs_embeds=feed, attention_mask=full, position_ids=position_ids(full)[:, -length:],
                             cache=cache, use_cache=use_cache)
                cache = out.cache if use_cache else None
                scores = head(out.last_hidden_state[:, -1])  # (cB, K)
                if copies == 2:
                    cond, uncond = scores.split(b)
                    scores = uncond + (cond - uncond) * step.cfg_scale
                if do_sample:
                    probs = torch.softmax(scores.float() / temperature, -1)
                    nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
                else:
                    nxt = scores.argmax(-1)
                tokens.append(nxt)
        result.tokens = torch.stack(tokens, 1)
        if decode:
            result.images = self.decode_pixels(model, result.tokens)
        return result

    def decode_pixels(self, model: nn.Module, codes: torch.Tensor) -> list:
        """VQ codes (B, N) → PIL images: the VQ decoder, then the image processor's normalisation
        undone. (`JanusImageProcessorPil.postprocess` would do this, but in transformers 5.24 its
        `normalize` assumes channels first while `decode_image_tokens` returns channels last: it
        raises "mean must have <H> elements" at every size.)"""
        from PIL import Image

        with torch.no_grad():
            pixels = model.decode_image_tokens(codes.to(device_of(model))).float().cpu()  # (B, H, W, 3)
        ip = self.processor(model).image_processor
        mean, std = torch.tensor(ip.image_mean), torch.tensor(ip.image_std)
        rgb = ((pixels * std + mean) / ip.rescale_factor).clamp(0, 255).to(torch.uint8).numpy()
        return [Image.fromarray(x) for x in rgb]
