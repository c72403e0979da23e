"""Dense -> MoE conversion of the reference model: partition, MoEMLP, the model, checkpoints, FLOPs.

Tiny configs on CPU (d 32, ff 96). Sizes used: 8 experts of 12 neurons, 2 shared, 6 routed.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.modeling.tiny import tiny
from unislim.modeling.loading import load_model
from unislim.modeling.families.digits import UniDigitsMoEConfig, UniDigitsMoEModel, convert_to_moe, freeze_experts
from unislim.modeling.surgery.moe import MoEMLP, cumulative_scores, partition_neurons
from unislim.modeling.families.digits import UniDigitsModel, make_batch, reference_config, train_reference
from unislim.modeling.families.digits.evaluate import count_flops

E, S, R, FF, D = 8, 2, 6, 96, 32


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def mlp_name(variant: str, layer: int) -> str:
    return f"model.layers.{layer}.mlp" + ("_moe_gen" if variant == "mot" else "")


def scores_for(variant: str, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {mlp_name(variant, i): torch.rand(FF, generator=g) for i in range(2)}


def convert(dense: UniDigitsModel, top_k: int, impl: str = "loop", **kw):
    return convert_to_moe(dense, scores_for(dense.config.variant), layers=[0, 1], num_experts=E, num_shared=S,
                          top_k=top_k, impl=impl, **kw)


def batch(n: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    return make_batch(n, torch.Generator().manual_seed(seed))


def task(b: dict, prefix: str) -> dict:
    return {k: v for k, v in b.items() if k.startswith(prefix)}


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


# ------------------------------------------------------------------ config


@pytest.mark.parametrize(("moe", "match"), [
    ({"num_experts": 7}, "num_experts=7"),
    ({"num_shared": 8}, "num_shared.*got 8"),
    ({"top_k": 7}, "top_k.*got 7"),
    ({"layers": [0, 5]}, r"layers.*\[0, 5\]"),
    ({"component": "und"}, "component.*'und'"),
    ({"impl": "triton"}, "impl.*'triton'"),
    ({"aux_loss_coef": -1}, "aux_loss_coef.*-1"),
    ({"topk": 3}, "unknown key.*topk"),
])  # fmt: skip
def test_config_names_the_bad_moe_key_and_value(moe, match):
    with pytest.raises(Exception, match=match):
        UniDigitsMoEConfig(hidden_size=D, intermediate_size=FF, num_hidden_layers=2,
                           moe={"layers": [0, 1], "num_experts": E, "num_shared": S, "top_k": 3, **moe})


def test_config_fills_defaults_every_layer_but_first_and_last():
    config = UniDigitsMoEConfig(num_hidden_layers=6, intermediate_size=384, moe={})
    assert config.moe["layers"] == [1, 2, 3, 4]
    assert (config.moe["num_experts"], config.moe["num_shared"], config.moe["top_k"]) == (64, 8, 24)


# ------------------------------------------------------------------ MoE = dense with every expert on (Eq. 9)


@pytest.mark.parametrize("impl", ["loop", "grouped"])
@pytest.mark.parametrize("variant", ["shared", "mot"])
def test_all_experts_active_equals_the_dense_model(variant, impl):
    dense = tiny(variant)
    moe, partition = convert(dense, top_k=R, impl=impl)
    assert isinstance(moe, UniDigitsMoEModel) and sorted(partition) == [mlp_name(variant, 0), mlp_name(variant, 1)]
    assert isinstance(moe.get_submodule(mlp_name(variant, 1)), MoEMLP)
    b = batch(8)
    with torch.no_grad():
        a, m = dense(**b), moe(**b)
    torch.testing.assert_close(m.logits, a.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(m.velocity, a.velocity, atol=1e-5, rtol=0)


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
    experts = [w for m in moe.moe_mlps().values() for w in (m.w_gate, m.w_up, m.w_down)]
    assert n_frozen == sum(w.numel() for w in experts) == 2 * 3 * FF * D
    out = moe(**batch(8))
    assert out.aux_loss is not None and torch.isfinite(out.aux_loss) and out.aux_loss > 0
    out.loss.backward()
    for m in moe.moe_mlps().values():
        assert m.router.weight.grad is not None and m.router.weight.grad.abs().sum() > 0
        assert m.last_load.sum() > 0
    assert all(w.grad is None for w in experts)
    assert moe.model.layers[1].self_attn.q_proj.weight.grad.abs().sum() > 0  # the rest trains
    assert freeze_experts(moe, False) == 0 and all(w.requires_grad for w in experts)


def test_loss_adds_the_weighted_aux_loss_only_in_training():
    moe, _ = convert(tiny("mot"), top_k=3, aux_loss_coef=0.5)
    b = batch(8)
    torch.manual_seed(0)
    moe.train()
    out = moe(**b)
    expected_aux = torch.stack([m.aux_loss for m in moe.moe_mlps().values()]).mean()
    torch.testing.assert_close(out.aux_loss, expected_aux)
    torch.testing.assert_close(out.loss, out.und_loss + out.gen_loss + 0.5 * expected_aux)
    moe.eval()
    with torch.no_grad():
        plain = moe(**b)
    assert plain.aux_loss is None and plain.loss == plain.und_loss + plain.gen_loss


def test_und_frozen_sends_no_understanding_gradient_into_the_experts():
    moe, _ = convert(tiny("shared"), top_k=3, und_frozen=True)
    moe.train()
    moe(**task(batch(8), "und_")).loss.backward()
    mlp = moe.get_submodule("model.layers.1.mlp")
    assert mlp.w_gate.grad is None and moe.model.layers[1].self_attn.q_proj.weight.grad.abs().sum() > 0
    moe(**task(batch(8), "gen_")).loss.backward()
    assert mlp.w_gate.grad.abs().sum() > 0


@pytest.fixture(scope="module")
def trained() -> UniDigitsModel:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = UniDigitsModel(reference_config("tiny", "shared"))
    train_reference(model, steps=150, batch_size=32, lr=1e-2, seed=0, log_every=150)
    return model.eval()


def test_calibrated_router_is_closer_to_dense_than_zero_or_random_routers(trained):
    """Relative error of the converted MLP vs the dense one on generation hidden states, top-3 of 6."""
    b = task(batch(64, seed=1), "gen_")
    calibrate = lambda m: m(**task(batch(64, seed=2), "gen_"))  # noqa: E731  (other samples than the test's)
    moe, _ = convert(trained, top_k=3, calibrate=calibrate)
    inputs = {}
    hooks = [trained.get_submodule(f"model.layers.{i}.mlp").register_forward_pre_hook(
        lambda mod, a, i=i: inputs.__setitem__(i, a[0])) for i in (0, 1)]
    with torch.no_grad():
        trained(**b)
    for h in hooks:
        h.remove()
    errors = {}
    for i in (0, 1):
        x, mlp = inputs[i], moe.get_submodule(f"model.layers.{i}.mlp")
        with torch.no_grad():
            y = trained.get_submodule(f"model.layers.{i}.mlp")(x)
            err = lambda: float((mlp(x) - y).norm() / y.norm())  # noqa: E731
            errors[i] = {"fit": err()}
            mlp.init_router()
            errors[i]["weights"] = err()
            torch.nn.init.zeros_(mlp.router.weight)
            errors[i]["zero"] = err()
            randoms = []
            for seed in range(4):
                torch.manual_seed(seed)
                torch.nn.init.normal_(mlp.router.weight)
                randoms.append(err())
            errors[i]["random"] = sum(randoms) / len(randoms)
    print("relative error vs dense (top-3 of 6 routed):", errors)
    for e in errors.values():
        assert e["fit"] < 0.85 * e["zero"] and e["fit"] < 0.85 * e["random"]


# ------------------------------------------------------------------ checkpoints


@pytest.mark.parametrize("variant", ["shared", "mot"])
def test_checkpoint_reloads_through_load_model_with_identical_outputs(tmp_path, variant):
    moe, _ = convert(tiny(variant), top_k=3)
    moe.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "unidigits_moe" and saved["moe"]["top_k"] == 3
    loaded = load_model(tmp_path)
    assert type(loaded) is UniDigitsMoEModel and loaded.config.moe == moe.config.moe
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
        with count_flops(model) as total, torch.no_grad():
            model(**inputs)
        return total["flops"]

    # tokens through a MoE: shared -> every generation token (prompt + image); mot -> the image tokens
    B, P = gen["gen_prompt_ids"].shape
    n_gen = B * (P + 32) if variant == "shared" else B * 32
    per_token = 2 * 3 * D * f * (R - k) - 2 * D * R  # routed experts skipped, router added
    assert flops(dense, gen) - flops(moe, gen) == 2 * n_gen * per_token  # 2 MoE layers
    assert flops(moe, und) == flops(dense, und)  # understanding: dense (shared) or never routed (mot)

    router = D * R
    assert moe.num_active_parameters("gen") == dense.num_active_parameters() - 2 * (3 * D * f * (R - k) - router)
    assert moe.num_active_parameters("und") == dense.num_active_parameters()  # dense experts, no router
    assert moe.num_parameters() == dense.num_parameters() + 2 * router
