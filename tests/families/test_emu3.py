"""The emu3 family on a tiny random Emu3 built offline (tests/families/tiny_unified.py)."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pyarrow as pa
import pytest
import torch

from unislim.modeling.adapters import Adapter
from unislim.modeling.families._decoding import VisualTokenPruner
from unislim.modeling.families.base import DataError
from unislim.modeling.families.emu3 import ADAPTER, Emu3Family
from unislim.modeling.importance import CalibrationRecorder

from .tiny_unified import IMAGE_SIZE, build_emu3, digits_rows

H = W = IMAGE_SIZE // 8  # the tiny grid: 4 × 4 codes
GRID = H * (W + 1)  # + a line end per row


@pytest.fixture(scope="module")
def emu3(tmp_path_factory):
    torch.set_num_threads(1)
    from transformers import AutoModelForImageTextToText

    path = tmp_path_factory.mktemp("emu3")
    built = build_emu3(path)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    return built, model, Emu3Family(image_area=IMAGE_SIZE ** 2)


def _prompts(*texts):
    return {"prompt": np.array(texts, dtype=object)}


def _lm_recorder(model):
    return CalibrationRecorder(model.model.text_model, Adapter("emu3-lm", layers="layers"))


def _hf_prefix_fn(model, tok):
    """HF's documented Emu3 image-generation constraint (model_doc/emu3.md)."""
    wrapper = tok.convert_tokens_to_ids(tok.image_wrapper_token)
    visual = model.vocabulary_mapping.image_tokens

    def allowed(batch_id, input_ids):
        offset = input_ids.shape[0] - torch.nonzero(input_ids == wrapper, as_tuple=True)[0][0]
        if offset % (W + 1) == 0:
            return (model.vocabulary_mapping.eol_token_id,)
        if offset == GRID + 1:
            return (tok.convert_tokens_to_ids(tok.eof_token),)
        if offset == GRID + 2:
            return (tok.convert_tokens_to_ids(tok.eoi_token),)
        if offset == GRID + 3:
            return (tok.eos_token_id,)
        if offset > GRID + 3:
            return (tok.pad_token_id,)
        return visual

    return allowed


def test_saves_and_reloads_with_identical_logits(emu3):
    built, model, fam = emu3
    assert type(model).__name__ == "Emu3ForConditionalGeneration"
    und = fam.encode_und(digits_rows("und", 3), model)
    assert torch.equal(fam._und_logits(built, und), fam._und_logits(model, und))
    gen = fam.encode_gen(digits_rows("gen", 2), model, require_image=True)
    assert fam._gen_outputs(built, gen, train=True)[0].equal(fam._gen_outputs(model, gen, train=True)[0])
    assert model.lm_head.weight.equal(built.lm_head.weight)  # not tied, and not lost on reload
    copy = pickle.loads(pickle.dumps(fam))
    assert copy._processor is None and copy.image_area == IMAGE_SIZE ** 2


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_image_decoding_equals_hf_generate(emu3, scale):
    _, model, fam = emu3
    enc = fam.encode_gen(_prompts("draw a seven", "draw a three"), model)
    assert enc["grid"] == (H, W)
    processor = fam.processor(model)
    neg_ids, neg_mask = fam.prompt_ids(processor, ["", ""])
    cfg = dict(guidance_scale=scale, negative_prompt_ids=neg_ids, negative_prompt_attention_mask=neg_mask) \
        if scale != 1.0 else {}
    hf = model.generate(input_ids=enc["prompt_ids"], attention_mask=enc["prompt_mask"], do_sample=False,
                        prefix_allowed_tokens_fn=_hf_prefix_fn(model, processor.tokenizer),
                        max_new_tokens=GRID + 3, **cfg)[:, enc["prompt_ids"].shape[1]:]
    ours = fam.decode_images(model, enc["prompt_ids"], enc["prompt_mask"], enc["grid"], cfg_scale=scale)
    assert ours.tokens.shape == (2, GRID + 3)
    assert len(set(ours.tokens[:, :W].flatten().tolist())) > 3
    assert torch.equal(ours.tokens, hf)


def test_answer_decoding_equals_hf_generate(emu3):
    _, model, fam = emu3
    rows = digits_rows("und", 4, seed=3)
    enc = fam.encode_und(rows, model, with_answer=False)
    assert (enc["attention_mask"][:, 0] == 0).any()  # left padding
    hf = model.generate(**enc, max_new_tokens=6, do_sample=False)[:, enc["input_ids"].shape[1]:]
    assert torch.equal(fam.generate(model, "und", rows, max_new_tokens=6).tokens, hf)


def _skip_some(step):
    if step.index % 3 == 1:
        step.skip_layers.add(1)
    if step.index % 5 == 2:
        step.skip_layers.add(0)


def test_layer_skip_is_kv_cache_safe(emu3):
    _, model, fam = emu3
    enc = fam.encode_gen(_prompts("draw a seven", "draw two ones"), model)
    args = (model, enc["prompt_ids"], enc["prompt_mask"], enc["grid"])
    plain = fam.decode_images(*args, cfg_scale=3.0)
    cached = fam.decode_images(*args, cfg_scale=3.0, step_hook=_skip_some)
    uncached = fam.decode_images(*args, cfg_scale=3.0, step_hook=_skip_some, use_cache=False)
    assert not torch.equal(cached.tokens, plain.tokens)
    assert torch.equal(cached.tokens, uncached.tokens)
    rows = digits_rows("und", 3, seed=1)
    a = fam.generate(model, "und", rows, max_new_tokens=6, step_hook=_skip_some)
    b = fam.generate(model, "und", rows, max_new_tokens=6, step_hook=_skip_some, use_cache=False)
    assert torch.equal(a.tokens, b.tokens)


def test_a_skip_without_the_kv_write_leaves_a_hole(emu3):
    """The pitfall the skip avoids: a layer that returns its input and writes nothing leaves that
    layer's cache one entry short, and decoding diverges from the uncached run."""
    _, model, fam = emu3
    enc = fam.encode_gen(_prompts("draw a seven"), model)
    args = (model, enc["prompt_ids"], enc["prompt_mask"], enc["grid"])
    layer = model.model.text_model.layers[1]
    skip_at = {1, 2}
    calls = {"n": 0}

    def naive(module, a, k, out):  # the layer's output replaced and its cache write undone
        step = calls["n"]
        calls["n"] += 1
        if step in skip_at:
            kv = k["cache"].layers[1]  # a DynamicLayer: drop the entry just written
            kv.keys, kv.values = kv.keys[:, :, :-1], kv.values[:, :, :-1]
            return a[0] if a else k["hidden_states"]
        return None

    hook = lambda s: s.skip_layers.add(1) if s.index in skip_at else None  # noqa: E731
    handle = layer.register_forward_hook(naive, with_kwargs=True)
    try:
        holed = fam.decode_images(*args, cfg_scale=1.0)
    finally:
        handle.remove()
    safe = fam.decode_images(*args, cfg_scale=1.0, step_hook=hook)
    uncached = fam.decode_images(*args, cfg_scale=1.0, step_hook=hook, use_cache=False)
    assert torch.equal(safe.tokens, uncached.tokens)
    assert not torch.equal(holed.tokens, uncached.tokens)


def test_cfg_schedule_varies_the_scale_per_step(emu3):
    _, model, fam = emu3
    enc = fam.encode_gen(_prompts("draw a seven"), model)
    args = (model, enc["prompt_ids"], enc["prompt_mask"], enc["grid"])
    constant = fam.decode_images(*args, cfg_scale=3.0)
    assert torch.equal(fam.decode_images(*args, cfg_schedule=[3.0] * (GRID + 3)).tokens, constant.tokens)
    ramp = fam.decode_images(*args, cfg_schedule=lambda i, n: 8.0 - 7.0 * i / n)
    assert not torch.equal(ramp.tokens, constant.tokens)


def test_teacher_forcing_agrees_with_decoding(emu3):
    _, model, fam = emu3
    enc = fam.encode_gen(_prompts("draw a seven", "draw two ones"), model)
    out = fam.decode_images(model, enc["prompt_ids"], enc["prompt_mask"], enc["grid"], cfg_scale=1.0)
    grid = out.tokens[:, :GRID]
    with torch.no_grad():
        logits = fam.grid_logits(model, enc["prompt_ids"], enc["prompt_mask"], grid)  # (B, G, V)
    visual = torch.tensor(model.vocabulary_mapping.image_tokens)
    at_visual = (torch.arange(GRID) + 1) % (W + 1) != 0
    assert torch.equal(visual[logits[:, at_visual][..., visual].argmax(-1)], grid[:, at_visual])


def test_recorder_sees_only_the_task_tokens(emu3):
    _, model, fam = emu3
    tok = fam.processor(model).tokenizer
    und = digits_rows("und", 3, seed=2)
    image = 1 + 3 + 1 + GRID + 2  # <|image start|> "4*4" <|image token|> placeholders <|extra_201|> <|image end|>
    expected = sum(1 + image + len(tok(" " + q, add_special_tokens=False)["input_ids"])
                   + len(tok(a, add_special_tokens=False)["input_ids"]) + 1
                   for q, a in zip(und["question"], und["answer"]))
    with _lm_recorder(model) as rec:
        assert fam.calibrate(model, "und", und, rec) == 3
    assert rec.stats()["layer.0.tokens"].item() == expected
    gen = digits_rows("gen", 2, seed=2)
    for cfg, passes in [("cond", 1), ("uncond", 1), ("both", 2)]:
        with _lm_recorder(model) as rec:
            fam.calibrate(model, "gen", gen, rec, buckets=4, cfg=cfg)
        stats = rec.stats()
        assert stats["layer.0.tokens"].item() == 2 * GRID * passes
        assert [stats[f"bucket.{b}/layer.1.tokens"].item() for b in range(4)] == [2 * GRID / 4 * passes] * 4
    with _lm_recorder(model) as rec:
        fam.calibrate(model, "gen", digits_rows("gen", 2, with_image=False), rec, buckets=2, cfg="both")
    assert rec.stats()["layers.1.mlp.tokens"].item() == 2 * GRID * 2


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_bad_rows_name_task_file_and_row(emu3):
    from PIL import Image

    _, model, fam = emu3
    where = "task 'draw' (data/gen-3.parquet)"
    rows = {k: list(v) for k, v in digits_rows("gen", 3).items()}
    fam.check_table("gen", pa.table(rows), where, model.config)
    rows["image"][2] = _png(Image.new("RGB", (500, 2)))  # an aspect ratio the processor refuses
    with pytest.raises(DataError, match=r"row 2: .*aspect ratio") as err:
        fam.check_table("gen", pa.table(rows), where, model.config)
    assert where in str(err.value) and "expected" in str(err.value)
    rows["image"][2] = b"\x89PNG broken"
    with pytest.raises(DataError, match=r"data/gen-3.parquet.*row 2: the image bytes do not decode"):
        fam.check_table("gen", pa.table(rows), where, model.config)
    rows["image"][2], rows["prompt"][0] = None, ""  # a missing target is fine, an empty prompt is not
    with pytest.raises(DataError, match=r"row 0: empty prompt"):
        fam.check_table("gen", pa.table(rows), where, model.config)
    with pytest.raises(DataError, match="missing .*'prompt'"):
        fam.check_table("gen", pa.table({"image": rows["image"]}), where, model.config)


def test_loss_backward_reaches_the_lm_mlps(emu3, tmp_path):
    from transformers import AutoModelForImageTextToText

    built, _, fam = emu3
    built.save_pretrained(tmp_path)
    model = AutoModelForImageTextToText.from_pretrained(tmp_path).train()
    batch = fam.collate({"und": digits_rows("und", 2), "gen": digits_rows("gen", 2)}, torch.Generator().manual_seed(0),
                        model.config)
    total, parts = fam.loss(model, batch)
    assert sorted(parts) == ["gen_loss", "und_loss"] and torch.isfinite(total)
    total.backward()
    for layer in model.model.text_model.layers:
        assert layer.mlp.down_proj.weight.grad.abs().sum() > 0 and layer.mlp.gate_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.model.vqmodel.parameters())


def test_eval_batch_gives_logits_at_every_predicted_token(emu3):
    _, model, fam = emu3
    out = fam.eval_batch(model, "gen", digits_rows("gen", 2), torch.Generator())
    assert out.logits.shape == (2 * H * W, model.config.vq_config.codebook_size)  # visual ids, in code order
    assert out.targets.max() < model.config.vq_config.codebook_size
    und = digits_rows("und", 2)
    out = fam.eval_batch(model, "und", und, torch.Generator())
    assert out.logits.shape[1] == model.config.text_config.vocab_size


def test_active_parameters_per_task(emu3):
    _, model, fam = emu3
    lm = sum(p.numel() for p in model.model.text_model.parameters()) + model.lm_head.weight.numel()
    assert fam.active_parameters(model, "und") == fam.active_parameters(model, "gen") == lm
    assert lm + sum(p.numel() for p in model.model.vqmodel.parameters()) == sum(p.numel() for p in model.parameters())


def test_adapter_facts_describe_the_model(emu3):
    _, model, _ = emu3
    layer = model.get_submodule(ADAPTER["layers"])[0]
    assert all(hasattr(layer.mlp, n) for n in ADAPTER["mlp_proj"].values())
    assert all(hasattr(layer.self_attn, n) for n in ADAPTER["attn_proj"].values())
    assert not hasattr(model.config, "num_attention_heads")
    assert getattr(model.config, ADAPTER["config"]).num_attention_heads == 4


def test_vnorm_pruning_of_vq_tokens(emu3):
    _, model, fam = emu3
    enc = fam.encode_und(digits_rows("und", 1, seed=5), model, with_answer=False)
    image = fam.image_token_mask(model, enc["input_ids"])
    assert int(image.sum()) == GRID
    layers = model.model.text_model.layers
    with torch.no_grad():
        plain = fam._und_logits(model, enc)[:, -1]
        with VisualTokenPruner(layers, 0, image, keep=1.0):
            assert torch.allclose(fam._und_logits(model, enc)[:, -1], plain, atol=1e-6)
        with VisualTokenPruner(layers, 0, image, keep=0.2) as pruner:
            pruned = fam._und_logits(model, enc)[:, -1]
    assert int((pruner.kept & image).sum()) == 4
    assert not torch.allclose(pruned, plain, atol=1e-3)


def test_generated_images_decode_to_pixels(emu3):
    _, model, fam = emu3
    out = fam.generate(model, "gen", _prompts("draw a seven"), cfg_scale=2.0, decode=True)
    assert [im.size for im in out.images] == [(IMAGE_SIZE, IMAGE_SIZE)]
