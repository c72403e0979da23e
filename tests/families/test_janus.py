"""The janus family on a tiny random Janus built offline (tests/families/tiny_unified.py)."""

from __future__ import annotations

import pickle

import numpy as np
import pyarrow as pa
import pytest
import torch

from unislim.modeling.adapters import Adapter
from unislim.modeling.families._decoding import VisualTokenPruner, vnorm_keep
from unislim.modeling.families.base import DataError
from unislim.modeling.families.janus import ADAPTER, JanusFamily
from unislim.modeling.importance import CalibrationRecorder
from unislim.modeling.surgery.scope import scope_of

from .tiny_unified import build_janus, digits_rows

N_IMAGE = 16  # image tokens of the tiny model (32 × 32 pixels, patches of 8)


@pytest.fixture(scope="module")
def janus(tmp_path_factory):
    torch.set_num_threads(1)
    from transformers import AutoModelForImageTextToText

    path = tmp_path_factory.mktemp("janus")
    built = build_janus(path)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    return built, model, JanusFamily()


def _prompts(*texts):
    return {"prompt": np.array(texts, dtype=object)}


def _lm_recorder(model):
    """A recorder over the LM itself (its own config holds the head counts)."""
    return CalibrationRecorder(model.model.language_model, Adapter("janus-lm", layers="layers"))


def test_saves_and_reloads_with_identical_logits(janus, tmp_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    built, model, fam = janus
    assert type(model).__name__ == "JanusForConditionalGeneration"
    und = fam.encode_und(digits_rows("und", 3), model)
    gen = fam.encode_gen(digits_rows("gen", 2), model, require_image=True)
    codes = fam.image_codes(model, gen["pixel_values"])
    assert torch.equal(fam._und_logits(built, und), fam._und_logits(model, und))
    assert torch.equal(fam.image_token_logits(built, gen["prompt_ids"], gen["prompt_mask"], codes),
                       fam.image_token_logits(model, gen["prompt_ids"], gen["prompt_mask"], codes))
    # a stage that saves a checkpoint writes the processor beside it; the copy reloads the same
    model.save_pretrained(tmp_path)
    fam.save_processor(tmp_path, model)
    again = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert torch.equal(fam._und_logits(model, und), fam._und_logits(again, und))
    reloaded = AutoProcessor.from_pretrained(tmp_path)
    assert torch.equal(reloaded(text=["draw two"], generation_mode="image")["input_ids"],
                       fam.processor(model)(text=["draw two"], generation_mode="image")["input_ids"])


def test_family_is_picklable_without_its_processor(janus):
    _, model, fam = janus
    fam.processor(model)
    copy = pickle.loads(pickle.dumps(fam))
    assert copy._processor is None and copy.processor_path == fam.processor_path
    assert copy.processor().tokenizer.get_vocab() == fam.processor(model).tokenizer.get_vocab()
    assert JanusFamily.matches(model.config) and not JanusFamily.matches(type("C", (), {"model_type": "emu3"}))


@pytest.mark.parametrize("scale", [2.0, 5.0])
def test_image_decoding_equals_hf_generate(janus, scale):
    _, model, fam = janus
    enc = fam.encode_gen(_prompts("draw a seven", "draw a three"), model)  # equal lengths: no padding
    hf = model.generate(input_ids=enc["prompt_ids"], attention_mask=enc["prompt_mask"], generation_mode="image",
                        do_sample=False, guidance_scale=scale)
    ours = fam.decode_images(model, enc["prompt_ids"], enc["prompt_mask"], cfg_scale=scale)
    assert ours.tokens.shape == (2, N_IMAGE)
    assert len(set(ours.tokens.flatten().tolist())) > 4  # the comparison is not of a constant
    assert torch.equal(ours.tokens, hf)
    assert ours.cfg_scales == [scale] * N_IMAGE


def test_answer_decoding_equals_hf_generate(janus):
    _, model, fam = janus
    rows = digits_rows("und", 4, seed=3)  # questions of different lengths: left padding
    enc = fam.encode_und(rows, model, with_answer=False)
    assert (enc["attention_mask"] == 0).any()
    hf = model.generate(**enc, max_new_tokens=6, do_sample=False)[:, enc["input_ids"].shape[1]:]
    ours = fam.generate(model, "und", rows, max_new_tokens=6)
    assert torch.equal(ours.tokens, hf)
    assert len(ours.texts) == 4


def _skip_some(step):
    if step.index % 3 == 1:
        step.skip_layers.add(1)
    if step.index % 5 == 2:
        step.skip_layers.add(0)


def test_layer_skip_is_kv_cache_safe(janus):
    _, model, fam = janus
    enc = fam.encode_gen(_prompts("draw a seven", "draw two ones"), model)  # different lengths: padding
    args = (model, enc["prompt_ids"], enc["prompt_mask"])
    plain = fam.decode_images(*args, cfg_scale=3.0)
    cached = fam.decode_images(*args, cfg_scale=3.0, step_hook=_skip_some)
    uncached = fam.decode_images(*args, cfg_scale=3.0, step_hook=_skip_some, use_cache=False)
    assert not torch.equal(cached.tokens, plain.tokens)  # the skips change the image
    assert torch.equal(cached.tokens, uncached.tokens)
    assert cached.skipped[1] == {1} and cached.skipped[2] == {0}
    rows = digits_rows("und", 3, seed=1)
    a = fam.generate(model, "und", rows, max_new_tokens=6, step_hook=_skip_some)
    b = fam.generate(model, "und", rows, max_new_tokens=6, step_hook=_skip_some, use_cache=False)
    assert torch.equal(a.tokens, b.tokens)


def test_cfg_schedule_varies_the_scale_per_step(janus):
    _, model, fam = janus
    enc = fam.encode_gen(_prompts("draw a seven"), model)
    args = (model, enc["prompt_ids"], enc["prompt_mask"])
    constant = fam.decode_images(*args, cfg_scale=3.0)
    assert torch.equal(fam.decode_images(*args, cfg_schedule=[3.0] * N_IMAGE).tokens, constant.tokens)
    ramp = fam.decode_images(*args, cfg_schedule=lambda i, n: 1.0 + 8.0 * i / n)
    assert ramp.cfg_scales[0] == 1.0 and ramp.cfg_scales[-1] == pytest.approx(1.0 + 8.0 * 15 / 16)
    assert not torch.equal(ramp.tokens, constant.tokens)
    seen = []
    hooked = fam.decode_images(*args, cfg_scale=3.0, step_hook=lambda s: seen.append((s.index, s.total)))
    assert seen == [(i, N_IMAGE) for i in range(N_IMAGE)] and torch.equal(hooked.tokens, constant.tokens)


def test_teacher_forcing_agrees_with_decoding(janus):
    """Greedy codes are the argmax of the teacher-forced logits on those codes (CFG combined)."""
    _, model, fam = janus
    enc = fam.encode_gen(_prompts("draw a seven", "draw two ones"), model)
    ids, mask = enc["prompt_ids"], enc["prompt_mask"]
    tokens = fam.decode_images(model, ids, mask, cfg_scale=2.0).tokens
    with torch.no_grad():
        cond = fam.image_token_logits(model, ids, mask, tokens)
        uncond = fam.image_token_logits(model, fam.unconditional(ids, fam.processor(model).tokenizer), mask, tokens)
    assert torch.equal((uncond + 2.0 * (cond - uncond)).argmax(-1), tokens)


def test_recorder_sees_only_the_task_tokens(janus):
    _, model, fam = janus
    tok = fam.processor(model).tokenizer
    und = digits_rows("und", 3, seed=2)
    expected = sum(1 + 1 + N_IMAGE + 1 + len(tok(" " + q, add_special_tokens=False)["input_ids"])
                   + len(tok(a, add_special_tokens=False)["input_ids"]) + 1
                   for q, a in zip(und["question"], und["answer"]))  # BOS, image markers + placeholders, q, a, EOS
    with _lm_recorder(model) as rec:
        assert fam.calibrate(model, "und", und, rec) == 3
    stats = rec.stats()
    assert stats["layer.0.tokens"].item() == expected == stats["layers.1.mlp.tokens"].item()
    assert not any(k.startswith("bucket.") for k in stats)

    gen = digits_rows("gen", 2, seed=2)  # with target images: teacher-forced
    for cfg, passes in [("cond", 1), ("both", 2)]:
        with _lm_recorder(model) as rec:
            fam.calibrate(model, "gen", gen, rec, buckets=4, cfg=cfg)
        stats = rec.stats()
        assert stats["layer.0.tokens"].item() == 2 * N_IMAGE * passes
        assert [stats[f"bucket.{b}/layer.1.tokens"].item() for b in range(4)] == [2 * 4 * passes] * 4
    free = digits_rows("gen", 2, seed=2, with_image=False)  # prompts only: generated
    with _lm_recorder(model) as rec:
        fam.calibrate(model, "gen", free, rec, buckets=2, cfg="uncond", cfg_scale=3.0)
    stats = rec.stats()
    assert stats["layer.0.tokens"].item() == 2 * N_IMAGE
    assert stats["bucket.1/layers.0.mlp.tokens"].item() == 2 * N_IMAGE / 2


def test_chunked_teacher_forcing_records_what_one_forward_does(janus):
    _, model, fam = janus
    gen = digits_rows("gen", 2, seed=4)
    stats = []
    for buckets in (1, 4):
        with _lm_recorder(model) as rec:
            fam.calibrate(model, "gen", gen, rec, buckets=buckets)
        stats.append(rec.stats())
    for key in ("layers.0.mlp.abs_sum", "layer.1.block_cos", "layers.1.self_attn.o_proj.head_norm_sum"):
        assert torch.allclose(stats[0][key], stats[1][key], rtol=1e-5)


def test_calibration_sets_the_task_scope(janus):
    _, model, fam = janus
    seen = []
    handle = model.model.language_model.layers[0].register_forward_pre_hook(
        lambda m, a: seen.append(scope_of(model).task))
    try:
        with _lm_recorder(model) as rec:
            fam.calibrate(model, "und", digits_rows("und", 1), rec)
            fam.calibrate(model, "gen", digits_rows("gen", 1), rec, buckets=1)
    finally:
        handle.remove()
    assert seen == ["und", "gen"] and scope_of(model).task is None


def test_bad_rows_name_task_file_and_row(janus):
    _, model, fam = janus
    where = "task 'caption' (data/und-0.parquet)"
    good = digits_rows("und", 3)
    fam.check_table("und", pa.table({k: list(v) for k, v in good.items()}), where, model.config)

    def bad(kind, column, value, row=1, rows=None):
        rows = {k: list(v) for k, v in (rows or good).items()}
        rows[column][row] = value
        with pytest.raises(DataError) as err:
            fam.check_table(kind, pa.table(rows), where, model.config)
        assert where in str(err.value) and f"row {row}" in str(err.value)
        return str(err.value)

    assert "decode" in bad("und", "image", b"not an image")
    assert "empty question" in bad("und", "question", "  ")
    assert "empty answer" in bad("und", "answer", "")
    gen = digits_rows("gen", 3)
    assert "empty prompt" in bad("gen", "prompt", "", row=2, rows=gen)
    with pytest.raises(DataError, match="missing .*'answer'"):
        fam.check_table("und", pa.table({"image": list(good["image"]), "question": list(good["question"])}),
                        where, model.config)
    with pytest.raises(DataError, match="no target image"):  # training needs the target
        fam.collate({"gen": digits_rows("gen", 2, with_image=False)}, torch.Generator(), model.config)


def test_loss_backward_reaches_the_lm_mlps(janus, tmp_path):
    from transformers import AutoModelForImageTextToText

    built, _, fam = janus
    built.save_pretrained(tmp_path)
    model = AutoModelForImageTextToText.from_pretrained(tmp_path).train()
    batch = fam.collate({"und": digits_rows("und", 2), "gen": digits_rows("gen", 2)}, torch.Generator().manual_seed(0),
                        model.config)
    total, parts = fam.loss(model, batch)
    assert sorted(parts) == ["gen_loss", "und_loss"] and torch.isfinite(total)
    total.backward()
    for layer in model.model.language_model.layers:
        for proj in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
            assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
    assert model.model.generation_head.vision_head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.model.vqmodel.parameters())  # frozen data processing


def test_eval_batch_gives_logits_at_every_predicted_token(janus):
    _, model, fam = janus
    und = digits_rows("und", 3)
    tok = fam.processor(model).tokenizer
    answers = sum(len(tok(a, add_special_tokens=False)["input_ids"]) + 1 for a in und["answer"])
    out = fam.eval_batch(model, "und", und, torch.Generator())
    assert out.logits.shape == (answers, model.config.text_config.vocab_size) and out.targets.shape == (answers,)
    assert out.targets[-1] == tok.eos_token_id
    out = fam.eval_batch(model, "gen", digits_rows("gen", 2), torch.Generator())
    assert out.logits.shape == (2 * N_IMAGE, model.config.vq_config.num_embeddings)


def test_active_parameters_per_task(janus):
    _, model, fam = janus
    m = model.model
    count = lambda *mods: sum(p.numel() for mod in mods for p in mod.parameters())  # noqa: E731
    lm = count(m.language_model)  # lm_head is tied to embed_tokens
    assert fam.active_parameters(model, "und") == lm + count(m.vision_model, m.aligner)
    assert fam.active_parameters(model, "gen") == lm + count(m.generation_embeddings, m.generation_aligner,
                                                             m.generation_head)
    total = sum(p.numel() for p in model.parameters())
    assert fam.active_parameters(model, "und") + count(m.vqmodel) < total


def test_adapter_facts_describe_the_model(janus):
    _, model, _ = janus
    layers = model.get_submodule(ADAPTER["layers"])
    assert len(layers) == model.config.text_config.num_hidden_layers
    for key, name in ADAPTER["mlp_proj"].items():
        assert hasattr(layers[0].get_submodule(ADAPTER["mlp"]), name)
    for name in ADAPTER["attn_proj"].values():
        assert hasattr(layers[0].get_submodule(ADAPTER["attention"]), name)
    assert hasattr(layers[0].mlp, ADAPTER["mlp_act"])
    assert not hasattr(model.config, "num_attention_heads")  # head counts live in text_config only
    assert getattr(model.config, ADAPTER["config"]).num_key_value_heads == 2


def test_vnorm_keep_selects_the_largest_value_norms():
    values = torch.zeros(1, 6, 4)
    values[0, :, 0] = torch.tensor([9.0, 1.0, 5.0, 3.0, 4.0, 2.0])
    image = torch.tensor([[False, True, True, True, True, False]])
    keep = vnorm_keep(values, image, 0.5)
    assert keep.tolist() == [[True, False, True, False, True, True]]  # 2 of 4 image tokens: norms 5 and 4
    assert vnorm_keep(values, image, 1.0).all()
    assert vnorm_keep(values.view(1, 6, 2, 2).transpose(1, 2), image, 0.5).tolist() == keep.tolist()


def test_vnorm_pruning_hides_dropped_image_tokens_from_later_layers(janus):
    """With pruning at layer 0, the answer logits equal a layer 1 run on the kept tokens alone."""
    _, model, fam = janus
    enc = fam.encode_und(digits_rows("und", 1, seed=5), model, with_answer=False)
    layers = model.model.language_model.layers
    image = fam.image_token_mask(model, enc["input_ids"])
    assert int(image.sum()) == N_IMAGE
    captured = {}
    handle = layers[0].register_forward_hook(lambda m, a, k, out: captured.update(h=out), with_kwargs=True)
    try:
        with torch.no_grad(), VisualTokenPruner(layers, 0, image, keep=0.25) as pruner:
            pruned = fam._und_logits(model, enc)[:, -1]
    finally:
        handle.remove()
    with torch.no_grad():
        plain = fam._und_logits(model, enc)[:, -1]
        lm = model.model.language_model
        kept = pruner.kept[0]
        assert int(kept.sum()) == enc["input_ids"].shape[1] - N_IMAGE + 4
        h = captured["h"][:, kept]  # (1, T', d)
        pos = torch.arange(enc["input_ids"].shape[1])[kept][None]
        out = layers[1](h, attention_mask=None, position_ids=pos, position_embeddings=lm.rotary_emb(h, pos))
        alone = model.lm_head(lm.norm(out))[:, -1]
    assert torch.allclose(pruned, alone, atol=1e-5)
    assert not torch.allclose(pruned, plain, atol=1e-3)


def test_generated_images_decode_to_pixels(janus):
    from unislim.modeling.families._unified import image_grid

    _, model, fam = janus
    out = fam.generate(model, "gen", _prompts("draw a seven", "draw two ones"), cfg_scale=2.0, decode=True)
    assert [im.size for im in out.images] == [(32, 32)] * 2
    assert image_grid(out.images, cols=2).size == (64, 32)
