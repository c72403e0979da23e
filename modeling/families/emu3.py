"""The `emu3` family: `Emu3ForConditionalGeneration` from transformers (Emu3-Chat, Emu3-Gen).

One LM (`model.text_model`) over one vocabulary that holds text and the VQ codes
(`<|visual token000123|>`, mapped by `model.vocabulary_mapping`). The VQ (`model.vqmodel`) turns
images into codes and back; it is data processing, not part of a token's path.
- `und`: the processor expands `<image>` into `<|image start|>` "h*w" `<|image token|>`, h·(w+1)
  placeholders, `<|extra_201|>` `<|image end|>`; the model fills the placeholders with the
  embeddings of the image's VQ codes, a line end (`<|extra_200|>`) closing every row.
- `gen`: prompt + `<|image start|>` "h*w" `<|image token|>`, then h rows of w visual ids and a line
  end, then `<|extra_201|>` `<|image end|>` EOS — ordinary next-token prediction, constrained as HF
  `generate(prefix_allowed_tokens_fn=…)` constrains it. The grid (h, w) comes from `image_area`
  (pixels; the processor's `ratio` 1:1 and downsample 8): the family's `image_area`, else the
  processor's default (518400 = 720², Emu3-Gen's size).

Image-token positions are those that predict a grid token (visual id or line end): h·(w+1) per
row, bucketed by the index of the token they predict. Teacher forcing feeds the target image's grid.

Classifier-free guidance as HF's `UnbatchedClassifierFreeGuidanceLogitsProcessor`: a second,
separate forward over the negative prompt (default: the empty prompt with the same image prefix)
and the generated tokens, with its own cache; scores = u + scale · (c − u) on log-softmaxed logits.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from unislim.modeling.families.base import step_bucket
from unislim.modeling.adapters import ADAPTERS, Adapter
from unislim.modeling.surgery.scope import task_scope

from ._decoding import DecodeStep, Generation, LayerSkip, cfg_scale_at, run_step_hook
from ._unified import UnifiedFamily, _column, data_processing, device_of, position_ids, split_rows, unwrap
from .base import DataError, Rows, TaskKind
from .janus import CFG_PASSES, bucket_ranges

ADAPTER: dict[str, Any] = {
    "name": "emu3",
    "layers": "model.text_model.layers",
    "mlp": "mlp",
    "mlp_proj": {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"},
    "mlp_act": "act_fn",
    "attention": "self_attn",
    "attn_proj": {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj"},
    "config": "text_config",
}
ADAPTERS.update({"emu3": Adapter.from_dict(ADAPTER)})  # the built-in table, by model_type

UND = TaskKind("und", {"image": "PNG/JPEG bytes", "question": "str", "answer": "str"},
               description="image + question → answer; held-out answer NLL")
GEN = TaskKind("gen", {"prompt": "str"},
               optional={"image": "PNG/JPEG bytes: the target, resized to the generation size and VQ-encoded "
                                  "for the teacher-forced image-token NLL"},
               description="prompt → a grid of VQ ids; held-out image-token NLL needs the target image")
TRAILER = 3  # <|extra_201|> <|image end|> EOS after the grid


class Emu3Family(UnifiedFamily):
    name = "emu3"
    kinds = {"und": UND, "gen": GEN}
    ADAPTER = ADAPTER
    IMAGE_EXPECTED = ("an image at least 2 pixels high with an aspect ratio below 200:1 (the processor resizes "
                      "it to multiples of 8 within its min/max pixels)")
    # Both tasks: every token goes through the whole LM and the whole lm_head (text and visual rows).
    TASK_MODULES = {"und": ("model.text_model", "lm_head"), "gen": ("model.text_model", "lm_head")}

    def __init__(self, adapter: dict[str, Any] | None = None, trust_remote_code: bool = False,
                 processor_path=None, cfg_dropout: float = 0.1, image_area: int | None = None,
                 negative_prompt: str = ""):
        super().__init__(adapter, trust_remote_code, processor_path, cfg_dropout)
        self.image_area = image_area  # generation size in pixels; None: the processor's default
        self.negative_prompt = negative_prompt

    @classmethod
    def matches(cls, config) -> bool:
        return getattr(config, "model_type", None) == "emu3"

    def describe(self, model: nn.Module) -> str:
        t = model.config.text_config
        return f"emu3-{t.num_hidden_layers}L-d{t.hidden_size}"

    def image_token_mask(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) bool: the VQ-id positions (placeholders) of an understanding sequence (V-norm pruning)."""
        return input_ids == model.vocabulary_mapping.image_token_id

    def image_tokens(self, model_config=None) -> int:
        try:
            h, w = self.grid(self.processor(model_config))
        except DataError:  # no processor at hand: Emu3-Gen's 90 x 90 grid
            h = w = 90
        return h * (w + 1)

    def und_inputs(self, model: nn.Module, enc: dict[str, torch.Tensor]):
        """As the base, but the image placeholders already hold the image's visual ids (and line
        ends), its VQ codes computed here as data processing (`data_processing`): what
        `Emu3Model.forward` does with `pixel_values`, bit for bit, with the VQ outside the FLOPs."""
        inputs, image = super().und_inputs(model, enc)
        pixels, sizes = inputs.pop("pixel_values", None), inputs.pop("image_sizes", None)
        if pixels is not None:
            with torch.no_grad(), data_processing():
                visual = unwrap(model).model.get_image_tokens(pixels, sizes)  # (Σ h·(w+1),)
            assert visual.numel() == int(image.sum()), (visual.numel(), int(image.sum()))
            inputs["input_ids"] = inputs["input_ids"].masked_scatter(image, visual.to(inputs["input_ids"].dtype))
        return inputs, image

    # ------------------------------------------------------------ rows → tensors
    def area(self, processor, image_area: int | None = None) -> int:
        """The generation size in pixels: `image_area`, the family's, else the processor's default
        (518400 = 720², which `processor_config.json` does not save) brought into the image
        processor's [min_pixels, max_pixels], the sizes it can encode as teacher-forcing targets."""
        if image_area or self.image_area:
            return int(image_area or self.image_area)
        ip = processor.image_processor
        low, high = getattr(ip, "min_pixels", None), getattr(ip, "max_pixels", None)
        area = processor.image_area
        if high:
            area = min(area, int(high))
        if low:
            area = max(area, int(low))
        return area

    def grid(self, processor, image_area: int | None = None) -> tuple[int, int]:
        return processor.calculate_generate_size(processor.ratio, self.area(processor, image_area),
                                                 processor.downsample_ratio)

    def prompt_ids(self, processor, texts: list[str], image_area: int | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        area = self.area(processor, image_area)
        enc = processor(text=texts, return_for_image_generation=True, image_area=area, padding=True,
                        padding_side="left", return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    def encode_gen(self, rows: Rows, model_or_config=None, generator: torch.Generator | None = None,
                   require_image: bool = False, where: str = "gen rows", image_area: int | None = None,
                   negatives: bool = False) -> dict[str, Any]:
        """Prompts with the image prefix (left-padded) and, where given, target images resized to the
        generation size. With a `generator` (training) a `cfg_dropout` share of prompts become the
        negative prompt; `negatives` appends the negative prompt of every row (a [cond; uncond] batch)."""
        processor = self.processor(model_or_config)
        h, w = self.grid(processor, image_area)
        prompts = [str(p) for p in _column(rows, "prompt")]
        if generator is not None and self.cfg_dropout > 0:
            drop = torch.rand(len(prompts), generator=generator) < self.cfg_dropout
            prompts = [self.negative_prompt if d else p for p, d in zip(prompts, drop.tolist())]
        texts = prompts + [self.negative_prompt] * len(prompts) if negatives else prompts
        ids, mask = self.prompt_ids(processor, texts, image_area)
        out: dict[str, Any] = {"prompt_ids": ids, "prompt_mask": mask, "grid": (h, w)}
        images = self.images(rows, where)
        missing = [i for i in range(len(prompts)) if i >= len(images) or images[i] is None]
        if require_image and missing:
            raise DataError(f"{where}: row {missing[0]}: no target image (a gen row needs one for the "
                            "teacher-forced image-token loss and held-out NLL)")
        if not missing:
            size = (w * processor.downsample_ratio, h * processor.downsample_ratio)
            pix = processor.image_processor(images=[im.resize(size) for im in images], return_tensors="pt")
            sizes = torch.as_tensor(pix["image_sizes"])
            if not bool((sizes == torch.tensor([size[1], size[0]])).all()):
                raise DataError(f"{where}: the image processor resizes a {size[0]}x{size[1]} target to "
                                f"{sizes[0].tolist()}; expected the generation size (its min/max pixels "
                                f"must admit image_area {h * w * processor.downsample_ratio ** 2})")
            out["pixel_values"], out["image_sizes"] = pix["pixel_values"], sizes
        return out

    def image_codes(self, model: nn.Module, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> torch.Tensor:
        """Target images → VQ codes (B, h, w); the VQ is frozen data processing (`data_processing`)."""
        with torch.no_grad(), data_processing():
            out = model.model.vqmodel.encode(pixel_values.to(device_of(model), model.dtype), image_sizes)
        return torch.stack(list(out.image_tokens))

    def grid_ids(self, model: nn.Module, codes: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w) → the grid the LM reads and writes: visual ids, a line end per row (B, h·(w+1))."""
        mapping = model.vocabulary_mapping
        bpe = mapping.img2bpe_mapping_tensor.to(codes.device)[codes].long()  # (B, h, w)
        eol = torch.full((*codes.shape[:2], 1), mapping.eol_token_id, dtype=torch.long, device=codes.device)
        return torch.cat([bpe, eol], -1).flatten(1)

    # ------------------------------------------------------------ teacher forcing
    def grid_logits(self, model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                    grid: torch.Tensor, chunks: list[tuple[int, int, int]] | None = None,
                    on_chunk=None) -> torch.Tensor:
        """LM logits (B, G, V) at the G grid positions, teacher-forced on `grid`; `chunks` and
        `on_chunk` as in `JanusFamily.image_token_logits`."""
        device = device_of(model)
        prompt_ids, prompt_mask, grid = prompt_ids.to(device), prompt_mask.to(device), grid.to(device)
        b, p = prompt_ids.shape
        g = grid.shape[1]
        ids = torch.cat([prompt_ids, grid[:, :-1]], 1)  # (B, P+G-1)
        mask = torch.cat([prompt_mask, prompt_mask.new_ones(b, g - 1)], 1)
        positions = position_ids(mask)
        chunks = chunks or [(0, 0, g)]
        cache, logits = None, []
        for bucket, first, end in chunks:
            lo, hi = (0 if first == 0 else p - 1 + first), p - 1 + end
            if on_chunk is not None:
                on_chunk(bucket, first, end, hi - lo)
            with task_scope(model, "gen", token_mask=mask[:, lo:hi].bool()):
                out = model(input_ids=ids[:, lo:hi], attention_mask=mask[:, :hi], position_ids=positions[:, lo:hi],
                            cache=cache, use_cache=len(chunks) > 1, logits_to_keep=end - first)
            cache = out.cache
            logits.append(out.logits)  # (B, end-first, V)
        return torch.cat(logits, 1)

    def _gen_outputs(self, model: nn.Module, enc: dict[str, Any], train: bool = False):
        """Training: full-vocabulary NLL of every grid token (visual ids and line ends, as the LM
        was trained). Evaluation: the visual ids only, over the visual columns in code order (the
        distribution constrained decoding samples from); targets are VQ codes."""
        codes = self.image_codes(model, enc["pixel_values"], enc["image_sizes"])  # (B, h, w)
        grid = self.grid_ids(model, codes)
        logits = self.grid_logits(model, enc["prompt_ids"], enc["prompt_mask"], grid)  # (B, G, V)
        if train:
            return logits.flatten(0, 1), grid.flatten()
        h, w = codes.shape[1:]
        visual = logits.view(codes.shape[0], h, w + 1, -1)[:, :, :w]  # drop the line-end positions
        columns = model.vocabulary_mapping.img2bpe_mapping_tensor.to(logits.device).long()  # code → id
        return visual[..., columns].flatten(0, 2), codes.flatten().to(logits.device)

    # ------------------------------------------------------------ calibration
    def _calibrate_gen(self, model: nn.Module, batch: Rows, recorder, *, buckets: int = 4, cfg: str = "cond",
                       cfg_scale: float | None = None, **_) -> int:
        """As `JanusFamily._calibrate_gen`: teacher-forced where a target image is given, generated
        otherwise; the recorder sees the grid positions of the passes `cfg` names."""
        if cfg not in CFG_PASSES:
            raise ValueError(f"cfg must be one of {CFG_PASSES}, got {cfg!r}")
        images = _column(batch, "image")
        n_rows = len(_column(batch, "prompt"))
        has = np.array([i < len(images) and images[i] is not None for i in range(n_rows)])
        forced, free = split_rows(batch, has)
        with torch.no_grad():
            if has.any():
                enc = self.encode_gen(forced, model, require_image=True, negatives=cfg != "cond")
                b = int(has.sum())
                keep = torch.tensor([cfg != "uncond"] * b + [cfg != "cond"] * b)[: enc["prompt_ids"].shape[0]]
                grid = self.grid_ids(model, self.image_codes(model, enc["pixel_values"], enc["image_sizes"]))
                grid = torch.cat([grid] * (keep.numel() // b))[keep]
                ids, mask = enc["prompt_ids"][keep], enc["prompt_mask"][keep]

                def on_chunk(bucket, first, end, length):
                    recorder.bucket = str(bucket)
                    m = torch.zeros(ids.shape[0], length, dtype=torch.bool)
                    m[:, length - (end - first):] = True
                    recorder.token_mask = m.to(device_of(model))

                self.grid_logits(model, ids, mask, grid, bucket_ranges(grid.shape[1], buckets), on_chunk)
            if (~has).any():
                enc = self.encode_gen(free, model)
                h, w = enc["grid"]
                self.decode_images(model, enc["prompt_ids"], enc["prompt_mask"], enc["grid"], cfg_scale=cfg_scale,
                                   recorder=recorder, record_cfg=cfg, buckets=buckets, steps=h * (w + 1))
        recorder.bucket = None
        return n_rows

    # ------------------------------------------------------------ generation
    def _generate_gen(self, model: nn.Module, rows: Rows, image_area: int | None = None, **options) -> Generation:
        enc = self.encode_gen(rows, model, image_area=image_area)
        return self.decode_images(model, enc["prompt_ids"], enc["prompt_mask"], enc["grid"], **options)

    def allowed(self, model: nn.Module, step: int, grid: tuple[int, int]) -> torch.Tensor | int:
        """What step `step` may emit: the visual ids, or the one structural token due there."""
        h, w = grid
        offset, g = step + 1, h * (w + 1)  # tokens after <|image token|>, as HF's documented prefix function
        tok = self.processor(model).tokenizer
        if offset == g + 1:
            return tok.convert_tokens_to_ids(tok.eof_token)
        if offset == g + 2:
            return tok.convert_tokens_to_ids(tok.eoi_token)
        if offset == g + 3:
            return tok.eos_token_id
        if offset % (w + 1) == 0:
            return model.vocabulary_mapping.eol_token_id
        return torch.tensor(model.vocabulary_mapping.image_tokens)

    @torch.no_grad()
    def decode_images(self, model: nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                      grid: tuple[int, int], *, step_hook=None, cfg_schedule=None, cfg_scale: float | None = None,
                      negative_ids: torch.Tensor | None = None, negative_mask: torch.Tensor | None = None,
                      use_cache: bool = True, decode: bool = False, recorder=None, record_cfg: str = "cond",
                      buckets: int = 4, steps: int | None = None, **_) -> Generation:
        """The image sequence (grid + trailer, (B, h·(w+1) + 3)) as HF `generate` draws it with
        `prefix_allowed_tokens_fn` and `guidance_scale` / `negative_prompt_ids` (greedy; the same
        tokens for a constant scale on unpadded prompts), with a step hook (CFG scale, KV-safe layer
        skip); `use_cache=False` reruns the whole sequence every step. `steps` stops early
        (calibration needs the grid only). A step at scale 1 (a `cfg_schedule`) runs no
        unconditional forward; that branch reads the tokens it missed when it next runs, in one
        forward, so its cache never has a hole (`Generation.uncond_passes` counts its forwards)."""
        device = device_of(model)
        h, w = grid
        g = h * (w + 1)
        total = g + TRAILER if steps is None else steps
        default = cfg_scale if cfg_scale is not None else (model.generation_config.guidance_scale or 4.0)
        guided = cfg_schedule is not None or step_hook is not None or float(default) != 1.0 or record_cfg != "cond"
        b = prompt_ids.shape[0]
        branches = [(prompt_ids.to(device), prompt_mask.to(device))]
        if guided:
            if negative_ids is None:
                processor = self.processor(model)
                area = h * w * processor.downsample_ratio ** 2
                negative_ids, negative_mask = self.prompt_ids(processor, [self.negative_prompt] * b, area)
            branches.append((negative_ids.to(device), negative_mask.to(device)))
        record = [record_cfg != "uncond", record_cfg != "cond"]
        layers = self.decoder_layers(model)
        caches: list[Any] = [None] * len(branches)
        histories: list[list[set[int]]] = [[] for _ in branches]  # per branch: the layers each forward skipped
        lengths: list[list[int]] = [[] for _ in branches]  # ... and the tokens it fed
        fed = [0] * len(branches)  # generated tokens each branch has read
        tokens: list[torch.Tensor] = []
        result = Generation(tokens=prompt_ids.new_zeros(b, 0))
        with LayerSkip(layers) as skip:
            for s in range(total):
                scale = cfg_scale_at(cfg_schedule, s, total, default)
                step = run_step_hook(step_hook, DecodeStep(s, total, "gen", scale), len(layers))
                result.cfg_scales.append(float(step.cfg_scale))
                result.skipped.append(set(step.skip_layers))
                logps = []
                for i, (ids, mask) in enumerate(branches):
                    if i == 1 and recorder is None and float(step.cfg_scale) == 1.0:
                        continue  # scale 1 needs no unconditional pass: its branch catches up when next needed
                    done = torch.stack(tokens, 1) if tokens else ids.new_zeros(b, 0)
                    full = torch.cat([mask, mask.new_ones(b, s)], 1)
                    chunk = (0 if lengths[i] else ids.shape[1]) + s - fed[i]  # prompt (first run) + unread tokens
                    histories[i].append(set(step.skip_layers))
                    lengths[i].append(chunk)
                    if use_cache:
                        feed = torch.cat([ids, done], 1)[:, -chunk:]
                        skip.set_step(step.skip_layers, feed.shape, device)
                    else:
                        feed = torch.cat([ids, done], 1)
                        skip.set_history(histories[i], lengths[i], b, device)
                    fed[i] = s
                    result.uncond_passes += i
                    if recorder is not None:  # the position predicting grid token s, of the recorded passes
                        recorder.bucket = str(step_bucket(min(s, g - 1), g, buckets))
                        m = torch.zeros(b, feed.shape[1], dtype=torch.bool, device=device)
                        m[:, -1] = record[i] and s < g
                        recorder.token_mask = m
                    length = feed.shape[1]
                    with task_scope(model, "gen", token_mask=full[:, -length:].bool()):
                        out = model(input_ids=feed, attention_mask=full, position_ids=position_ids(full)[:, -length:],
                                    cache=caches[i], use_cache=use_cache, logits_to_keep=1)
                    caches[i] = out.cache if use_cache else None
                    logps.append(out.logits[:, -1].float())
                if len(logps) == 2:
                    cond, uncond = (F.log_softmax(x, -1) for x in logps)
                    scores = step.cfg_scale * (cond - uncond) + uncond
                else:
                    scores = logps[0]
                allowed = self.allowed(model, s, grid)
                if isinstance(allowed, int):
                    nxt = torch.full((b,), allowed, dtype=torch.long, device=device)
                else:
                    nxt = allowed.to(device)[scores[:, allowed.to(device)].argmax(-1)]
                tokens.append(nxt)
        result.tokens = torch.stack(tokens, 1)
        if decode:
            result.images = self.decode_pixels(model, result.tokens, grid)
        return result

    def decode_pixels(self, model: nn.Module, tokens: torch.Tensor, grid: tuple[int, int]) -> list:
        """Generated sequences (B, h·(w+1) + 3) → PIL images (VQ decoder, normalisation undone)."""
        from PIL import Image

        h, w = grid
        with torch.no_grad():
            pixels = model.decode_image_tokens(image_tokens=tokens.to(device_of(model)), height=h, width=w)
        ip = self.processor(model).image_processor
        mean, std = torch.tensor(ip.image_mean)[:, None, None], torch.tensor(ip.image_std)[:, None, None]
        rgb = ((pixels.float().cpu() * std + mean) / ip.rescale_factor).clamp(0, 255).to(torch.uint8)
        return [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in rgb]
