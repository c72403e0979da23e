"""Generic surgery on the tiny random Janus and Emu3 (tests/families/tiny_unified.py): every prune
method reloads through `load_model` with identical outputs of both tasks; Mixture-of-Depths routers
decode the same tokens with and without a KV cache; a CFG schedule that ends guidance drops the
unconditional pass without changing the image; the accelerate helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unislim.modeling.families import family_of_checkpoint
from unislim.modeling.families._accelerate import RedundancySkip, segment_schedule
from unislim.modeling.loading import carry_files, load_model
from unislim.modeling.surgery import prune
from unislim.modeling.surgery.mod.layer import RoutingRecord, add_mod, route_state, routed_layers

from .tiny_unified import build_emu3, build_janus, digits_rows

BUILDERS = {"janus": build_janus, "emu3": build_emu3}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def tiny(request, tmp_path_factory):
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp(request.param)
    BUILDERS[request.param](path)
    family = family_of_checkpoint(path)
    assert family.name == request.param  # the registry picks the family by model_type, before causal_lm
    return request.param, path, family


def _prompts(*texts):
    return {"prompt": np.array(texts, dtype=object)}


def _outputs(family, model):
    g = torch.Generator()
    return (family.eval_batch(model, "und", digits_rows("und", 3, seed=4), g).logits,
            family.eval_batch(model, "gen", digits_rows("gen", 2, seed=4), g).logits)


def _scores(model, adapter, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {f"{m.name}.neuron": torch.rand(m.width, generator=g) for m in adapter.mlps(model, "und")}
    out.update({f"{a.o_name}.kv_group": torch.rand(a.num_kv_heads, generator=g) for a in adapter.attentions(model, "und")})
    return out


@pytest.mark.parametrize("method", ["widths", "kv_groups", "blocks"])
def test_pruned_checkpoints_reload_with_identical_outputs(tiny, tmp_path, method):
    """Per-layer MLP widths (a recorded op, rebuilt by a loader subclass that keeps the class's module
    path: Emu3's legacy key names still map, lm_head loads), KV groups and blocks (config-native)."""
    name, path, family = tiny
    model = family.load(path)
    adapter = family.adapter(model)
    family.stamp(model, adapter)
    if method == "widths":
        prune.keep_neurons(model, adapter, "und", _scores(model, adapter),
                           widths={m.name: w for m, w in zip(adapter.mlps(model, "und"), (40, 24))})
    elif method == "kv_groups":
        prune.drop_kv_groups(model, adapter, "und", _scores(model, adapter), 1)
    else:
        prune.drop_layers(model, adapter, [1])
    model.save_pretrained(tmp_path)
    carry_files(path, tmp_path)  # the processor travels with the checkpoint
    again = load_model(tmp_path)
    assert type(again).__module__.startswith("transformers.models.")
    for a, b in zip(_outputs(family, model), _outputs(family, again)):
        assert torch.equal(a, b)
    assert torch.equal(again.lm_head.weight, model.lm_head.weight)
    text = again.config.text_config
    expected = {"widths": ("intermediate_size", 64), "kv_groups": ("num_key_value_heads", 1),
                "blocks": ("num_hidden_layers", 1)}[method]
    assert getattr(text, expected[0]) == expected[1]


def _with_routers(family, path, seed=0):
    """The model with per-task MoD routers in both LM layers (capacity 0.5 for und and gen, causal
    predictors), predictors and routers drawn at random so some tokens skip and weights differ from 1."""
    model = family.load(path)
    adapter = family.adapter(model)
    family.stamp(model, adapter)
    add_mod(model, adapter, {"und": {0: 0.5, 1: 0.5}, "gen": {0: 0.5, 1: 0.5}}, causal_tasks=("und", "gen"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in routed_layers(model):
            for lin in (*layer.mod_routers.values(), *layer.mod_predictors.values()):
                lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.5)
                if lin.bias is not None:
                    lin.bias.zero_()
    return model.eval()


def test_mod_routers_decode_the_same_tokens_with_and_without_a_kv_cache(tiny, tmp_path):
    name, path, family = tiny
    dense = family.load(path)
    model = _with_routers(family, path)
    model.save_pretrained(tmp_path)  # and the routers reload
    carry_files(path, tmp_path)
    model = load_model(tmp_path)
    state = route_state(model)
    prompts = _prompts("draw a seven", "draw two ones")  # different lengths: left padding
    state.record = RoutingRecord()
    cached = family.generate(model, "gen", prompts, cfg_scale=3.0)
    record, state.record = state.record, None
    uncached = family.generate(model, "gen", prompts, cfg_scale=3.0, use_cache=False)
    assert torch.equal(cached.tokens, uncached.tokens)
    keep = record.keep_fraction()
    assert 0.05 < keep["gen/layer0"] < 0.95 and 0.05 < keep["gen/layer1"] < 0.95, keep  # tokens really skip
    assert not torch.equal(cached.tokens, family.generate(dense, "gen", prompts, cfg_scale=3.0).tokens)
    rows = digits_rows("und", 3, seed=2)
    a = family.generate(model, "und", rows, max_new_tokens=6)
    b = family.generate(model, "und", rows, max_new_tokens=6, use_cache=False)
    assert torch.equal(a.tokens, b.tokens)
    assert not torch.equal(a.tokens, family.generate(dense, "und", rows, max_new_tokens=6).tokens)


def test_mod_kv_history_hides_skipped_tokens_as_the_uncached_forward_does(tiny):
    """A skipped token's keys are written (the cache stays aligned) but no later token of that layer
    attends to them: one cached forward token by token gives the uncached logits at every step."""
    name, path, family = tiny
    model = _with_routers(family, path, seed=3)
    enc = family.encode_und(digits_rows("und", 1, seed=6), model, with_answer=False)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    with torch.no_grad():
        full = family._und_logits(model, enc)[:, -3:]  # (1, 3, V): the uncached forward
        inputs, image = family.und_inputs(model, enc)
        lm = family.language_model(model)
        head = model.lm_head
        from unislim.modeling.surgery.scope import task_scope

        merged = {}
        grab = lm.register_forward_pre_hook(lambda m, a, k: merged.update(e=k["inputs_embeds"]) and None,
                                            with_kwargs=True)
        try:
            with task_scope(model, "und", token_mask=mask.bool()):
                model(**inputs, use_cache=False)
        finally:
            grab.remove()
        embeds, t = merged["e"], ids.shape[1]
        with task_scope(model, "und", token_mask=mask[:, : t - 3].bool()):
            out = lm(inputs_embeds=embeds[:, : t - 3], attention_mask=mask[:, : t - 3], use_cache=True)
        cache, steps = out.cache, []
        for i in range(t - 3, t):
            with task_scope(model, "und", token_mask=mask[:, i:i + 1].bool()):
                out = lm(inputs_embeds=embeds[:, i:i + 1], attention_mask=mask[:, : i + 1], cache=cache, use_cache=True,
                         position_ids=torch.tensor([[i]]))
            cache = out.cache
            steps.append(head(out.last_hidden_state))
        keys = cache.__dict__["unislim_mod_keys"]
    assert all(k.shape == (1, t) and not bool(k.all()) for k in keys.values())  # some keys hidden, all written
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-4)


def test_cfg_schedule_that_ends_guidance_drops_the_unconditional_pass(tiny):
    name, path, family = tiny
    model = family.load(path)
    prompts = _prompts("draw a seven", "draw two ones")
    n = family.generate(model, "gen", prompts, cfg_scale=3.0).tokens.shape[1]
    schedule = [1.0] * 2 + [3.0] * (n // 2 - 2) + [1.0] * (n - n // 2)
    planned = family.generate(model, "gen", prompts, cfg_schedule=schedule)

    def hook(step):  # the same scales from a step hook: the loop cannot know the future, keeps every pass
        step.cfg_scale = schedule[step.index]

    hooked = family.generate(model, "gen", prompts, step_hook=hook)
    assert planned.cfg_scales == hooked.cfg_scales == schedule
    assert torch.equal(planned.tokens, hooked.tokens)
    assert torch.equal(planned.tokens, family.generate(model, "gen", prompts, cfg_schedule=schedule,
                                                       use_cache=False).tokens)
    guided = sum(s != 1.0 for s in schedule)
    if name == "emu3":  # a separate branch: it runs only where a scale needs it, catching up in one forward
        assert planned.uncond_passes == guided and hooked.uncond_passes == guided
    else:  # batched rows: they leave once the schedule stays at 1
        assert planned.uncond_passes == n // 2 and hooked.uncond_passes == n


def test_redundancy_skip_measures_then_skips_the_most_similar_layers(tiny):
    name, path, family = tiny
    model = family.load(path)
    layers = family.decoder_layers(model)
    with RedundancySkip(layers, every=3, count=1) as skip:
        out = family.generate(model, "gen", _prompts("draw a seven"), cfg_scale=2.0, step_hook=skip)
    assert [len(s) for s in out.skipped[:6]] == [0, 1, 1, 0, 1, 1]
    assert skip.skips == sum(len(s) for s in out.skipped) > 0
    last = max(i for i in range(len(out.skipped)) if i % 3 == 0)  # the last measurement
    if last + 1 < len(out.skipped):
        assert out.skipped[last + 1] == {int(torch.argmax(skip.cos))}  # the most similar layer
    with RedundancySkip(layers, every=3, count=1) as again:  # KV-cache safe: uncached gives the same image
        same = family.generate(model, "gen", _prompts("draw a seven"), cfg_scale=2.0, step_hook=again, use_cache=False)
    assert torch.equal(out.tokens, same.tokens)


def test_segment_schedule():
    scale = segment_schedule(((0.0, 5.0), (0.6, 1.0)))
    assert [scale(i, 10) for i in range(10)] == [5.0] * 6 + [1.0] * 4
