"""`UnifiedFamily`: what Janus and Emu3 share — rows through the checkpoint's processor, row checks,
the understanding task (image + question → answer) and the answer decoding loop.

The generation task differs per model (Janus: a separate generation embedding and head over VQ
codes; Emu3: VQ codes as ordinary ids with a line-end token per row) and lives in `janus.py` and
`emu3.py`. Both tasks run on the same LM layers.

Rows are Ray Data batches, `{column: numpy array}`; images are PNG/JPEG bytes. The processor saved
in the checkpoint folder (`AutoProcessor.from_pretrained(path)`) turns them into tensors; the family
instance caches it lazily and never pickles it (a Ray worker reloads it from the path).
"""

from __future__ import annotations

import io
from contextlib import nullcontext
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from unislim.modeling.surgery.scope import task_scope

from ._decoding import DecodeStep, Generation, LayerSkip, VisualTokenPruner, run_step_hook
from .base import DataError, Family, Rows, TokenOutputs

IGNORE = -100


def decode_image(data: Any, where: str, row: int):
    """PNG/JPEG bytes → an RGB PIL image; `DataError` naming the row if they are not one."""
    from PIL import Image

    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DataError(f"{where}: row {row}: image must be PNG/JPEG bytes, got {type(data).__name__}")
    try:
        image = Image.open(io.BytesIO(bytes(data)))
        image.load()
    except Exception as e:  # PIL raises several types for broken data
        raise DataError(f"{where}: row {row}: the image bytes do not decode as an image ({e})") from None
    try:
        return image.convert("RGB")
    except Exception as e:
        raise DataError(f"{where}: row {row}: an image of mode {image.mode!r} cannot be made RGB; expected an "
                        f"RGB, RGBA, L or P image ({e})") from None


def _column(rows: Rows | Any, name: str) -> list:
    if hasattr(rows, "column_names"):  # a pyarrow Table
        return rows.column(name).to_pylist() if name in rows.column_names else []
    return list(rows[name]) if name in rows else []


def _pad(seqs: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([[value] * (width - len(s)) + s if left else s + [value] * (width - len(s)) for s in seqs])


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """HF generate's rule: 0, 1, … over real tokens, 0 on (left) padding."""
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def image_grid(images: list, cols: int = 4):
    """PIL images pasted into one grid image (rows of `cols`)."""
    from PIL import Image

    w, h = images[0].size
    rows = (len(images) + cols - 1) // cols
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, image in enumerate(images):
        grid.paste(image, ((i % cols) * w, (i // cols) * h))
    return grid


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def data_processing():
    """Run the VQ (image → codes for a teacher-forced target) outside any active FLOP counter
    (`modeling.flops` counts through a torch dispatch mode): turning a target image into codes is
    data processing, like tokenising a prompt, not the model's compute. Its parameters count in
    `params/total` only."""
    from torch.utils._python_dispatch import _disable_current_modes

    return _disable_current_modes()


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DeepSpeed engine / DDP wrapper (whose only child is `module`)."""
    while list(model._modules) == ["module"]:
        model = model.module
    return model


class UnifiedFamily(Family):
    """Shared half of the Janus and Emu3 families; subclasses implement the `gen` task."""

    primary_task = "gen"  # partition makes the generation path sparse; params/active reports it
    # A forward outside the family's code (a plain `model(input_ids=...)`) is the model's own text
    # path: surgery that behaves per task treats it as understanding.
    default_task = "und"
    causal_kinds = ("und", "gen")  # both decode token by token: MoD routes them with a causal predictor
    mod_keep_last: ClassVar[dict[str, int]] = {}  # the last tokens are unknown while decoding: none forced

    ADAPTER: ClassVar[dict[str, Any]] = {}
    IMAGE_EXPECTED: ClassVar[str] = "an RGB-convertible image"  # what the processor takes, for error messages
    TASK_MODULES: ClassVar[dict[str, tuple[str, ...]]] = {}  # modules one token of a task passes through

    def __init__(self, adapter: dict[str, Any] | None = None, trust_remote_code: bool = False,
                 processor_path: str | Path | None = None, cfg_dropout: float = 0.1):
        super().__init__(adapter, trust_remote_code)
        self.processor_path = None if processor_path is None else str(processor_path)
        self.cfg_dropout = cfg_dropout  # share of training prompts replaced by the unconditional one
        self.token_pruning: tuple[int, float] | None = None  # (layer, keep): V-norm pruning of und image tokens
        self._processor = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_processor"] = None  # reloaded from processor_path in the worker
        return state

    def auto_class(self, config) -> type:
        from transformers import AutoModelForImageTextToText

        return AutoModelForImageTextToText

    # ------------------------------------------------------------ processor, adapter facts
    def processor(self, model_or_config=None):
        """The checkpoint's own processor, loaded once from `processor_path` (default: the folder
        the model was loaded from)."""
        if self._processor is None:
            path = self.processor_path
            if path is None and model_or_config is not None:
                config = getattr(model_or_config, "config", model_or_config)
                path = getattr(config, "_name_or_path", None) or None
            if not path or not Path(path).is_dir():
                raise DataError(f"the {self.name} family needs the checkpoint's processor: no processor folder "
                                f"(got {path!r}); load the model from its folder or pass processor_path")
            from transformers import AutoProcessor

            self.processor_path = str(path)
            self._processor = AutoProcessor.from_pretrained(path)
        return self._processor

    def save_processor(self, out_dir: str | Path, model=None) -> None:
        """Write the processor beside a checkpoint a stage saves (the checkpoint is unusable without it)."""
        self.processor(model).save_pretrained(str(out_dir))

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return self.adapter(model).decoder_layers(model)

    def tokens_per_sample(self, kind: str, model_config=None) -> float:
        """Image tokens plus a typical question + answer (und) or prompt (gen): weights a MoD
        schedule's token budget across the tasks."""
        return float(self.image_tokens(model_config) + (24 if kind == "und" else 16))

    def image_tokens(self, model_config=None) -> int:
        """Positions of one image in a sequence (subclasses)."""
        raise NotImplementedError

    # ------------------------------------------------------------ data
    def check_table(self, kind: str, table, where: str, model_config=None) -> None:
        super().check_table(kind, table, where, model_config)
        task = self.kinds[kind]
        texts = [c for c in (*task.columns, *task.optional) if c != "image"]
        if not len(_column(table, next(iter(task.columns)))):
            raise DataError(f"{where}: no rows")
        for name in texts:
            for i, value in enumerate(_column(table, name)):
                if not isinstance(value, str) or not value.strip():
                    raise DataError(f"{where}: row {i}: empty {name} (a {kind!r} row needs a non-empty string)")
        images = _column(table, "image")
        processor = None
        if images:
            try:
                processor = self.processor(model_config)
            except DataError:
                processor = None  # no checkpoint at hand: decoding is still checked
        for i, data in enumerate(images):
            if data is None:
                if "image" in task.columns:
                    raise DataError(f"{where}: row {i}: missing image")
                continue
            image = decode_image(data, where, i)
            if processor is not None:
                self._check_image(kind, image, processor, f"{where}: row {i}")

    def _check_image(self, kind: str, image, processor, where: str) -> None:
        """Raise `DataError` if the processor cannot take this image (subclasses say what they expect)."""
        try:
            processor.image_processor(images=[image], return_tensors="pt")
        except Exception as e:
            raise DataError(f"{where}: the image ({image.width}x{image.height}) is rejected by "
                            f"{type(processor.image_processor).__name__} ({e}); expected "
                            f"{self.IMAGE_EXPECTED}") from None

    def images(self, rows: Rows, where: str = "rows") -> list:
        return [None if d is None else decode_image(d, where, i) for i, d in enumerate(_column(rows, "image"))]

    # ------------------------------------------------------------ the understanding task
    def und_prompt(self, processor, question: str) -> str:
        """The question with one image, through the checkpoint's chat template where it has one."""
        if getattr(processor, "chat_template", None):
            conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            return processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        return f"{processor.image_token}{question}"

    def encode_und(self, rows: Rows, model_or_config=None, with_answer: bool = True,
                   where: str = "und rows") -> dict[str, torch.Tensor]:
        """Understanding rows → model inputs. Prompts are left-padded (by the processor), answers
        (+ EOS) appended and right-padded; `labels` hold the answer ids, IGNORE elsewhere."""
        processor = self.processor(model_or_config)
        tok = processor.tokenizer
        questions, images = _column(rows, "question"), self.images(rows, where)
        enc = processor(text=[self.und_prompt(processor, q) for q in questions], images=images, padding=True,
                        padding_side="left", return_tensors="pt")
        out = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
        if "image_sizes" in out:
            out["image_sizes"] = torch.as_tensor(out["image_sizes"])
        prompt, mask = enc["input_ids"], enc["attention_mask"]
        if not with_answer:
            return {"input_ids": prompt, "attention_mask": mask, **out}
        answers = [tok(a, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for a in _column(rows, "answer")]
        ids = _pad([p.tolist() + a for p, a in zip(prompt, answers)], tok.pad_token_id)
        full = _pad([m.tolist() + [1] * len(a) for m, a in zip(mask, answers)], 0)
        labels = _pad([[IGNORE] * prompt.shape[1] + a for a in answers], IGNORE)
        return {"input_ids": ids, "attention_mask": full, "position_ids": position_ids(full), "labels": labels, **out}

    def und_inputs(self, model: nn.Module, enc: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor],
                                                                                   torch.Tensor]:
        """Encoded und rows as the model's inputs on its device, and the image-token positions of
        each sequence (B, T) bool (V-norm pruning ranks them)."""
        device = device_of(model)
        inputs = {k: v.to(device) for k, v in enc.items() if k != "labels"}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        return inputs, self.image_token_mask(model, inputs["input_ids"])

    def _und_logits(self, model: nn.Module, enc: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs, image = self.und_inputs(model, enc)
        with task_scope(model, "und", token_mask=inputs["attention_mask"].bool()), self.visual_pruning(model, image):
            return model(**inputs, use_cache=False).logits  # (B, T, V); no cache: MoD routers route

    def visual_pruning(self, model: nn.Module, image: torch.Tensor):
        """FlashU's V-norm visual-token pruning around an understanding forward or decoding loop,
        when `token_pruning` = (layer, keep) is set (`_decoding.VisualTokenPruner`); else nothing."""
        if self.token_pruning is None:
            return nullcontext()
        layer, keep = self.token_pruning
        layers = self.decoder_layers(model)
        if not 0 <= layer < len(layers) - 1:
            raise ValueError(f"token_pruning.layer must be in 0..{len(layers) - 2} (later layers read the kept "
                             f"tokens; the model has {len(layers)} layers), got {layer}")
        return VisualTokenPruner(layers, layer, image, keep)

    # ------------------------------------------------------------ stage-facing methods
    def calibrate(self, model: nn.Module, kind: str, batch: Rows, recorder, **options) -> int:
        """und: one teacher-forced forward; the recorder sees every real token of the sequence
        (template, image placeholders, question, answer), never padding. gen: see the subclass."""
        self.task_kind(kind)
        if kind == "gen":
            return self._calibrate_gen(model, batch, recorder, **options)
        enc = self.encode_und(batch, model)
        recorder.bucket = None
        recorder.token_mask = enc["attention_mask"].bool().to(device_of(model))
        with torch.no_grad():
            self._und_logits(model, enc)
        return enc["input_ids"].shape[0]

    def collate(self, rows: dict[str, Rows], generator: torch.Generator, model_config=None) -> dict[str, Any]:
        batch: dict[str, Any] = {}
        for kind, part in rows.items():
            self.task_kind(kind)
            if kind == "und":
                batch["und"] = self.encode_und(part, model_config)
            else:
                batch["gen"] = self.encode_gen(part, model_config, generator=generator, require_image=True)
        return batch

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Answer NLL (labels on the answer and its EOS only) + image-token NLL (teacher-forced).
        `model` may be the training loop's DeepSpeed engine: its module is called directly (the
        generation path reaches into submodules; ZeRO 0-2 keep every weight in place)."""
        model = unwrap(model)
        parts: dict[str, torch.Tensor] = {}
        if "und" in batch:
            logits = self._und_logits(model, batch["und"])
            labels = batch["und"]["labels"].to(logits.device)
            parts["und_loss"] = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                                ignore_index=IGNORE)
        if "gen" in batch:
            logits, targets = self._gen_outputs(model, batch["gen"], train=True)
            parts["gen_loss"] = F.cross_entropy(logits.float(), targets)
        if not parts:
            raise ValueError(f"the batch holds no task of the {self.name} family (keys {sorted(batch)})")
        return sum(parts.values()), parts

    def eval_batch(self, model: nn.Module, kind: str, rows: Rows, generator: torch.Generator) -> TokenOutputs:
        """und: the logits at every answer position (answer tokens and EOS); gen: at every image token."""
        self.task_kind(kind)
        with torch.no_grad():
            if kind == "gen":
                logits, targets = self._gen_outputs(model, self.encode_gen(rows, model, require_image=True))
                return TokenOutputs(logits, targets)
            enc = self.encode_und(rows, model)
            logits = self._und_logits(model, enc)[:, :-1]
            labels = enc["labels"][:, 1:].to(logits.device)
            keep = labels != IGNORE
            return TokenOutputs(logits[keep], labels[keep])

    def generate(self, model: nn.Module, kind: str, inputs: Rows, *, step_hook=None, cfg_schedule=None,
                 **options) -> Generation:
        """Greedy decoding with the family's own loop. und: answers to (image, question) rows
        (`max_new_tokens`, default 16); gen: image tokens for prompt rows (see the subclass)."""
        self.task_kind(kind)
        if kind == "gen":
            return self._generate_gen(model, inputs, step_hook=step_hook, cfg_schedule=cfg_schedule, **options)
        enc = self.encode_und(inputs, model, with_answer=False)
        return self.decode_answers(model, enc, step_hook=step_hook, **options)

    def active_parameters(self, model: nn.Module, task: str) -> int:
        """Unique parameters of the modules one token of `task` passes through (TASK_MODULES; tied
        weights once), less the routed experts an MoE MLP skips for it (`surgery.params`)."""
        from unislim.modeling.surgery.params import active_parameters

        self.task_kind(task)
        prefixes = tuple(f"{m}." for m in self.TASK_MODULES[task])
        return active_parameters(model, task, lambda name: not name.startswith(prefixes))

    # ------------------------------------------------------------ the family's own metrics, FlashU
    def evaluate(self, model: nn.Module, *, out_dir: Path | None = None, progress=print, rows=None,
                 n_und: int = 40, n_gen: int = 24, cfg_scale: float | None = None, seed: int = 0,
                 **_) -> dict[str, Any]:
        """`exact_match/<und task>`: greedy answers equal to the held-out answer (whitespace and case
        ignored) on up to `n_und` rows; for each gen task, up to `n_gen` (at most 16) held-out
        prompts decoded into `plots/generated_<task>.png` (an MLflow artifact)."""
        from ._metrics import evaluate_unified

        return evaluate_unified(self, model, rows or {}, out_dir=out_dir, progress=progress, n_und=n_und,
                                n_gen=n_gen, cfg_scale=cfg_scale, seed=seed)

    def accelerate(self, model: nn.Module, acceleration, scores, **options) -> dict[str, Any]:
        """FlashU's techniques for autoregressive image tokens (`_accelerate.py`)."""
        from ._accelerate import accelerate

        return accelerate(self, model, acceleration, scores, **options)

    # ------------------------------------------------------------ the answer decoding loop
    @torch.no_grad()
    def decode_answers(self, model: nn.Module, enc: dict[str, torch.Tensor], *, step_hook=None,
                       max_new_tokens: int = 16, use_cache: bool = True, **_) -> Generation:
        """Greedy answers: what HF `generate(max_new_tokens=…, do_sample=False)` gives, token for
        token, with a step hook that may skip layers (KV-cache safe, see `LayerSkip`).

        Without a cache every step reruns the LM over the prompt's merged embeddings (the image
        features already in place, captured from the first forward) and the answer so far: feeding
        ids again would re-count an image placeholder the model happened to generate."""
        device = device_of(model)
        tok = self.processor(model).tokenizer
        extra, image = self.und_inputs(model, enc)
        prompt, mask = extra.pop("input_ids"), extra.pop("attention_mask")
        extra.pop("position_ids", None)
        b = prompt.shape[0]
        layers, lm = self.decoder_layers(model), self.language_model(model)
        tokens: list[torch.Tensor] = []
        done = torch.zeros(b, dtype=torch.bool, device=device)
        history: list[set[int]] = []
        merged: dict[str, torch.Tensor] = {}
        cache = None
        result = Generation(tokens=prompt.new_zeros(b, 0))
        with LayerSkip(layers) as skip, self.visual_pruning(model, image):
            for s in range(max_new_tokens):
                step = run_step_hook(step_hook, DecodeStep(s, max_new_tokens, "und"), len(layers))
                result.skipped.append(set(step.skip_layers))
                full = torch.cat([mask, mask.new_ones(b, s)], 1)
                length = prompt.shape[1] if s == 0 or not use_cache else 1
                if use_cache:
                    skip.set_step(step.skip_layers, (b, length), device)
                else:
                    history.append(set(step.skip_layers))
                    skip.set_history(history, [prompt.shape[1]] + [1] * s, b, device)
                positions = position_ids(full)[:, -length:] if use_cache else position_ids(full)
                with task_scope(model, "und", token_mask=full[:, -length:].bool() if use_cache else full.bool()):
                    if s == 0:  # the prompt with its image, through the whole model
                        grab = lm.register_forward_pre_hook(
                            lambda m, a, k: merged.update(embeds=k["inputs_embeds"]) and None, with_kwargs=True)
                        try:
                            out = model(input_ids=prompt, attention_mask=full, position_ids=positions, cache=None,
                                        use_cache=use_cache, logits_to_keep=1, **extra)
                        finally:
                            grab.remove()
                        logits, cache = out.logits[:, -1], out.cache if use_cache else None
                    elif use_cache:
                        out = model(input_ids=tokens[-1][:, None], attention_mask=full, position_ids=positions,
                                    cache=cache, use_cache=True, logits_to_keep=1)
                        logits, cache = out.logits[:, -1], out.cache
                    else:
                        answer = model.get_input_embeddings()(torch.stack(tokens, 1))
                        out = lm(inputs_embeds=torch.cat([merged["embeds"], answer], 1), attention_mask=full,
                                 position_ids=positions, use_cache=False)
                        logits = model.lm_head(out.last_hidden_state[:, -1])
                nxt = logits.argmax(-1).masked_fill(done, tok.pad_token_id)
                tokens.append(nxt)
                done |= nxt == tok.eos_token_id
                if bool(done.all()):
                    break
        result.tokens = torch.stack(tokens, 1)
        result.texts = tok.batch_decode(result.tokens, skip_special_tokens=True)
        return result

    def language_model(self, model: nn.Module) -> nn.Module:
        """The decoder the layers belong to (`model.language_model`, `model.text_model`)."""
        return model.get_submodule(self.adapter(model).layers.rsplit(".", 1)[0])

    # ------------------------------------------------------------ the generation task (subclasses)
    def encode_gen(self, rows: Rows, model_or_config=None, generator: torch.Generator | None = None,
                   require_image: bool = False, where: str = "gen rows") -> dict[str, Any]:
        raise NotImplementedError

    def _gen_outputs(self, model: nn.Module, enc: dict[str, Any], train: bool = False):
        """Teacher-forced image-token logits (N, K) and targets (N,) of encoded gen rows."""
        raise NotImplementedError

    def _calibrate_gen(self, model: nn.Module, batch: Rows, recorder, **options) -> int:
        raise NotImplementedError

    def _generate_gen(self, model: nn.Module, rows: Rows, **options) -> Generation:
        raise NotImplementedError


def split_rows(rows: Rows, with_image: np.ndarray) -> tuple[Rows, Rows]:
    """Rows with a target image and rows without (gen calibration teacher-forces the former)."""
    pick = lambda m: {k: np.asarray(v, dtype=object)[m] for k, v in rows.items()}  # noqa: E731
    return pick(with_image), pick(~with_image)
