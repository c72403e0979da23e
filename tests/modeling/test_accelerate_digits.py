"""FlashU runtime on a tiny 3-layer reference model (random weights): every technique off gives
the model's outputs exactly; each one on does the work it claims, checked by counting calls,
rows and widths with hooks of our own."""

from __future__ import annotations

import math

import pytest
import torch

from unislim.modeling.accelerate import (
    Acceleration,
    CfgSchedule,
    HeadCache,
    LayerSkip,
    TaskPruning,
    TokenPruning,
)
from unislim.modeling.families.digits.accelerate_runtime import AcceleratedModel
from unislim.modeling.accelerate._math import cfg_scale_at, most_redundant, vnorm_keep
from unislim.modeling.adapters import adapter_for
from unislim.modeling.families.digits import UniDigitsConfig, UniDigitsModel
from unislim.modeling.families.digits.scenes import ANSWER_LEN, GEN_CATEGORIES, encode_prompt, make_und_batch, sample_prompt

L, FF, STEPS, N_IMG = 3, 96, 8, 32


def _model(variant: str) -> UniDigitsModel:
    torch.manual_seed(0)
    config = UniDigitsConfig(variant=variant, hidden_size=32, intermediate_size=FF, num_hidden_layers=L,
                             num_attention_heads=4, num_key_value_heads=2, head_hidden_size=64)
    return UniDigitsModel(config).eval()


def _scores(model) -> dict[str, dict[str, torch.Tensor]]:
    """Different random neuron scores per task, for every MLP of that task's component."""
    g = torch.Generator().manual_seed(1)
    adapter = adapter_for(model)
    return {task: {f"{m.name}.neuron": torch.rand(m.width, generator=g) for m in adapter.mlps(model, task)}
            for task in ("und", "gen")}


def _data(n_und: int = 5, n_gen: int = 3):
    g = torch.Generator().manual_seed(2)
    und, _ = make_und_batch(["left", "count", "sum", "which", "faint"][:n_und], g, "heldout")
    prompts = torch.tensor([encode_prompt(sample_prompt(c, g).prompt) for c in GEN_CATEGORIES[:n_gen]])
    return und["und_images"], und["und_input_ids"][:, :-ANSWER_LEN], prompts


def _run(m, data, cfg_scale: float = 3.0):
    images, questions, prompts = data
    answers = m.answer(images, questions, max_new_tokens=ANSWER_LEN)
    scenes = m.generate_images(prompts, steps=STEPS, cfg_scale=cfg_scale, generator=torch.Generator().manual_seed(3))
    return answers, scenes


# ------------------------------------------------------------------------------ math
def test_cfg_scale_at_piecewise():
    segments = ((0.0, 3.0), (0.25, 2.0), (0.75, 1.0))
    assert [cfg_scale_at(segments, i, 8) for i in range(8)] == [3.0, 3.0, 2.0, 2.0, 2.0, 2.0, 1.0, 1.0]


def test_most_redundant_and_vnorm_keep():
    assert most_redundant({0: 0.5, 1: 0.9, 2: 0.9, 3: 0.1}, 2) == {1, 2}
    assert most_redundant({0: 0.5, 1: 0.9}, 0) == set()
    v = torch.zeros(2, 6, 4)  # 4 image tokens then 2 text tokens
    v[0, [3, 1], 0] = torch.tensor([5.0, 4.0])
    v[1, [0, 2], 0] = torch.tensor([1.0, 2.0])
    assert vnorm_keep(v, 4, 2).tolist() == [[1, 3, 4, 5], [0, 2, 4, 5]]


# ------------------------------------------------------------------------------ off = exact
@pytest.mark.parametrize("variant", ["shared", "mot"])
def test_techniques_off_or_neutral_reproduce_the_model_exactly(variant):
    model, data = _model(variant), _data()
    expected = _run(model, data)
    neutral = [
        Acceleration(),
        Acceleration(task_pruning=TaskPruning(keep_und=1.0, keep_gen=1.0, full_last_steps=0)),
        Acceleration(layer_skip=LayerSkip(every=2, count=0)),
        Acceleration(cfg_schedule=CfgSchedule(((0.0, 3.0), (0.5, 3.0)))),
        Acceleration(head_cache=HeadCache(every=1, reuse="backbone")),
        Acceleration(head_cache=HeadCache(every=1, reuse="velocity")),
        Acceleration(token_pruning=TokenPruning(layer=1, keep=1.0)),
    ]
    for acceleration in neutral:
        got = _run(AcceleratedModel(model, acceleration, _scores(model)), data)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1]), acceleration.describe()
    assert torch.equal(_run(model, data)[1], expected[1])  # the wrapped model was left as it was


def test_model_hooks_unused_are_identical():
    """The two additions to the reference model (token_filter, gen_hidden) change nothing when unused."""
    model, (images, questions, prompts) = _model("mot"), _data()
    with torch.no_grad():
        plain = model.und_logits(images, questions)
        everything = lambda i, h: torch.arange(h.shape[1]).expand(h.shape[0], -1)  # noqa: E731
        assert torch.equal(model.und_logits(images, questions, token_filter=lambda i, h: None), plain)
        assert torch.equal(model.und_logits(images, questions, token_filter=everything), plain)
        x, t = torch.randn(len(prompts), N_IMG, 4), torch.rand(len(prompts))
        hidden, t_emb = model.gen_hidden(prompts, x, t)
        assert hidden.shape == (len(prompts), N_IMG, 32) and t_emb.shape == (len(prompts), 1, 32)
        assert torch.equal(model.gen_head(hidden + t_emb), model.gen_velocity(prompts, x, t))


# ------------------------------------------------------------------------------ on = claimed work
class _Count:
    """Our own record of the work done: hooks on the wrapped model's modules, not the runtime's claims."""

    def __init__(self, am: AcceleratedModel):
        self.am, self.handles = am, []
        self.rows: list[int] = []  # rows (samples) of each backbone call
        self.layers: list[list[int]] = []  # per backbone call: the layers that ran
        self.tokens: list[list[int]] = []  # per backbone call: tokens each layer saw
        self.widths: list[int] = []  # width of every MLP call (down_proj inputs), in call order
        self.heads = 0  # diffusion head calls
        self.cosine: list[dict[int, float]] = []  # per backbone call: cos(in, out) of each layer on image rows
        base = am.base
        self._on(base.model, "pre", lambda m, a: self._backbone(a[0]))
        for i, layer in enumerate(base.model.layers):
            self._on(layer, "pre", lambda m, a, i=i: self._layer(i, a[0]))
            self._on(layer, "post", lambda m, a, out, i=i: self.cosine[-1].__setitem__(i, float(
                torch.nn.functional.cosine_similarity(a[0][:, -N_IMG:], out[:, -N_IMG:], dim=-1).mean())))
        self._on(base.gen_head, "post", lambda m, a, out: setattr(self, "heads", self.heads + 1))
        for name, mod in am.named_modules():
            if name.endswith("down_proj"):  # the model's own and the sliced copies
                self._on(mod, "pre", lambda m, a: self.widths.append(a[0].shape[-1]))

    def _backbone(self, embeds):
        self.rows.append(embeds.shape[0])
        self.layers.append([])
        self.tokens.append([])
        self.cosine.append({})

    def _layer(self, i, hidden):  # hidden (rows, T, d)
        self.layers[-1].append(i)
        self.tokens[-1].append(hidden.shape[1])

    def _on(self, module, kind, fn):
        register = module.register_forward_pre_hook if kind == "pre" else module.register_forward_hook
        self.handles.append(register(fn))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("variant", ["shared", "mot"])
def test_task_pruning_runs_each_task_at_its_own_width(variant):
    model, data = _model(variant), _data()
    scores, tau = _scores(model), 3
    am = AcceleratedModel(model, Acceleration(task_pruning=TaskPruning(0.5, 0.25, tau)), scores)
    images, questions, prompts = data
    with _Count(am) as und:
        am.answer(images, questions, max_new_tokens=ANSWER_LEN)
    assert und.widths == [FF // 2] * (ANSWER_LEN * L)
    with _Count(am) as gen:
        am.generate_images(prompts, steps=STEPS, generator=torch.Generator().manual_seed(0))
    per_layer = {"shared": lambda w: [w], "mot": lambda w: [FF, w]}[variant]  # mot: prompt rows use the full `mlp`
    expected = [w for step in range(STEPS) for _ in range(L) for w in per_layer(FF // 4 if step < STEPS - tau else FF)]
    assert gen.widths == expected and am.work["pruned_steps"] == STEPS - tau
    gen_name = {"shared": "mlp", "mot": "mlp_moe_gen"}[variant]
    for task, name, keep in (("und", "mlp", FF // 2), ("gen", gen_name, FF // 4)):
        top = torch.sort(torch.topk(scores[task][f"model.layers.1.{name}.neuron"], keep).indices).values
        sliced = (am.und_mlps if task == "und" else am.gen_mlps)[f"model.layers.1.{name}"]
        assert torch.equal(sliced.gate_proj.weight, getattr(model.model.layers[1], name).gate_proj.weight[top])
    d, base = 32, model.num_parameters()
    assert sum(p.numel() for p in am.parameters()) == base + L * 3 * d * (FF // 2 + FF // 4)  # both cuts are stored
    assert am.active_parameters() == {"und": model.num_active_parameters("und") - L * 3 * d * (FF - FF // 2),
                                      "gen": model.num_active_parameters("gen") - L * 3 * d * (FF - FF // 4)}
    assert am.num_active_parameters(task="gen") == am.active_parameters()["gen"]


def test_layer_skip_skips_the_most_similar_layer_between_measurements():
    model, (_, _, prompts) = _model("shared"), _data()
    am = AcceleratedModel(model, Acceleration(layer_skip=LayerSkip(every=3, count=1)))
    with _Count(am) as c:
        am.generate_images(prompts, steps=STEPS, generator=torch.Generator().manual_seed(0))
    measured = [0, 3, 6]
    assert [i for i, ran in enumerate(c.layers) if len(ran) == L] == measured
    for step, ran in enumerate(c.layers):
        last = max(m for m in measured if m <= step)
        redundant = max(c.cosine[last], key=c.cosine[last].get)
        assert ran == list(range(L)) if step in measured else ran == [i for i in range(L) if i != redundant]
    skipped = STEPS - len(measured)
    assert sum(len(r) for r in c.layers) == STEPS * L - skipped
    assert am.work["layers_skipped"] == skipped and am.work["measurements"] == len(measured)


def test_cfg_schedule_drops_the_unconditional_pass_at_scale_one():
    model, (_, _, prompts) = _model("shared"), _data()
    segments = ((0.0, 3.0), (0.25, 2.0), (0.5, 1.0))
    am = AcceleratedModel(model, Acceleration(cfg_schedule=CfgSchedule(segments)))
    with _Count(am) as c:
        got = am.generate_images(prompts, steps=STEPS, generator=torch.Generator().manual_seed(0))
    B = len(prompts)
    assert c.rows == [2 * B] * 4 + [B] * 4 and am.work["uncond_passes_skipped"] == 4

    def schedule(step):  # the same schedule through the model's own step callback
        step.cfg_scale = [3.0, 3.0, 2.0, 2.0, 1.0, 1.0, 1.0, 1.0][step.index]

    assert torch.equal(got, model.generate_images(prompts, steps=STEPS, generator=torch.Generator().manual_seed(0),
                                                  step_callback=schedule))


@pytest.mark.parametrize("reuse", ["backbone", "velocity"])
def test_head_cache_runs_the_backbone_every_t_steps(reuse):
    model, (_, _, prompts) = _model("shared"), _data()
    am = AcceleratedModel(model, Acceleration(head_cache=HeadCache(every=3, reuse=reuse)))
    with _Count(am) as c:
        got = am.generate_images(prompts, steps=STEPS, generator=torch.Generator().manual_seed(0))
    refreshes = math.ceil(STEPS / 3)
    heads = STEPS if reuse == "backbone" else refreshes
    assert len(c.rows) == refreshes and c.heads == heads
    assert am.work["backbone_calls"] == refreshes and am.work["head_calls"] == heads
    if reuse == "velocity":  # the same cache through the model's own step callback
        def reuse_velocity(step):
            if step.index % 3:
                step.velocity = step.prev_velocity

        assert torch.equal(got, model.generate_images(prompts, steps=STEPS, generator=torch.Generator().manual_seed(0),
                                                      step_callback=reuse_velocity))


def test_head_cache_refreshes_when_guidance_needs_rows_it_lacks():
    model, (_, _, prompts) = _model("shared"), _data()
    am = AcceleratedModel(model, Acceleration(head_cache=HeadCache(every=STEPS, reuse="backbone"),
                                              cfg_schedule=CfgSchedule(((0.0, 1.0), (0.5, 3.0)))))
    with _Count(am) as c:
        am.generate_images(prompts, steps=STEPS, generator=torch.Generator().manual_seed(0))
    assert c.rows == [len(prompts), 2 * len(prompts)]  # step 0 (conditional only), step 4 (guided)


@pytest.mark.parametrize("variant", ["shared", "mot"])
def test_vnorm_token_pruning_keeps_the_largest_value_norms(variant):
    model, (images, questions, _) = _model(variant), _data()
    am = AcceleratedModel(model, Acceleration(token_pruning=TokenPruning(layer=1, keep=0.25)))
    keep, B = N_IMG // 4, len(images)
    seen = {}
    attn = model.model.layers[1].self_attn
    hooks = [attn.v_proj.register_forward_hook(lambda m, a, out: seen.__setitem__("v", out)),
             model.model.layers[1].register_forward_hook(lambda m, a, out: seen.__setitem__("out1", out)),
             model.model.layers[2].register_forward_pre_hook(lambda m, a: seen.__setitem__("in2", a[0]))]
    try:
        with _Count(am) as c:
            am.answer(images[:, :, :], questions, max_new_tokens=1)
    finally:
        for h in hooks:
            h.remove()
    T = N_IMG + questions.shape[1]
    assert c.tokens == [[T, T, T - (N_IMG - keep)]] and am.work["tokens_dropped"] == B * (N_IMG - keep)
    top = torch.sort(torch.topk(seen["v"][:, :N_IMG].norm(dim=-1), keep, dim=1).indices, dim=1).values
    index = torch.cat([top, torch.arange(N_IMG, T).expand(B, -1)], dim=1)  # (B, keep + text)
    assert torch.equal(seen["in2"], seen["out1"][torch.arange(B)[:, None], index])


def test_everything_on_costs_less_and_claims_match_counts():
    from unislim.modeling.flops import count_flops

    model, data = _model("mot"), _data()
    acc = Acceleration(TaskPruning(0.5, 0.5, 2), LayerSkip(4, 1), CfgSchedule(((0.0, 3.0), (0.5, 1.0))),
                       HeadCache(2, "backbone"), TokenPruning(0, 0.5))
    am = AcceleratedModel(model, acc, _scores(model))
    flops = {}
    for name, m in (("base", model), ("fast", am)):
        und = count_flops(lambda: m.answer(data[0], data[1], max_new_tokens=ANSWER_LEN))
        gen = count_flops(lambda: m.generate_images(data[2], steps=STEPS, generator=torch.Generator().manual_seed(0)))
        flops[name] = (und, gen)
    assert flops["fast"][0] < 0.75 * flops["base"][0] and flops["fast"][1] < 0.5 * flops["base"][1]
    am.work.clear()
    with _Count(am) as c:
        am.generate_images(data[2], steps=STEPS, generator=torch.Generator().manual_seed(0))
    assert am.work["backbone_calls"] == len(c.rows) == STEPS // 2 and am.work["head_calls"] == c.heads == STEPS
    assert am.work["layers_skipped"] == STEPS // 2 * L - sum(len(r) for r in c.layers)


def test_bad_settings_are_refused():
    model = _model("shared")
    with pytest.raises(ValueError, match="token_pruning.layer"):
        AcceleratedModel(model, Acceleration(token_pruning=TokenPruning(layer=L - 1, keep=0.5)))
    with pytest.raises(ValueError, match="layer_skip.count"):
        AcceleratedModel(model, Acceleration(layer_skip=LayerSkip(every=2, count=L)))
    with pytest.raises(ValueError, match="neuron scores"):
        AcceleratedModel(model, Acceleration(task_pruning=TaskPruning(0.5, 0.5, 0)))
