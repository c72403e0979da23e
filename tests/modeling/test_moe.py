"""Dense → MoE on any adapter-described model (Slim & Sparse §4.2): the expert partition (Eq. 8), the
MoE MLP (Eq. 9) equal to the dense one with every expert on, per-task dense paths, Expert-Frozen
Tuning, the auxiliary loss, reloading through `load_model`, and the exact cost drop — on the digits
model (shared and mot), a Qwen2-style gated and a Phi-style ungated causal LM."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, PhiConfig, Qwen2Config

from tests.modeling.tiny import tiny
from unislim.modeling.families import get_family
from unislim.modeling.families.digits import make_batch
from unislim.modeling.flops import count_flops
from unislim.modeling.loading import load_model
from unislim.modeling.surgery import aux
from unislim.modeling.surgery.moe import MoEMLP, cumulative_scores, partition_neurons
from unislim.modeling.surgery.moe.convert import convert_to_moe, freeze_experts, moe_mlps

E, S, R, FF, D = 8, 2, 6, 96, 32


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def mlp_name(variant: str, layer: int) -> str:
    return f"model.layers.{layer}.mlp" + ("_moe_gen" if variant == "mot" else "")


def scores_for(variant: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {mlp_name(variant, i): torch.rand(FF, generator=g) for i in range(2)}


def convert(dense, top_k: int, impl: str = "loop", **kw):
    """A converted copy of a digits model: both layers' generation MLPs, understanding dense (shared)."""
    model = copy.deepcopy(dense)
    family = get_family("digits")
    adapter = family.adapter(model)
    family.stamp(model, adapter)
    dense_tasks = () if adapter.is_mot else ("und",)
    partition = convert_to_moe(model, adapter, scores_for(dense.config.variant), layers=[0, 1], num_experts=E,
                               num_shared=S, top_k=top_k, impl=impl, dense_tasks=dense_tasks, **kw)
    return model, partition


def batch(n: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    return make_batch(n, torch.Generator().manual_seed(seed))


def task(b: dict, prefix: str) -> dict:
    return {k: v for k, v in b.items() if k.startswith(prefix)}


def causal_lm(kind: str):
    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=D, intermediate_size=FF, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2)
    config = Qwen2Config(**common) if kind == "qwen2" else PhiConfig(**common)
    return AutoModelForCausalLM.from_config(config).eval()


# ------------------------------------------------------------------ partition (Eq. 8)


def test_partition_covers_every_neuron_once_and_shared_experts_hold_the_top_scores():
    scores = torch.rand(FF, generator=torch.Generator().manual_seed(0))
    experts = partition_neurons(scores, E, S)
    assert len(experts) == E and all(len(e) == FF // E for e in experts)
    assert all(torch.equal(e, e.sort().values) for e in experts)  # ascending
    assert torch.equal(torch.cat(experts).sort().values, torch.arange(FF))  # each neuron exactly once
    shared = set(torch.cat(experts[:S]).tolist())
    assert shared == set(scores.topk(S * FF // E).indices.tolist())


def test_routed_experts_get_balanced_importance():
    uniform = torch.rand(384, generator=torch.Generator().manual_seed(0))
    scores = (-uniform.log()) ** 2  # squared Exponential(1): heavy-tailed, like real neuron scores
    experts = partition_neurons(scores, 64, 8)
    sums = torch.stack([scores[e].sum() for e in experts[8:]])  # (56,)
    rest = scores.argsort(descending=True)[8 * 6 :]
    by_rank = torch.stack([scores[rest[j * 6 : (j + 1) * 6]].sum() for j in range(56)])  # contiguous in rank
    by_index = torch.stack([scores[j * 6 : (j + 1) * 6].sum() for j in range(56)])  # contiguous in neuron index
    spread = lambda s: float(s.std() / s.mean())  # noqa: E731
    assert spread(sums) < 0.25 * spread(by_index) and spread(sums) < 0.2 * spread(by_rank)  # 0.09 vs 0.86, 1.27


def test_partition_rejects_an_indivisible_width_naming_the_numbers():
    with pytest.raises(ValueError, match="ff=96.*num_experts=7"):
        partition_neurons(torch.rand(96), 7, 1)
    with pytest.raises(ValueError, match="num_shared=8"):
        partition_neurons(torch.rand(96), 8, 8)


def test_ties_are_ranked_by_index_and_cumulative_scores_sum_tasks():
    experts = partition_neurons(torch.zeros(8), 4, 1)
    assert [e.tolist() for e in experts] == [[0, 1], [2, 7], [3, 6], [4, 5]]  # snake over ranks 2..7
    a, b = torch.rand(FF), torch.rand(FF)
    torch.testing.assert_close(cumulative_scores({"und": a, "gen": b}), (a + b).double())
    with pytest.raises(ValueError, match="shape"):
        cumulative_scores({"und": a, "gen": torch.rand(FF + 1)})


# ------------------------------------------------------------------ MoE = dense with every expert on (Eq. 9)


@pytest.mark.parametrize("impl", ["loop", "grouped"])
@pytest.mark.parametrize("variant", ["shared", "mot"])
def test_all_experts_active_equals_the_dense_model(variant, impl):
    dense = tiny(variant)
    moe, partition = convert(dense, top_k=R, impl=impl)
    assert sorted(partition) == [mlp_name(variant, 0), mlp_name(variant, 1)]
    assert isinstance(moe.get_submodule(mlp_name(variant, 1)), MoEMLP)
    b = batch(8)
    with torch.no_grad():
        a, m = dense(**b), moe(**b)
    torch.testing.assert_close(m.logits, a.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(m.velocity, a.velocity, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["qwen2", "phi"])
def test_any_adapter_mlp_converts_gated_or_ungated_and_reloads(kind, tmp_path):
    dense = causal_lm(kind)
    family = get_family("causal_lm")
    model = copy.deepcopy(dense)
    adapter = family.adapter(model)
    family.stamp(model, adapter)
    scores = {m.name: torch.rand(m.width, generator=torch.Generator().manual_seed(m.layer)) for m in adapter.mlps(model, "und")}
    ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(3))
    convert_to_moe(model, adapter, scores, num_experts=E, num_shared=S, top_k=R, layers=[1])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense(ids).logits, atol=1e-5, rtol=0)
    sparse = copy.deepcopy(dense)
    family.stamp(sparse, family.adapter(sparse))
    convert_to_moe(sparse, family.adapter(sparse), scores, num_experts=E, num_shared=S, top_k=2, layers=[1])
    assert isinstance(sparse.model.layers[1].mlp, MoEMLP) and sparse.model.layers[1].mlp.gated == (kind == "qwen2")
    sparse.save_pretrained(tmp_path)
    reloaded = load_model(tmp_path)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, sparse(ids).logits)
        assert not torch.allclose(reloaded(ids).logits, dense(ids).logits, atol=1e-4)
    assert json.loads((tmp_path / "config.json").read_text())["unislim"]["surgery"][0]["op"] == "moe"


def test_shared_variant_understanding_stays_dense_while_generation_is_sparse():
    dense = tiny("shared")
    moe, _ = convert(dense, top_k=2)
    b = batch(8)
    with torch.no_grad():
        a, m = dense(**b), moe(**b)
    torch.testing.assert_close(m.logits, a.logits, atol=1e-5, rtol=0)
    assert (m.velocity - a.velocity).abs().max() > 1e-3
    mlp = moe.get_submodule("model.layers.1.mlp")
    x = torch.randn(5, D)
    torch.testing.assert_close(mlp(x, dense=True), dense.get_submodule("model.layers.1.mlp")(x), atol=1e-5, rtol=0)


def test_mot_understanding_never_touches_the_moe():
    dense = tiny("mot")
    moe, _ = convert(dense, top_k=1)
    b = task(batch(8), "und_")
    with torch.no_grad():
        assert torch.equal(moe(**b).logits, dense(**b).logits)


def test_conversion_names_bad_layers_and_widths():
    model = tiny("shared")
    adapter = get_family("digits").adapter(model)
    with pytest.raises(ValueError, match=r"partition.layers: \[5\]"):
        convert_to_moe(model, adapter, scores_for("shared"), layers=[0, 5], num_experts=E, num_shared=S, top_k=2)
    with pytest.raises(ValueError, match="ff=96.*num_experts=7"):
        convert_to_moe(model, adapter, scores_for("shared"), layers=[0], num_experts=7, num_shared=1, top_k=2)


# ------------------------------------------------------------------ MoEMLP


def _mlp(impl: str, top_k: int = 3, seed: int = 0) -> MoEMLP:
    torch.manual_seed(seed)
    mlp = MoEMLP(D, FF, E, S, top_k, impl=impl)
    for w in (mlp.w_gate, mlp.w_up, mlp.w_down, mlp.router.weight):
        torch.nn.init.normal_(w, std=0.3)
    return mlp


def test_loop_and_grouped_agree_forward_and_backward():
    loop, grouped = _mlp("loop").train(), _mlp("grouped").train()
    x = torch.randn(4, 9, D, generator=torch.Generator().manual_seed(1))
    outs, grads = [], []
    for mlp in (loop, grouped):
        xi = x.clone().requires_grad_()
        y = mlp(xi)
        (y * torch.linspace(-1, 1, D)).sum().backward()
        outs.append((y, mlp.aux_loss, mlp.last_load))
        grads.append([xi.grad] + [p.grad for p in mlp.parameters()])
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[0][1], outs[1][1])
    assert torch.equal(outs[0][2], outs[1][2])
    for g_loop, g_grouped in zip(*grads):
        torch.testing.assert_close(g_loop, g_grouped, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_grouped_gemm_on_cuda_agrees_with_the_loop_in_bf16():
    loop, grouped = _mlp("loop").cuda().bfloat16(), _mlp("grouped").cuda().bfloat16()
    assert grouped._use_grouped(torch.zeros(1, D, device="cuda", dtype=torch.bfloat16))
    x = torch.randn(256, D, device="cuda", dtype=torch.bfloat16)
    outs, grads = [], []
    for mlp in (loop.train(), grouped.train()):
        y = mlp(x)
        y.float().square().mean().backward()
        outs.append(y.float())
        grads.append([p.grad.float() for p in mlp.parameters()])
    torch.testing.assert_close(outs[1], outs[0], atol=2e-2, rtol=2e-2)
    for g_loop, g_grouped in zip(*grads):
        torch.testing.assert_close(g_grouped, g_loop, atol=5e-2, rtol=5e-2)


def test_routing_is_deterministic_with_ties_broken_by_index_and_load_is_counted():
    mlp = _mlp("loop").eval()
    torch.nn.init.zeros_(mlp.router.weight)  # every logit ties
    x = torch.randn(10, D)
    mlp(x)
    assert mlp.last_load.tolist() == [10, 10, 10, 0, 0, 0] and mlp.aux_loss is None  # no aux loss at eval
    assert mlp.extra_flops == 2 * 10 * 3 * D * (FF // E) * (S + 3)
    mlp.train()(x)  # uniform router probabilities P_j = 1/R, slots on 3 experts: aux = R * 3 * (1/3)(1/R) = 1
    torch.testing.assert_close(mlp.aux_loss, torch.tensor(1.0))


def test_grouped_refuses_widths_without_16_byte_strides():
    mlp = MoEMLP(D, 60, 10, 2, 3, impl="grouped")  # experts of 6 neurons: 24-byte rows in fp32
    with pytest.raises(ValueError, match="16-byte"):
        mlp(torch.randn(3, D))
    assert not MoEMLP(D, 60, 10, 2, 3, impl="auto")._use_grouped(torch.randn(3, D))


def test_router_gets_a_gradient_and_frozen_experts_get_none():
    moe, _ = convert(tiny("shared"), top_k=3)
    moe.train()
    n_frozen = freeze_experts(moe, True)
    experts = [w for m in moe_mlps(moe).values() for w in m.expert_parameters()]
    assert n_frozen == sum(w.numel() for w in experts) == 2 * 3 * FF * D
    aux.reset(moe)
    out = moe(**batch(8))
    extra = aux.parts(moe)["moe_aux_loss"]
    assert torch.isfinite(extra) and extra > 0
    (out.loss + extra).backward()
    for m in moe_mlps(moe).values():
        assert m.router.weight.grad is not None and m.router.weight.grad.abs().sum() > 0
        assert m.last_load.sum() > 0
    assert all(w.grad is None for w in experts)
    assert moe.model.layers[1].self_attn.q_proj.weight.grad.abs().sum() > 0  # the rest trains
    assert freeze_experts(moe, False) == 0 and all(w.requires_grad for w in experts)


def test_aux_loss_is_the_weighted_mean_and_only_in_training():
    moe, _ = convert(tiny("mot"), top_k=3, aux_loss_coef=0.5)
    b = batch(8)
    moe.train()
    aux.reset(moe)
    moe(**b)
    expected = 0.5 * torch.stack([m.aux_loss for m in moe_mlps(moe).values()]).mean()
    torch.testing.assert_close(aux.total(moe), expected)
    moe.eval()
    aux.reset(moe)
    with torch.no_grad():
        moe(**b)
    assert aux.total(moe) is None


def test_frozen_dense_sends_no_understanding_gradient_into_the_experts():
    moe, _ = convert(tiny("shared"), top_k=3, frozen_dense=True)
    moe.train()
    moe(**task(batch(8), "und_")).loss.backward()
    mlp = moe.get_submodule("model.layers.1.mlp")
    assert mlp.w_gate.grad is None and moe.model.layers[1].self_attn.q_proj.weight.grad.abs().sum() > 0
    moe(**task(batch(8), "gen_")).loss.backward()
    assert mlp.w_gate.grad.abs().sum() > 0


# ------------------------------------------------------------------ checkpoints


@pytest.mark.parametrize("variant", ["shared", "mot"])
def test_checkpoint_reloads_through_load_model_with_identical_outputs(tmp_path, variant):
    moe, _ = convert(tiny(variant), top_k=3)
    moe.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "unidigits" and saved["unislim"]["surgery"][-1]["top_k"] == 3
    loaded = load_model(tmp_path)
    assert isinstance(loaded.get_submodule(mlp_name(variant, 1)), MoEMLP)
    b = batch(8)
    with torch.no_grad():
        a, c = moe(**b), loaded(**b)
    assert torch.equal(a.logits, c.logits) and torch.equal(a.velocity, c.velocity)


# ------------------------------------------------------------------ cost


@pytest.mark.parametrize("variant", ["shared", "mot"])
def test_count_flops_and_active_parameters_drop_by_the_analytic_amount(variant):
    dense = tiny(variant)
    k = 2
    moe, _ = convert(dense, top_k=k)
    f = FF // E
    b = batch(4)
    gen, und = task(b, "gen_"), task(b, "und_")

    def flops(model, inputs):
        with torch.no_grad():
            return count_flops(lambda: model(**inputs))

    # tokens through a MoE: shared -> every generation token (prompt + image); mot -> the image tokens
    B, P = gen["gen_prompt_ids"].shape
    n_gen = B * (P + 32) if variant == "shared" else B * 32
    per_token = 2 * 3 * D * f * (R - k) - 2 * D * R  # routed experts skipped, router added
    assert flops(dense, gen) - flops(moe, gen) == 2 * n_gen * per_token  # 2 MoE layers
    assert flops(moe, und) == flops(dense, und)  # understanding: dense (shared) or never routed (mot)

    router = D * R
    family = get_family("digits")
    assert family.active_parameters(moe, "gen") == family.active_parameters(dense, "gen") - 2 * (3 * D * f * (R - k) - router)
    assert family.active_parameters(moe, "und") == family.active_parameters(dense, "und")  # dense experts, no router
    assert moe.num_parameters() == dense.num_parameters() + 2 * router


def test_a_fresh_process_can_rebuild_every_recorded_op():
    """Loading a checkpoint must not depend on what the process imported before (an evaluate task
    that had never imported the MoE conversion could not reload a partition checkpoint)."""
    import json
    import subprocess
    import sys

    code = ("import json; from unislim.modeling.surgery import record; record._load_builders(); "
            "print(json.dumps(sorted(record.BUILDERS)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert {"moe", "mlp_widths", "mod", "skip_layers"} <= set(json.loads(out.stdout)), out.stdout
