"""The digits family: the embedded reference model (`unidigits`) as one family among several.

Tasks `und` (a scene + a question → an answer, autoregressive) and `gen` (a prompt → 32 patch
tokens by rectified-flow denoising with CFG). Rows are scenes drawn from scikit-learn's digits
(`reference_rows`: the train split for calibration and training, the held-out split for
evaluation), so nothing is downloaded. Its own metrics: digits-MME, digits-GenEval, digits-FID.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from unislim.modeling.adapters import ADAPTERS, MOT, Adapter

from ..base import ContinuousOutputs, DataError, Family, RowProblems, Rows, TaskKind, TokenOutputs, step_bucket
from .configuration_unidigits import UniDigitsConfig
from .modeling_unidigits import GEN_SUFFIX

IMAGE_VALUES = 128  # 8 x 16 pixels in [-1, 1]

ADAPTERS.update({"unidigits-shared": Adapter("unidigits-shared"), "unidigits-mot": Adapter("unidigits-mot", **MOT)})


class DigitsFamily(Family):
    name = "digits"
    primary_task = "gen"
    kinds = {
        "und": TaskKind("und", {"image": f"list<float> ({IMAGE_VALUES} values in [-1, 1], 8 x 16 row-major)",
                                "question": "string (reference vocabulary)", "answer": "string"},
                        {"qtype": "string (question type, for reports)"}, description="scene + question → answer"),
        "gen": TaskKind("gen", {"prompt": "string (reference vocabulary)"},
                        {"seed": "int (calibration noise seed)",
                         "image": f"list<float> ({IMAGE_VALUES}, the target scene; training and held-out rows)",
                         "category": "string (GenEval category)"},
                        loss="mse", description="prompt → scene by denoising"),
    }

    causal_kinds = ("und",)  # answers decode token by token; images denoise all 32 tokens at once
    mod_keep_last = {"und": 4}  # the question's last word and the answer, whose logits are the output

    @classmethod
    def matches(cls, config) -> bool:
        return isinstance(config, UniDigitsConfig)

    def tokens_per_sample(self, kind: str, model_config=None) -> float:
        from .scenes import ANSWER_LEN, PROMPT_LEN, QUESTION_LEN

        n_img = model_config.num_image_tokens if model_config is not None else 32
        return float(n_img + (QUESTION_LEN + ANSWER_LEN if kind == "und" else PROMPT_LEN))

    def auto_class(self, config) -> type:
        from transformers import AutoModel

        return AutoModel

    def new_model(self, size: str = "small", variant: str = "shared") -> nn.Module:
        """A freshly initialised reference model (`pretrain` trains it from scratch)."""
        from .configuration_unidigits import reference_config
        from .modeling_unidigits import UniDigitsModel

        return UniDigitsModel(reference_config(size, variant))

    def describe(self, model: nn.Module) -> str:
        c = model.config
        return f"unidigits-{c.variant}-d{c.hidden_size}-L{c.num_hidden_layers}"

    # ------------------------------------------------------------ data
    def reference_rows(self, kind: str, n: int, seed: int, split: str = "train",
                       targets: bool = False) -> list[dict[str, Any]]:
        """n rows of a task drawn with `seed` from `split`. `targets`: generation rows also carry
        the target scene (training and held-out rows; calibration rows need only the prompt)."""
        from .scenes import GEN_CATEGORIES, QUESTION_TYPES, render, sample_prompt, sample_question, to_model_units

        g = torch.Generator().manual_seed(seed)
        rows = []
        for i in range(n):
            if kind == "und":
                qtype = QUESTION_TYPES[i % len(QUESTION_TYPES)]
                scene, question, answer = sample_question(qtype, g)
                image = to_model_units(render(scene, g, split)).flatten().tolist()
                rows.append({"image": image, "question": question, "answer": answer, "qtype": qtype})
            elif kind == "gen":
                category = GEN_CATEGORIES[i % len(GEN_CATEGORIES)]
                spec = sample_prompt(category, g)
                row = {"prompt": spec.prompt, "category": category, "seed": seed * 100_003 + i}
                if targets:
                    row["image"] = to_model_units(render(spec.scene(g), g, split)).flatten().tolist()
                rows.append(row)
            else:
                raise DataError(f"the digits family has tasks 'und' and 'gen', not {kind!r}")
        return rows

    def check_table(self, kind: str, table, where: str, model_config=None) -> None:
        """Words in the reference vocabulary; images of 128 finite values in [-1, 1]."""
        super().check_table(kind, table, where, model_config)
        from .vocab import TOKENIZER

        problems = RowProblems()
        for column in [c for c in ("question", "answer", "prompt") if c in table.column_names]:
            for i, text in enumerate(table.column(column).to_pylist()):
                try:
                    TOKENIZER.encode(str(text))
                except ValueError as e:
                    problems.add(f"with {column} words outside the reference vocabulary", i, str(e))
        if "image" in table.column_names:
            for i, image in enumerate(table.column("image").to_pylist()):
                values = np.asarray(image if image is not None else [], dtype=np.float64)
                if values.size != IMAGE_VALUES:
                    problems.add(f"with an image of other than {IMAGE_VALUES} values (8 x 16)", i, f"{values.size} values")
                elif not np.isfinite(values).all():
                    problems.add("with NaN or infinite image values", i, f"{int((~np.isfinite(values)).sum())} of them")
                elif values.min() < -1.0001 or values.max() > 1.0001:
                    problems.add("with image values outside [-1, 1] (0..16 or 0..255 scales are not accepted)", i,
                                 f"found {values.min():.3g}..{values.max():.3g}")
        problems.raise_if_any(where, table.num_rows)

    # ------------------------------------------------------------ calibration
    @torch.no_grad()
    def calibrate(self, model: nn.Module, kind: str, batch: Rows, recorder, *, gen_steps: int = 20,
                  cfg_scale: float | None = None, buckets: int = 4, **_) -> int:
        """und: one forward over image + question + answer; gen: the whole denoising loop with CFG,
        statistics per step bucket. The recorder's token mask leaves padding out."""
        from .scenes import encode_answer, encode_prompt, encode_question

        device = next(model.parameters()).device
        config = model.config
        pad, n_img = config.pad_token_id, config.num_image_tokens
        if kind == "und":
            images = _images(batch["image"], config).to(device)
            ids = torch.tensor([encode_question(str(q)) + encode_answer(str(a))
                                for q, a in zip(batch["question"], batch["answer"])], device=device)
            recorder.token_mask = torch.cat([torch.ones(len(ids), n_img, dtype=torch.bool, device=device),
                                             ids != pad], 1)
            model.und_logits(images, ids)
            return len(ids)
        self.task_kind(kind)
        prompts = torch.tensor([encode_prompt(str(p)) for p in batch["prompt"]], device=device)  # (B, P)
        cfg = float(config.cfg_scale if cfg_scale is None else cfg_scale)
        shape = (n_img, config.patch_dim)
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

    # ------------------------------------------------------------ training
    def collate(self, rows: dict[str, Rows], generator: torch.Generator, model_config=None,
                prompt_dropout: bool = True) -> dict[str, Any]:
        """The reference model's `forward` batch: `und_*` from understanding rows (CE on the answer),
        `gen_*` from generation rows (the prompt dropped to the null prompt with probability
        `cfg_dropout` when `prompt_dropout`, noise and flow time drawn from `generator`)."""
        from .scenes import encode_answer, encode_prompt, encode_question

        config = model_config
        batch: dict[str, torch.Tensor] = {}
        und = rows.get("und")
        if und is not None and len(und["question"]):
            q = [encode_question(str(x)) for x in und["question"]]
            a = [encode_answer(str(x)) for x in und["answer"]]
            pad = config.pad_token_id if config is not None else 0
            batch["und_images"] = _images(und["image"], config)
            batch["und_input_ids"] = torch.tensor([qi + ai for qi, ai in zip(q, a)])
            batch["und_labels"] = torch.tensor([[-100] * len(qi) + [t if t != pad else -100 for t in ai]
                                                for qi, ai in zip(q, a)])
        gen = rows.get("gen")
        if gen is not None and len(gen["prompt"]):
            if "image" not in gen:
                raise DataError("training rows of a 'gen' task need the target scene (column 'image')")
            dropout = getattr(config, "cfg_dropout", 0.1) if prompt_dropout else 0.0
            drop = torch.rand(len(gen["prompt"]), generator=generator) < dropout
            batch["gen_prompt_ids"] = torch.tensor([encode_prompt(None if d else str(p))
                                                    for p, d in zip(gen["prompt"], drop.tolist())])
            x0 = _images(gen["image"], config)
            batch["gen_images"] = x0
            batch["gen_noise"] = torch.randn(x0.shape, generator=generator)
            batch["gen_t"] = torch.rand(len(x0), generator=generator)
        return batch

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = model(**batch)
        parts = {k: getattr(out, k) for k in ("und_loss", "gen_loss") if getattr(out, k) is not None}
        return out.loss, parts

    # ------------------------------------------------------------ evaluation
    @torch.no_grad()
    def eval_batch(self, model: nn.Module, kind: str, rows: Rows, generator: torch.Generator):
        batch = self.collate({kind: rows}, generator, model.config, prompt_dropout=False)
        batch = {k: v.to(model.device) for k, v in batch.items()}
        if kind == "und":
            logits = model.und_logits(batch["und_images"], batch["und_input_ids"])  # (B, L, V)
            labels = batch["und_labels"][:, 1:]
            keep = labels != -100
            return TokenOutputs(logits[:, :-1][keep].float(), labels[keep])
        x0, eps, t = model.patchify(batch["gen_images"]), model.patchify(batch["gen_noise"]), batch["gen_t"]
        tt = t[:, None, None]
        v = model.gen_velocity(batch["gen_prompt_ids"], (1 - tt) * x0 + tt * eps, t)
        return ContinuousOutputs(v.float(), (eps - x0).float())

    def evaluate(self, model: nn.Module, *, out_dir: Path | None = None, progress: Callable[[str], None] = print,
                 n_und: int = 40, n_gen: int = 24, steps: int = 20, cfg_scale: float | None = None, seed: int = 0,
                 **_) -> dict[str, Any]:
        """digits-MME, digits-GenEval, digits-FID (and the reference FLOPs / latency per sample)."""
        from .evaluate import evaluate_reference
        from .judge import DigitJudge

        progress(f"digits metrics: {n_und} samples per question type, {n_gen} prompts per category, {steps} steps")
        DigitJudge.get()  # trained once per process, with gradients on
        return evaluate_reference(model, n_und=n_und, n_gen=n_gen, steps=steps, cfg_scale=cfg_scale, seed=seed,
                                  out_dir=out_dir, active=lambda task: self.active_parameters(model, task))

    def generate(self, model: nn.Module, kind: str, inputs: dict[str, Any], *, step_hook=None, **options):
        if kind == "und":
            return model.answer(inputs["images"], inputs["question_ids"], **options)
        return model.generate_images(inputs["prompt_ids"], step_callback=step_hook, **options)

    # ------------------------------------------------------------ cost
    def unused(self, model: nn.Module, task: str) -> Callable[[str], bool]:
        """In `mot` a token uses one of each twin pair: the understanding copy for `und`, the
        `_moe_gen` copy for `gen`. The `shared` model counts everything for both (as RESULTS.md does)."""
        if model.config.variant != "mot":
            return lambda name: False
        if task == "und":
            return lambda name: GEN_SUFFIX in name
        return lambda name: name.startswith(("model.layers.", "model.norm.")) and GEN_SUFFIX not in name

    def active_parameters(self, model: nn.Module, task: str) -> int:
        from unislim.modeling.surgery.params import active_parameters

        self.task_kind(task)
        return active_parameters(model, task, self.unused(model, task))

    @torch.no_grad()
    def expert_activation_by_step(self, model: nn.Module, n_prompts: int = 24, steps: int = 20,
                                  seed: int = 0) -> dict[str, torch.Tensor]:
        """Share of routed slots each expert gets at each denoising step (the paper's Figure 3):
        {MoE layer name: (steps, routed experts) counts} over `n_prompts` held-out prompts."""
        from unislim.modeling.surgery.moe.convert import moe_mlps

        from .scenes import GEN_CATEGORIES, encode_prompt, sample_prompt

        model.eval()
        g = torch.Generator().manual_seed(seed)
        prompts = [sample_prompt(GEN_CATEGORIES[i % len(GEN_CATEGORIES)], g) for i in range(n_prompts)]
        ids = torch.tensor([encode_prompt(p.prompt) for p in prompts])
        moe = moe_mlps(model)
        counts = {name: torch.zeros(steps, m.num_routed, dtype=torch.long) for name, m in moe.items()}
        current = {"step": 0}

        def on_step(step) -> None:
            current["step"] = step.index

        def hook(name):
            def record(module, inputs, output):
                if not module.run_dense:
                    counts[name][current["step"]] += module.last_load.cpu()
            return record

        handles = [m.register_forward_hook(hook(name)) for name, m in moe.items()]
        try:
            model.generate_images(ids, steps=steps, generator=torch.Generator().manual_seed(seed), step_callback=on_step)
        finally:
            for h in handles:
                h.remove()
        return counts

    def accelerate(self, model: nn.Module, acceleration, scores, *, combined, evaluate: dict, latency: dict,
                   out_dir: Path, progress: Callable[[str], None], **_) -> dict[str, Any]:
        """FlashU's five techniques on the reference model (`accelerate.py`)."""
        from .accelerate import accelerate

        return accelerate(self, model, acceleration, scores, combined=combined, evaluate=evaluate, latency=latency,
                          out_dir=out_dir, progress=progress)

    # ------------------------------------------------------------ digits-only surgery
    def drop_sublayers(self, model: nn.Module, part: str, layers: list[int]) -> nn.Module:
        """Remove the attention or MLP sublayer (with its norm) of `layers`: the config lists them and
        the rebuilt model does not construct them, so the checkpoint holds no weights for them."""
        attr = {"attention": "drop_attention_layers", "mlp": "drop_mlp_layers"}[part]
        setattr(model.config, attr, sorted(set(getattr(model.config, attr)) | set(layers)))
        fresh = type(model)(model.config)
        state = {k: v for k, v in model.state_dict().items() if k in fresh.state_dict()}
        fresh.load_state_dict(state, strict=False)
        missing = set(fresh.state_dict()) - set(state)
        assert not missing, f"rebuilt model has weights the original lacks: {sorted(missing)[:5]}"
        return fresh.eval()


def _images(column, config) -> torch.Tensor:
    """A column of 128-value lists → (B, 8, 16) float32."""
    h, w = (config.image_height, config.image_width) if config is not None else (8, 16)
    return torch.tensor(np.stack([np.asarray(r, dtype=np.float32) for r in column])).view(-1, h, w)


def velocity_mse(outputs: ContinuousOutputs) -> float:
    return float(F.mse_loss(outputs.prediction, outputs.target))
