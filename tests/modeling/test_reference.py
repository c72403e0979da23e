"""The embedded reference model: tasks, sampler, judge, checkpoints, MoT routing, evaluation.

Tiny configs on CPU; the whole file runs in well under a minute.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModel

from tests.modeling.tiny import tiny, trained_tiny
from unislim.modeling.families.digits import (
    GEN_CATEGORIES,
    QUESTION_TYPES,
    TOKENIZER,
    DigitJudge,
    UniDigitsConfig,
    UniDigitsModel,
    evaluate_reference,
    make_batch,
    reference_config,
)
from unislim.modeling.flops import count_flops
from unislim.pipelines.training import make_optimizer
from unislim.modeling.families.digits.judge import frechet_distance
from unislim.modeling.families.digits.scenes import (
    ANSWER_LEN,
    QUESTION_LEN,
    Scene,
    Slot,
    ask,
    encode_prompt,
    encode_question,
    render,
    sample_prompt,
    to_model_units,
)


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def batch(n: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    return make_batch(n, torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def trained() -> UniDigitsModel:
    """A tiny shared model trained for a few seconds (shared by the tests that need learning)."""
    torch.set_num_threads(1)
    return trained_tiny()


# ------------------------------------------------------------------ config and data


@pytest.mark.parametrize(("size", "variant", "bad"), [("huge", "shared", "huge"), ("tiny", "moe", "moe")])
def test_reference_config_names_the_bad_value(size, variant, bad):
    with pytest.raises(ValueError, match=bad):
        reference_config(size, variant)


def test_config_validation_rejects_bad_gqa():
    with pytest.raises(Exception, match="num_key_value_heads"):
        UniDigitsConfig(num_attention_heads=4, num_key_value_heads=3)


@pytest.mark.parametrize("turns", [1, 3])
def test_make_batch_is_seeded_and_labels_only_the_answers(turns):
    make = lambda seed: make_batch(16, torch.Generator().manual_seed(seed), und_turns=turns)  # noqa: E731
    a, b, c = make(1), make(1), make(2)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["gen_images"], c["gen_images"])
    ids, labels = a["und_input_ids"], a["und_labels"]
    turn = QUESTION_LEN + ANSWER_LEN
    assert ids.shape == (8, turns * turn)
    labelled = (labels != -100).view(len(ids), -1, turn)  # (B, turns, 10)
    assert not labelled[..., :QUESTION_LEN].any()  # questions are never targets
    assert (labels[labels != -100] == ids[labels != -100]).all()
    n_questions = (ids == TOKENIZER.ids["?"]).sum(1)
    assert ((labels == TOKENIZER.eos_id).sum(1) == n_questions).all()  # every answer ends in <eos>
    assert (n_questions.max() > 1) == (turns > 1)  # follow-up turns happen only when asked for
    assert a["gen_images"].shape == (8, 8, 16) and a["gen_images"].min() >= -1 and a["gen_images"].max() <= 1


def test_follow_up_questions_answer_the_same_scene():
    g = torch.Generator().manual_seed(0)
    scene = Scene(Slot(7, faint=True), Slot())
    assert ask("sum", scene, g) is None  # needs two digits
    assert ask("faint", scene, g) == ("is the left digit faint ?", "yes")
    assert ask("which", scene, g) == ("which digits are shown ?", "seven")
    assert ask("right", scene, g) == ("what is on the right ?", "nothing")


def test_shift_augmentation_translates_digits_by_at_most_one_pixel():
    scene, moved = Scene(Slot(3), Slot()), 0
    for seed in range(10):  # the same image is drawn first, then the shift
        plain = render(scene, torch.Generator().manual_seed(seed), "train")[:, :8]
        shifted = render(scene, torch.Generator().manual_seed(seed), "train", shift=True)[:, :8]
        padded = torch.nn.functional.pad(plain, (1, 1, 1, 1))  # (10, 10)
        candidates = [padded[1 + dy : 9 + dy, 1 + dx : 9 + dx] for dy in (1, 0, -1) for dx in (1, 0, -1)]
        assert any(torch.equal(shifted, c) for c in candidates)
        moved += not torch.equal(shifted, plain)
    assert moved >= 5


# ------------------------------------------------------------------ forward and training


@pytest.mark.parametrize("variant", ["shared", "mot"])
def test_forward_each_task_and_both(variant):
    model, b = tiny(variant), batch(8)
    und = {k: v for k, v in b.items() if k.startswith("und_")}
    gen = {k: v for k, v in b.items() if k.startswith("gen_")}
    o_und, o_gen, o_both = model(**und), model(**gen), model(**b)
    assert o_und.logits.shape == (4, b["und_input_ids"].shape[1], len(TOKENIZER))
    assert o_und.gen_loss is None and torch.isfinite(o_und.loss)
    assert o_gen.velocity.shape == (4, 8, 16) and o_gen.und_loss is None and torch.isfinite(o_gen.loss)
    torch.testing.assert_close(o_both.loss, o_und.loss + o_gen.loss)


@pytest.mark.parametrize("variant", ["shared", "mot"])
def test_every_parameter_gets_a_gradient_and_loss_decreases(variant):
    model = tiny(variant).train()
    opt, sched = make_optimizer(model, lr=1e-2, steps=20, warmup_steps=1)
    b = batch(16)
    losses = []
    for step in range(20):
        out = model(**b)
        opt.zero_grad()
        out.loss.backward()
        if step == 0:
            missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
            assert missing == []  # DDP needs every parameter used each step
        opt.step()
        sched.step()
        losses.append(float(out.loss.detach()))
    assert losses[-1] < 0.7 * losses[0]


def test_a_few_seconds_of_training_beat_chance(trained):
    metrics = evaluate_reference(trained, n_und=15, n_gen=2, steps=2)
    # a constant answer scores about 0.36 overall (e.g. "two" for count, "nothing" for left)
    assert metrics["mme/overall"] > 0.45


# ------------------------------------------------------------------ inference entry points


def test_answer_is_greedy_and_pads_after_eos(trained):
    b = batch(16, seed=3)
    q = b["und_input_ids"][:, :-ANSWER_LEN]
    out = trained.answer(b["und_images"], q, max_new_tokens=4)
    assert out.shape == (8, 4)
    for row in out.tolist():
        if TOKENIZER.eos_id in row:
            assert all(t == TOKENIZER.pad_id for t in row[row.index(TOKENIZER.eos_id) + 1 :])
    # greedy: the first token is the argmax of the logits after the question
    first = trained.und_logits(b["und_images"], q)[:, -1].argmax(-1)
    assert torch.equal(out[:, 0], first)


def test_sampler_steps_seed_and_callback():
    model = tiny("mot")
    prompts = torch.tensor([encode_prompt("draw seven and two"), encode_prompt("draw a faint one")])
    seen = []
    x = model.generate_images(prompts, steps=5, cfg_scale=3.0, generator=torch.Generator().manual_seed(0),
                              step_callback=lambda s: seen.append((s.index, s.t, s.t_next)))  # fmt: skip
    assert x.shape == (2, 8, 16)
    assert [s[0] for s in seen] == list(range(5)) and seen[0][1] == 1.0 and seen[-1][2] == 0.0
    again = model.generate_images(prompts, steps=5, cfg_scale=3.0, generator=torch.Generator().manual_seed(0))
    other = model.generate_images(prompts, steps=5, cfg_scale=3.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(x, again) and not torch.allclose(x, other)
    # a callback can replace the model's velocity (e.g. a head cache): v = 0 leaves the noise as drawn
    still = model.generate_images(prompts, steps=5, generator=torch.Generator().manual_seed(0),
                                  step_callback=lambda s: setattr(s, "velocity", torch.zeros_like(s.x)))  # fmt: skip
    noise = torch.randn(2, 32, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(still, model.unpatchify(noise))
    # ... or skip layers for a step
    skipped = model.generate_images(prompts, steps=5, cfg_scale=3.0, generator=torch.Generator().manual_seed(0),
                                    step_callback=lambda s: s.skip_layers.add(0))  # fmt: skip
    assert not torch.allclose(skipped, x)


def test_cfg_scale_one_is_the_conditional_euler_loop():
    model = tiny("shared")
    prompts = torch.tensor([encode_prompt("draw two sevens")] * 2)
    out = model.generate_images(prompts, steps=4, cfg_scale=1.0, generator=torch.Generator().manual_seed(0))
    x = torch.randn(2, 32, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for i in range(4):
            t = 1 - i / 4
            x = x - 0.25 * model.gen_velocity(prompts, x, torch.full((2,), t))
    torch.testing.assert_close(out, model.unpatchify(x))
    guided = model.generate_images(prompts, steps=4, cfg_scale=3.0, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(out, guided)


# ------------------------------------------------------------------ judge and metrics


def test_judge_reads_real_heldout_digits():
    assert DigitJudge.get().heldout_accuracy() >= 0.97


def _scene(left: Slot, right: Slot, seed: int = 0) -> torch.Tensor:
    return to_model_units(render(Scene(left, right), torch.Generator().manual_seed(seed), "heldout"))


def test_judge_reads_hand_built_scenes():
    judge = DigitJudge.get()
    canvas = torch.stack([
        _scene(Slot(), Slot()),
        _scene(Slot(3, faint=True), Slot()),
        _scene(Slot(7), Slot(2)),
        _scene(Slot(), Slot(5, faint=True)),
    ])  # fmt: skip
    r = judge.read(canvas)
    assert r.empty.tolist() == [[True, True], [False, True], [False, False], [True, False]]
    assert r.digit.tolist() == [[-1, -1], [3, -1], [7, 2], [-1, 5]]
    assert r.faint.tolist() == [[False, False], [True, False], [False, False], [False, True]]


def test_judge_accepts_real_scenes_and_rejects_wrong_ones():
    judge, g = DigitJudge.get(), torch.Generator().manual_seed(0)
    specs = [sample_prompt(c, g) for c in GEN_CATEGORIES for _ in range(10)]
    real = torch.stack([to_model_units(render(s.scene(g), g, "heldout")) for s in specs])
    assert judge.satisfies(specs, real).float().mean() >= 0.95
    mirrored = real.flip(-1)  # swaps slots and mirrors the digits: wrong order / wrong side / unreadable
    two_digit = [i for i, s in enumerate(specs) if s.category in ("two", "color_attr", "position")]
    assert judge.satisfies([specs[i] for i in two_digit], mirrored[two_digit]).float().mean() < 0.2
    blank = torch.full_like(real, -1.0)
    assert not judge.satisfies(specs, blank).any()


def test_fid_sees_prompt_following_not_only_realism():
    judge, g = DigitJudge.get(), torch.Generator().manual_seed(0)
    specs = [sample_prompt(c, g) for c in GEN_CATEGORIES for _ in range(24)]
    draw = lambda: torch.stack([to_model_units(render(s.scene(g), g, "heldout")) for s in specs])  # noqa: E731
    real, real2 = draw(), draw()
    # the same real scenes, each shown next to another prompt of its category: realistic but disobedient
    shuffled = torch.cat([real2[i * 24 : (i + 1) * 24].roll(1, 0) for i in range(len(GEN_CATEGORIES))])
    same = frechet_distance(judge.fid_features(specs, real2), judge.fid_features(specs, real))
    disobedient = frechet_distance(judge.fid_features(specs, shuffled), judge.fid_features(specs, real))
    assert disobedient > 5 * same


def test_frechet_distance_is_zero_for_same_and_grows_with_shift():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 8))
    assert abs(frechet_distance(a, a)) < 1e-6
    near, far = frechet_distance(a, a + 0.1), frechet_distance(a, a + 1.0)
    assert 0 < near < far


def test_count_flops_counts_linear_macs_and_cpu_attention():
    lin = torch.nn.Linear(6, 5)
    assert count_flops(lambda: lin(torch.zeros(3, 4, 6))) == 2 * 12 * 6 * 5
    q, k = torch.randn(2, 4, 10, 8), torch.randn(2, 2, 10, 8)  # GQA on CPU: QKᵀ and AV
    sdpa = torch.nn.functional.scaled_dot_product_attention
    assert count_flops(lambda: sdpa(q, k, k, enable_gqa=True)) == 4 * 2 * 4 * 10 * 10 * 8


# ------------------------------------------------------------------ checkpoints and structure


@pytest.mark.parametrize("variant", ["shared", "mot"])
def test_save_load_round_trip_through_automodel(tmp_path, variant):
    model, b = tiny(variant), batch(8)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "unidigits"
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(loaded) is UniDigitsModel and loaded.config.variant == variant
    with torch.no_grad():
        a, c = model(**b), loaded(**b)
    assert torch.equal(a.logits, c.logits) and torch.equal(a.velocity, c.velocity)


def test_module_names_match_qwen2_and_bagel():
    names = dict(tiny("mot").named_modules())
    for n in ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
              "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm",
              "self_attn.q_proj_moe_gen", "self_attn.o_proj_moe_gen", "mlp_moe_gen.down_proj",
              "input_layernorm_moe_gen", "post_attention_layernorm_moe_gen"]:  # fmt: skip
        assert f"model.layers.1.{n}" in names
    assert not any("_moe_gen" in n for n, _ in tiny("shared").named_modules())


def test_components_partition_the_parameters():
    model = tiny("mot")
    comp = model.components()
    groups = [set(v) for v in comp.values()]
    assert sum(map(len, groups)) == len(set().union(*groups))  # disjoint
    owners = {n.rsplit(".", 1)[0] for n, _ in model.named_parameters()}
    assert set().union(*groups) == owners  # every parameterised module listed
    assert "model.layers.0.mlp_moe_gen.gate_proj" in comp["generation"]
    assert "model.layers.0.mlp.gate_proj" in comp["understanding"]
    assert model.num_active_parameters() == tiny("shared").num_parameters()
    assert model.num_active_parameters("gen") == model.num_active_parameters("und")  # twins are the same size
    model.model.layers[0].mlp_moe_gen = torch.nn.Identity()  # a generation copy gone: only gen tokens lose it
    assert model.num_active_parameters("und") == tiny("shared").num_parameters()
    assert model.num_active_parameters("gen") == tiny("shared").num_parameters() - sum(
        p.numel() for p in model.model.layers[0].mlp.parameters())


def test_surgery_fields_rebuild_a_pruned_model(tmp_path):
    """The prune stage edits these config fields; the checkpoint must rebuild the same model."""
    config = reference_config("tiny", "mot")
    config.intermediate_size_gen, config.drop_attention_layers, config.drop_mlp_layers = 40, [1], [0]
    torch.manual_seed(0)
    model, b = UniDigitsModel(config).eval(), batch(8)
    names = dict(model.named_modules())
    assert "model.layers.1.self_attn" not in names and "model.layers.1.input_layernorm_moe_gen" not in names
    assert "model.layers.0.mlp" not in names and "model.layers.1.mlp" in names
    assert model.model.layers[1].mlp_moe_gen.down_proj.in_features == 40
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        a, c = model(**b), loaded(**b)
    assert torch.equal(a.logits, c.logits) and torch.equal(a.velocity, c.velocity)


def test_per_task_layer_skipping_touches_only_its_task():
    import copy

    from unislim.modeling.families import get_family
    from unislim.modeling.surgery.mod.layer import skip_layers

    model, b = tiny("shared"), batch(8)
    adapter = get_family("digits").adapter(model)
    gen_model, und_model = copy.deepcopy(model), copy.deepcopy(model)
    skip_layers(gen_model, adapter, "gen", [1])
    skip_layers(und_model, adapter, "und", [1])
    with torch.no_grad():
        base, gen_skipped, und_skipped = model(**b), gen_model(**b), und_model(**b)
    assert torch.equal(gen_skipped.logits, base.logits) and not torch.allclose(gen_skipped.velocity, base.velocity)
    assert torch.equal(und_skipped.velocity, base.velocity) and not torch.allclose(und_skipped.logits, base.logits)


def test_mot_routes_understanding_and_generation_tokens_to_different_weights():
    model, b = tiny("mot"), batch(8)
    with torch.no_grad():
        before = model(**b)
        for p in model.model.layers[0].mlp_moe_gen.parameters():
            p.add_(0.5)
        after_gen = model(**b)
        for p in model.model.layers[0].mlp.parameters():
            p.add_(0.5)
        after_und = model(**b)
    assert torch.equal(before.logits, after_gen.logits)  # understanding never touches a _moe_gen copy
    assert not torch.allclose(before.velocity, after_gen.velocity)
    assert not torch.allclose(after_gen.logits, after_und.logits)
    # the prompt tokens of a generation sample use the understanding copy
    assert not torch.allclose(after_gen.velocity, after_und.velocity)


# ------------------------------------------------------------------ evaluation


def test_evaluate_reference_keys_and_artifacts(trained, tmp_path):
    m = evaluate_reference(trained, n_und=3, n_gen=3, steps=2, out_dir=tmp_path)
    expected = {"mme/overall", *(f"mme/{q}" for q in QUESTION_TYPES), "geneval/overall",
                *(f"geneval/{c}" for c in GEN_CATEGORIES), "fid/gen", "params/total", "params/active",
                "params/active_und", "params/active_gen", "flops/und_per_sample", "flops/gen_per_sample", "latency_ms/und_per_sample",
                "latency_ms/gen_per_sample"}  # fmt: skip
    assert set(m) == expected
    assert all(0.0 <= m[k] <= 1.0 for k in expected if k.startswith(("mme/", "geneval/")))
    assert m["params/total"] == trained.num_parameters() and m["fid/gen"] >= 0
    assert (tmp_path / "plots" / "generated_grid.png").stat().st_size > 0
    samples = json.loads((tmp_path / "samples.json").read_text())
    assert samples["understanding"] and samples["generation"]
    # FLOPs follow what runs: CFG doubles the generation passes, steps scale them
    m1 = evaluate_reference(trained, n_und=1, n_gen=1, steps=2, cfg_scale=1.0)
    m4 = evaluate_reference(trained, n_und=1, n_gen=1, steps=4, cfg_scale=1.0)
    assert m["flops/gen_per_sample"] == 2 * m1["flops/gen_per_sample"]
    assert m4["flops/gen_per_sample"] == 2 * m1["flops/gen_per_sample"]
    assert m1["flops/und_per_sample"] == m["flops/und_per_sample"]


def test_question_encoding_is_left_padded():
    ids = encode_question("what is on the left ?")
    assert ids[0] == TOKENIZER.pad_id and TOKENIZER.decode(ids) == "what is on the left ?"
