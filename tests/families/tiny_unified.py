"""Tiny random Janus and Emu3 checkpoints with processors made offline, and digits-scene rows.

Each builder makes a word-level tokenizer from the digits vocabulary (plus the model's special
tokens), a processor at a small image size (32 × 32), a model from config with random weights
(hidden 32, 2 layers, 4 query / 2 KV heads, MLP 64, a small VQ), and saves both with
`save_pretrained` into one folder, which `AutoModelForImageTextToText` / `AutoProcessor` load.
Nothing is downloaded.

Weights are drawn wider than HF's default (`initializer_range` 0.02 gives near-uniform logits,
so greedy decoding repeats one token and a token-for-token comparison would prove little).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from unislim.modeling.families.digits.vocab import WORDS

IMAGE_SIZE = 32  # pixels; Janus: 4 × 4 patches of 8 = 16 image tokens; Emu3: 4 × 4 VQ codes (+ 4 line ends)
CODEBOOK = 32  # VQ codes
INIT = 0.5  # std of the LM's and the generation modules' random weights
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, initializer_range=INIT)
# A chat template in the shape of the real ones: the image, then the question, then the answer cue.
JANUS_TEMPLATE = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}"
                  "<image_placeholder>{% else %} {{ c['text'] }}{% endif %}{% endfor %}{% endfor %}")
EMU3_TEMPLATE = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'image' %}"
                 "<image>{% else %} {{ c['text'] }}{% endif %}{% endfor %}{% endfor %}")


def _tokenizer(specials: list[str], extra: list[str], named: dict[str, str], bos_template: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = [w for w in WORDS if w != "<pad>"] + [str(i) for i in range(10)] + ["*"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(specials + words + extra))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Digits(individual_digits=True),
         pre_tokenizers.Punctuation()])
    if bos_template:  # Llama-style: the tokenizer adds BOS (Janus); Emu3's processor adds it itself
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>", extra_special_tokens=named)
    rest = [t for t in specials + extra if t not in named.values() and t not in ("<s>", "</s>", "<pad>", "<unk>")]
    if rest:
        tok.add_special_tokens({"extra_special_tokens": rest}, replace_extra_special_tokens=False)
    return tok


def _widen(model: torch.nn.Module, modules: list[torch.nn.Module], seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for root in modules:
            for m in root.modules():
                if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
                    fan_in = m.weight.shape[1] if isinstance(m, torch.nn.Linear) else 1
                    m.weight.copy_(torch.randn(m.weight.shape, generator=g) * INIT / max(1.0, fan_in ** 0.5) * 4)


def build_janus(path: str | Path, seed: int = 0):
    """A tiny random `JanusForConditionalGeneration` + `JanusProcessor` saved to `path`; returns the
    model as built (eval mode), to compare with what reloads."""
    from transformers import JanusConfig, JanusForConditionalGeneration, JanusProcessor
    from transformers.models.janus import JanusImageProcessorPil

    marks = {"image_token": "<image_placeholder>", "boi_token": "<begin_of_image>", "eoi_token": "<end_of_image>"}
    tok = _tokenizer(["<pad>", "<unk>", "<s>", "</s>", *marks.values()], [], marks, bos_template=True)
    vocab = tok.get_vocab()
    n_image = (IMAGE_SIZE // 8) ** 2
    image_processor = JanusImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, min_size=4,
                                             image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = JanusProcessor(image_processor=image_processor, tokenizer=tok, num_image_tokens=n_image,
                               chat_template=JANUS_TEMPLATE)
    config = JanusConfig(
        text_config=dict(model_type="llama", vocab_size=len(vocab), pad_token_id=vocab["<pad>"],
                         bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"], **TEXT),
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=IMAGE_SIZE,
                           patch_size=8, projection_dim=32, mlp_ratio=2.0, num_image_tokens=n_image, depth=1),
        vq_config=dict(embed_dim=8, num_embeddings=CODEBOOK, latent_channels=32, base_channels=32,
                       channel_multiplier=[1, 1, 2, 2], num_res_blocks=1, projection_dim=32,
                       image_token_embed_dim=32, num_hidden_layers=2),  # downsample 2**3 = the patch size
        image_token_id=vocab["<image_placeholder>"])
    torch.manual_seed(seed)
    model = JanusForConditionalGeneration(config).eval()
    m = model.model
    _widen(model, [m.language_model, m.generation_embeddings, m.generation_aligner, m.generation_head, m.aligner,
                   model.lm_head], seed)
    # what a real Janus checkpoint's generation_config.json carries for image mode
    model.generation_config.generation_kwargs = {"boi_token_id": vocab["<begin_of_image>"]}
    model.generation_config.pad_token_id = vocab["<pad>"]
    model.generation_config.guidance_scale = 5.0
    model.generation_config._from_model_config = False  # else from_pretrained rebuilds it from the config
    path = Path(path)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return model


def build_emu3(path: str | Path, seed: int = 0):
    """A tiny random `Emu3ForConditionalGeneration` + `Emu3Processor` saved to `path`; returns the
    model as built (eval mode)."""
    from transformers import Emu3Config, Emu3ForConditionalGeneration, Emu3ImageProcessor, Emu3Processor

    marks = {"image_token": "<image>", "boi_token": "<|image start|>", "eoi_token": "<|image end|>",
             "image_wrapper_token": "<|image token|>", "eof_token": "<|extra_201|>"}
    visual = [f"<|visual token{i:06d}|>" for i in range(CODEBOOK)]
    tok = _tokenizer(["<pad>", "<unk>", "<s>", "</s>", *marks.values(), "<|extra_200|>"], visual, marks,
                     bos_template=False)
    vocab = tok.get_vocab()
    image_processor = Emu3ImageProcessor(min_pixels=IMAGE_SIZE ** 2, max_pixels=IMAGE_SIZE ** 2, spatial_factor=8)
    processor = Emu3Processor(image_processor=image_processor, tokenizer=tok, chat_template=EMU3_TEMPLATE)
    config = Emu3Config(
        text_config=dict(vocab_size=len(vocab), pad_token_id=vocab["<pad>"], bos_token_id=vocab["<s>"],
                         eos_token_id=vocab["</s>"], attention_dropout=0.0, **TEXT),
        vq_config=dict(codebook_size=CODEBOOK, embed_dim=4, latent_channels=4, base_channels=32,
                       channel_multiplier=[1, 1, 1, 1], num_res_blocks=1, attn_resolutions=[], hidden_size=32,
                       num_attention_heads=1, temporal_downsample_factor=4),  # spatial downsample 2**3 = 8
        vocabulary_map=vocab)
    torch.manual_seed(seed)
    model = Emu3ForConditionalGeneration(config).eval()
    _widen(model, [model.model.text_model, model.lm_head], seed)
    model.generation_config.pad_token_id = vocab["<pad>"]
    model.generation_config._from_model_config = False
    path = Path(path)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return model


# ------------------------------------------------------------------ rows from the digits scenes


def scene_png(canvas: torch.Tensor, size: int = IMAGE_SIZE) -> bytes:
    """An (8, 16) digits canvas in [0, 16] as an RGB PNG of size × size (white digits on black)."""
    from PIL import Image

    grey = (canvas.clamp(0, 16) / 16 * 255).to(torch.uint8).numpy()
    image = Image.fromarray(grey, mode="L").resize((size, size), Image.NEAREST).convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def digits_rows(kind: str, n: int, seed: int = 0, with_image: bool = True, size: int = IMAGE_SIZE) -> dict:
    """n rows of a task as Ray Data hands them ({column: numpy array}), rendered from digits scenes."""
    from unislim.modeling.families.digits.scenes import (GEN_CATEGORIES, QUESTION_TYPES, render, sample_prompt,
                                                         sample_question)

    g = torch.Generator().manual_seed(seed)
    rows: dict[str, list] = {}
    for i in range(n):
        if kind == "und":
            scene, question, answer = sample_question(QUESTION_TYPES[i % len(QUESTION_TYPES)], g)
            row = {"image": scene_png(render(scene, g, "train"), size), "question": question, "answer": answer}
        else:
            spec = sample_prompt(GEN_CATEGORIES[i % len(GEN_CATEGORIES)], g)
            row = {"prompt": spec.prompt}
            if with_image:
                row["image"] = scene_png(render(spec.scene(g), g, "train"), size)
        for k, v in row.items():
            rows.setdefault(k, []).append(v)
    return {k: np.array(v, dtype=object) for k, v in rows.items()}


def write_rows(path: str | Path, kind: str, n: int, seed: int = 0) -> Path:
    """`digits_rows` as a Parquet file (images as binary PNG bytes), what a user gives `shard`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = digits_rows(kind, n, seed)
    columns = {k: pa.array(list(v), type=pa.binary() if k == "image" else pa.string()) for k, v in rows.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def trained(kind: str, path: str | Path, steps: int = 200, seed: int = 0, batch: int = 8,
            n_batches: int = 40) -> Path:
    """A tiny random `kind` ("janus" | "emu3") saved to `path`, then trained for `steps` AdamW steps
    on answer + image-token NLL of digits rows (`n_batches` fixed batches, cycled), so that held-out
    NLL means something to lose: pruning has knowledge to remove. Saved over the random weights.

    The default steps are what it takes for held-out image-token NLL to fall well below the uniform
    ln 32 = 3.47 (2026-12-01: Janus 2.70 after 200, Emu3 1.49 after 200), so that 90% pruning
    raises it by over 10% (Janus +22%, Emu3 +18%). With 60 steps on 4 batches Janus stayed at 3.36
    and rose only 8.5%; Emu3 after 100 steps rose 8.4%."""
    from unislim.modeling.families import get_family
    from unislim.pipelines.training import make_optimizer

    {"janus": build_janus, "emu3": build_emu3}[kind](path, seed=seed)
    family = get_family(kind)
    model = family.load(path).train()
    batches = [family.collate({"und": digits_rows("und", batch, seed=100 + i), "gen": digits_rows("gen", batch, seed=200 + i)},
                              torch.Generator().manual_seed(i), model.config) for i in range(n_batches)]
    optimizer, scheduler = make_optimizer(model, 3e-3, steps, warmup_steps=5)
    for step in range(steps):
        loss, _ = family.loss(model, batches[step % len(batches)])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    model.eval().save_pretrained(path)
    return Path(path)
