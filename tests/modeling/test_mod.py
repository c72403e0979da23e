"""Mixture-of-Depths routers around any Llama-style decoder layer (`modeling/surgery/mod`), on the
tiny reference model and a tiny Qwen2: capacity 1.0 is the dense model, capacity c runs exactly
ceil(c·T) tokens through the layer, FLOPs match the analytic count, routers are per task, causal
routing at inference does not look ahead, checkpoints reload with identical outputs, and the
schedule meets its budget."""

from __future__ import annotations

import math

import pytest
import torch

import copy
from contextlib import contextmanager

from transformers import AutoModelForCausalLM, Qwen2Config

from unislim.modeling.families import get_family
from unislim.modeling.families.digits import UniDigitsModel, make_batch, reference_config
from unislim.modeling.flops import count_flops
from unislim.modeling.loading import load_model
from unislim.modeling.surgery.mod import capacity_tokens, layer_flops
from unislim.modeling.surgery.mod.fit import fit_routers
from unislim.modeling.surgery.mod.layer import RoutingRecord, add_mod, route_state, router_parameters
from unislim.modeling.surgery.mod.schedule import auto_schedule, mean_capacity
from unislim.modeling.surgery.scope import task_scope

T_UND, T_GEN = 42, 40  # 32 image + 7 question + 3 answer; 8 prompt + 32 image


def _dense(variant: str) -> UniDigitsModel:
    torch.manual_seed(0)
    return UniDigitsModel(reference_config("tiny", variant)).eval()


def _batch(n: int = 8, seed: int = 1) -> dict:
    return make_batch(n, torch.Generator().manual_seed(seed))


def from_dense(dense, mod_capacity: dict[str, list[float]], mod_routing: str = "task",
               mod_causal_tasks=("und",), mod_keep_last=None, family: str = "digits"):
    """A copy of `dense` with routers: per task, one capacity per layer."""
    model = copy.deepcopy(dense)
    fam = get_family(family)
    adapter = fam.adapter(model)
    fam.stamp(model, adapter)
    add_mod(model, adapter, {t: dict(enumerate(caps)) for t, caps in mod_capacity.items()}, routing_mode=mod_routing,
            causal_tasks=tuple(mod_causal_tasks), keep_last=mod_keep_last or {})
    return model


@contextmanager
def record_routing(model):
    state = route_state(model)
    state.record = RoutingRecord()
    try:
        yield state.record
    finally:
        state.record = None


def _randomize_routers(model, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in router_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("variant", ["shared", "mot"])
def test_capacity_one_is_the_dense_model(variant):
    dense = _dense(variant)
    batch = _batch()
    # all 1.0: no routers at all; 0.999: ceil(0.999·T) = T tokens through gather → layer → scatter.
    # Top-k routing in both modes (no causal task: the untrained predictor would skip tokens).
    for caps in ([1.0, 1.0], [0.999, 0.999]):
        mod = from_dense(dense, mod_capacity={"und": caps, "gen": caps}, mod_causal_tasks=[])
        for training in (True, False):
            mod.train(training)
            with torch.no_grad():
                a, b = dense(**batch), mod(**batch)
            torch.testing.assert_close(b.logits, a.logits, atol=1e-5, rtol=0)
            torch.testing.assert_close(b.velocity, a.velocity, atol=1e-5, rtol=0)
        with torch.no_grad():
            g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
            prompts = batch["gen_prompt_ids"]
            torch.testing.assert_close(mod.generate_images(prompts, steps=3, generator=g2),
                                       dense.generate_images(prompts, steps=3, generator=g1), atol=1e-5, rtol=0)
    assert len(router_parameters(mod)) > 0


@pytest.mark.parametrize("capacity", [0.1, 0.3, 0.5, 0.7, 0.95])
def test_layer_processes_exactly_ceil_c_t_tokens(capacity):
    mod = from_dense(_dense("mot"), mod_capacity={"und": [1.0, capacity], "gen": [capacity, 1.0]})
    _randomize_routers(mod)
    seen = {0: [], 1: []}
    hooks = [mod.model.layers[i].self_attn.register_forward_pre_hook(lambda m, a, i=i: seen[i].append(a[0].shape))
             for i in (0, 1)]
    mod.train()
    mod(**_batch(8))
    for h in hooks:
        h.remove()
    # layer 0: und dense, gen routed; layer 1: und routed, gen dense (und runs first in forward)
    assert seen[0] == [(4, T_UND, 32), (4, capacity_tokens(capacity, T_GEN), 32)]
    assert seen[1] == [(4, capacity_tokens(capacity, T_UND), 32), (4, T_GEN, 32)]
    assert capacity_tokens(capacity, T_UND) == math.ceil(round(capacity * T_UND, 6))
    assert capacity_tokens(0.7, 40) == 28 and capacity_tokens(0.3, 40) == 12  # not 29, 13 from float error


def test_unselected_tokens_pass_unchanged_and_forced_tokens_are_kept():
    mod = from_dense(_dense("shared"), mod_capacity={"und": [0.3, 1.0], "gen": [1.0, 1.0]},
                                       mod_keep_last={"und": 4}).train()
    _randomize_routers(mod)
    io = {}
    mod.model.layers[0].register_forward_hook(lambda m, a, o: io.update(x=a[0], y=o))
    with record_routing(mod) as record:
        mod.und_logits(*(_batch(8)[k] for k in ("und_images", "und_input_ids")))
    kept = record.keep[("und", 0, T_UND)]  # (T,) how many of the 4 samples processed each position
    changed = (io["y"] - io["x"]).abs().amax(-1) > 0  # (B, T)
    assert changed.sum(1).tolist() == [capacity_tokens(0.3, T_UND)] * 4  # the rest passed by untouched
    assert kept[-4:].tolist() == [4.0] * 4  # the answer region is never skipped
    assert changed[:, -4:].all()


def test_flop_counter_matches_analytic_count():
    dense = _dense("shared")
    c = dense.config
    und_caps, gen_caps = [0.5, 1.0], [0.3, 0.8]
    mod = from_dense(dense, mod_capacity={"und": und_caps, "gen": gen_caps}).train()
    _randomize_routers(mod)
    batch = _batch(8)  # 4 und + 4 gen samples
    shape = dict(d=c.hidden_size, q_out=c.num_attention_heads * c.head_dim, kv_out=c.num_key_value_heads * c.head_dim,
                 ff=c.intermediate_size)
    expected = 0
    for caps, T, causal in ((und_caps, T_UND, True), (gen_caps, T_GEN, False)):
        for cap in caps:
            routed = cap < 1.0
            expected += layer_flops(B=4, T=T, n=capacity_tokens(cap, T), router=routed, predictor=routed and causal,
                                    **shape)
    def layers_flops(model):  # the decoder layers only (not embeddings, heads)
        return count_flops(lambda: model(**batch)) - count_flops(lambda: _skip_layers(model, batch))

    counted = layers_flops(mod)
    assert counted == expected
    dense_expected = sum(layer_flops(B=4, T=T, n=T, router=False, **shape) for T in (T_UND, T_GEN)) * 2
    assert layers_flops(dense) == dense_expected > counted


def _skip_layers(model, batch):
    """The same forward with every decoder layer replaced by the identity (what surrounds the layers)."""
    class Passthrough(torch.nn.Module):
        def forward(self, hidden_states, **kwargs):
            return hidden_states

    saved = model.model.layers
    model.model.layers = torch.nn.ModuleList(Passthrough() for _ in saved)
    try:
        model(**batch)
    finally:
        model.model.layers = saved


def test_routers_are_per_task_and_learn_only_from_their_task():
    mod = from_dense(_dense("mot"), mod_capacity={"und": [0.5, 0.5], "gen": [0.5, 0.5]}).train()
    _randomize_routers(mod)
    layer = mod.model.layers[1]
    und_w, gen_w = layer.mod_routers["und"].weight, layer.mod_routers["gen"].weight
    assert und_w is not gen_w and und_w.data_ptr() != gen_w.data_ptr()
    batch = _batch(8)
    for task in ("und", "gen"):
        mod.zero_grad(set_to_none=True)
        if task == "und":
            out = mod(und_images=batch["und_images"], und_input_ids=batch["und_input_ids"], und_labels=batch["und_labels"])
        else:
            out = mod(**{k: v for k, v in batch.items() if k.startswith("gen_")})
        out.loss.backward()
        for i, lay in enumerate(mod.model.layers):
            own, other = lay.mod_routers[task].weight.grad, lay.mod_routers["gen" if task == "und" else "und"].weight.grad
            assert own is not None and own.abs().sum() > 0, (task, i)
            assert other is None, (task, i)

    shared = from_dense(_dense("mot"), mod_routing="shared",
                        mod_capacity={"und": [0.5, 0.5], "gen": [0.5, 0.5]}).train()
    assert list(shared.model.layers[0].mod_routers) == ["shared"]


def test_causal_routing_at_inference_does_not_look_ahead():
    """In eval mode the understanding routing is the predictor's per-token decision: the logits of
    a prefix are the same whether or not later tokens follow (top-k over T would change them)."""
    mod = from_dense(_dense("shared"), mod_capacity={"und": [0.4, 0.4], "gen": [1.0, 1.0]},
                                       mod_keep_last={"und": 1})
    _randomize_routers(mod)
    with torch.no_grad():
        for layer in mod.model.layers:  # a predictor that accepts about half of the tokens
            layer.mod_predictors["und"].weight.normal_(generator=torch.Generator().manual_seed(3))
    batch = _batch(8)
    images, ids = batch["und_images"], batch["und_input_ids"]
    mod.eval()
    with torch.no_grad():
        full = mod.und_logits(images, ids)  # (B, L, V)
        prefix = mod.und_logits(images, ids[:, :-2])
    # the prefix's last position is forced (keep_last=1) in the short run but not in the full one
    torch.testing.assert_close(prefix[:, :-1], full[:, : ids.shape[1] - 3], atol=1e-5, rtol=0)
    with record_routing(mod) as record, torch.no_grad():
        mod.und_logits(images, ids)
    frac = record.keep_fraction()["und/layer0"]
    assert 0.05 < frac < 0.95  # the predictor really skipped tokens


def test_checkpoint_round_trip(tmp_path):
    mod = from_dense(_dense("mot"), mod_capacity={"und": [0.5, 1.0], "gen": [0.4, 0.6]},
                                       mod_routing="task")
    _randomize_routers(mod)
    mod.save_pretrained(tmp_path)
    again = load_model(tmp_path)
    assert again.config.unislim["surgery"] == mod.config.unislim["surgery"]
    assert set(router_parameters(again)) and len(router_parameters(again)) == len(router_parameters(mod))
    batch = _batch(6)
    with torch.no_grad():
        assert torch.equal(again(**batch).velocity, mod.eval()(**batch).velocity)


def test_fitted_routers_pick_the_tokens_a_layer_changes_most_at_weight_near_one():
    dense = _dense("shared")
    mod = from_dense(dense, mod_capacity={"und": [0.5, 0.5], "gen": [0.5, 0.5]})
    r2 = fit_routers(mod, lambda: [mod(**_batch(32, seed=s)) for s in (2, 3)], logit_std=0.05)
    assert set(r2) == {"layer0/und", "layer0/gen", "layer1/und", "layer1/gen"} and all(v > 0 for v in r2.values())
    batch = _batch(32, seed=4)
    io = {}
    dense.model.layers[1].register_forward_hook(lambda m, a, o: io.update(x=a[0], y=o))
    with torch.no_grad():
        dense.und_logits(batch["und_images"], batch["und_input_ids"])  # the dense layer's own update
        logits = mod.model.layers[1].mod_routers["und"](io["x"]).squeeze(-1)  # (B, T)
    assert (2 * torch.sigmoid(logits) - 1).abs().max() < 0.2  # router weight ~1: the model starts near dense
    assert logits.std() == pytest.approx(0.05, rel=0.5)
    rel = (io["y"] - io["x"]).norm(dim=-1) / io["x"].norm(dim=-1)  # (B, T)
    chosen = torch.zeros_like(logits, dtype=torch.bool).scatter(1, logits.topk(T_UND // 2, dim=1).indices, True)
    assert rel[chosen].mean() > 1.1 * rel[~chosen].mean()  # the router ranks tokens by how much the layer acts


def test_auto_schedule_meets_budget_and_follows_importance():
    importance = {"und": torch.tensor([0.7, 0.15, 0.09, 0.14]), "gen": torch.tensor([0.44, 0.08, 0.04, 0.10])}
    weights = {"und": 0.5, "gen": 0.5}
    aware = auto_schedule(importance, budget=0.8, weights=weights, max_importance=0.3)
    agnostic = auto_schedule(importance, budget=0.8, weights=weights, max_importance=0.3, shared=True)
    for s in (aware, agnostic):
        assert mean_capacity(s, weights) == pytest.approx(0.8, abs=1e-3)
        assert s["und"][0] == s["gen"][0] == 1.0  # important layer 0 stays dense for both tasks
    assert agnostic["und"] == agnostic["gen"]
    # the less a layer changes a task's tokens, the fewer it processes; gen is the more redundant task
    assert aware["gen"][2] < aware["gen"][1] < aware["gen"][3] or aware["gen"][2] < aware["gen"][3] < aware["gen"][1]
    assert sum(aware["gen"]) < sum(aware["und"])
    flat = auto_schedule(importance, budget=0.8, weights=weights, max_importance=0.3, sharpness=0.0)
    assert len({c for t in flat for c in flat[t][1:]}) == 1  # every routed pair alike
    assert mean_capacity(flat, weights) == pytest.approx(0.8, abs=1e-3)
    with pytest.raises(ValueError, match="budget"):
        auto_schedule(importance, budget=0.3, weights=weights, min_capacity=0.5)


# ------------------------------------------------------------------ a stock causal LM


def _qwen2():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                        num_hidden_layers=3, num_attention_heads=4,
                                                        num_key_value_heads=2)).eval()


def test_causal_lm_routing_gathers_positions_and_masks_and_reloads(tmp_path):
    dense = _qwen2()
    ids = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[0, 9:] = False  # right padding in one row
    same = from_dense(dense, {"text": [1.0, 0.999, 1.0]}, mod_causal_tasks=(), family="causal_lm")
    with torch.no_grad(), task_scope(same, "text", token_mask=mask):
        torch.testing.assert_close(same(ids, attention_mask=mask.long()).logits,
                                   dense(ids, attention_mask=mask.long()).logits, atol=1e-5, rtol=0)
    routed = from_dense(dense, {"text": [1.0, 0.5, 1.0]}, mod_causal_tasks=(), family="causal_lm").train()
    _randomize_routers(routed)
    seen = []
    routed.model.layers[1].self_attn.register_forward_pre_hook(lambda m, a, k: seen.append(k["hidden_states"].shape),
                                                               with_kwargs=True)
    with torch.no_grad():
        out = routed(ids, use_cache=False).logits  # no scope set: the recorded default task (text) routes
    assert seen == [(3, capacity_tokens(0.5, 12), 32)]
    routed.save_pretrained(tmp_path)
    again = load_model(tmp_path).train()
    with torch.no_grad():
        assert torch.equal(again(ids, use_cache=False).logits, out)
        assert torch.equal(again(ids).logits, dense.train()(ids).logits)  # with a KV cache: dense
