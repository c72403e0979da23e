"""`MoEMLP` alone: gated and ungated experts, biases, and every impl against the reference loop.

Tiny widths on CPU (d 32, ff 96 cut into 8 experts of 12 neurons, 2 shared, 6 routed), so each
test runs in milliseconds. Gradients are compared w.r.t. the input, every expert weight and bias,
and the router.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
import torch.nn.functional as F
from transformers.activations import NewGELUActivation

from unislim.modeling.surgery.moe import MoEMLP, partition_neurons

E, S, R, FF, D = 8, 2, 6, 96, 32
VARIANTS = {  # name -> MoEMLP keyword args (and what the dense twin needs)
    "gated": dict(gated=True),
    "gated+bias": dict(gated=True, gate_bias=True, up_bias=True, down_bias=True),  # Llama mlp_bias
    "gated+up_bias": dict(gated=True, up_bias=True),
    "ungated": dict(gated=False),
    "ungated+bias": dict(gated=False, up_bias=True, down_bias=True),
    "ungated+down_bias": dict(gated=False, down_bias=True),
}
PARTS = partition_neurons(torch.rand(FF, generator=torch.Generator().manual_seed(3)), E, S)  # expert -> neurons


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


class DenseMLP(nn.Module):
    """The dense twin: Qwen2MLP (gated) or a Phi/GPT-J MLP (fc1 -> act -> fc2), optional biases."""

    def __init__(self, gated: bool, up_bias: bool = False, down_bias: bool = False, gate_bias: bool = False,
                 seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.gate_proj = nn.Linear(D, FF, bias=gate_bias) if gated else None
        self.up_proj = nn.Linear(D, FF, bias=up_bias)
        self.down_proj = nn.Linear(FF, D, bias=down_bias)
        self.act_fn = nn.SiLU() if gated else NewGELUActivation()
        for p in self.parameters():
            nn.init.normal_(p, std=0.3)

    def forward(self, x):
        if self.gate_proj is None:
            return self.down_proj(self.act_fn(self.up_proj(x)))
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def moe_from(dense: DenseMLP, impl: str = "loop", top_k: int = 3, **kw) -> MoEMLP:
    gated = dense.gate_proj is not None
    up_bias, down_bias = dense.up_proj.bias, dense.down_proj.bias
    gate_bias = dense.gate_proj.bias if gated else None
    mlp = MoEMLP(D, FF, E, S, top_k, impl=impl, hidden_act="silu" if gated else dense.act_fn, gated=gated,
                 up_bias=up_bias is not None, down_bias=down_bias is not None, gate_bias=gate_bias is not None, **kw)
    mlp.load_dense(dense.gate_proj.weight if gated else None, dense.up_proj.weight, dense.down_proj.weight, PARTS,
                   up_bias=up_bias, down_bias=down_bias, gate_bias=gate_bias)
    torch.nn.init.normal_(mlp.router.weight, generator=torch.Generator().manual_seed(4))  # spread routing
    return mlp


def inputs(n: int = 37, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


def forward_backward(mlp: MoEMLP, x: torch.Tensor):
    """Output, aux loss, load and the gradients (input, every parameter by name) of a fixed loss."""
    mlp.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_()
    y = mlp.train()(xi)
    (y * torch.linspace(-1, 1, D)).sum().backward()  # a non-uniform upstream gradient
    grads = {"input": xi.grad, **{n: p.grad for n, p in mlp.named_parameters()}}
    return y.detach(), mlp.aux_loss.detach(), mlp.last_load.clone(), grads


def assert_same_step(a, b, atol=1e-5, rtol=1e-5):
    torch.testing.assert_close(a[0], b[0], atol=atol, rtol=rtol)
    torch.testing.assert_close(a[1], b[1])
    assert torch.equal(a[2], b[2])
    assert a[3].keys() == b[3].keys()
    for name in a[3]:
        assert a[3][name] is not None and b[3][name] is not None, name
        torch.testing.assert_close(a[3][name], b[3][name], atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


# ------------------------------------------------------------------ ungated MLPs and biases


FAST = ["grouped", "fused", "grouped_padded", "masked"]  # every impl but the reference loop and auto


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("impl", ["loop", *FAST])
def test_all_experts_active_equals_the_dense_mlp(variant, impl):
    dense = DenseMLP(**VARIANTS[variant])
    x = inputs()
    with torch.no_grad():
        want = dense(x)
        every = moe_from(dense, impl, top_k=R).eval()(x)  # sparse path, every routed expert selected
        flag = moe_from(dense, impl, top_k=1).eval()(x, dense=True)  # the dense switch
    torch.testing.assert_close(every, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(flag, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("impl", FAST)
def test_every_impl_equals_the_loop_forward_and_gradients(variant, impl):
    dense, x = DenseMLP(**VARIANTS[variant]), inputs()
    assert_same_step(forward_backward(moe_from(dense, "loop"), x), forward_backward(moe_from(dense, impl), x))


def test_a_sparse_forward_differs_from_dense_and_adds_the_down_bias_once():
    dense = DenseMLP(gated=False, up_bias=True, down_bias=True)
    mlp, x = moe_from(dense, top_k=2).eval(), inputs()
    with torch.no_grad():
        y = mlp(x)
        assert (y - dense(x)).abs().max() > 1e-2  # 2 of 6 routed experts: not the dense MLP
        mlp.b_down.add_(1.0)
        torch.testing.assert_close(mlp(x), y + 1.0)


def test_ungated_module_has_no_gate_and_gated_silu_keeps_its_state_dict_keys():
    assert set(MoEMLP(D, FF, E, S, 2).state_dict()) == {"w_gate", "w_up", "w_down", "router.weight"}
    ungated = MoEMLP(D, FF, E, S, 2, hidden_act=NewGELUActivation(), gated=False, up_bias=True, down_bias=True)
    assert ungated.w_gate is None
    assert set(ungated.state_dict()) == {"w_up", "w_down", "b_up", "b_down", "router.weight"}
    f = FF // E
    assert [tuple(p.shape) for p in ungated.expert_parameters()] == [(E, f, D), (E, D, f), (E, f), (D,)]
    gated = MoEMLP(D, FF, E, S, 2)
    assert gated.expert_parameters() == [gated.w_gate, gated.w_up, gated.w_down]


def test_extra_flops_count_two_projections_when_ungated():
    x = inputs(10)
    for gated, proj in ((True, 3), (False, 2)):
        mlp = MoEMLP(D, FF, E, S, 3, gated=gated, impl="loop")
        mlp(x)
        assert mlp.extra_flops == 2 * 10 * proj * D * (FF // E) * (S + 3)


def test_load_dense_names_a_missing_or_unexpected_gate_or_bias():
    parts = partition_neurons(torch.rand(FF), E, S)
    w_in, w_out = torch.randn(FF, D), torch.randn(D, FF)
    with pytest.raises(ValueError, match="gate must be given.*ungated"):
        MoEMLP(D, FF, E, S, 2, gated=False).load_dense(w_in, w_in, w_out, parts)
    with pytest.raises(ValueError, match="gate must be given.*, gated"):
        MoEMLP(D, FF, E, S, 2).load_dense(None, w_in, w_out, parts)
    with pytest.raises(ValueError, match="up_bias must be given"):
        MoEMLP(D, FF, E, S, 2, up_bias=True).load_dense(w_in, w_in, w_out, parts)
    with pytest.raises(ValueError, match="gate_bias must be given"):
        MoEMLP(D, FF, E, S, 2, gate_bias=True).load_dense(w_in, w_in, w_out, parts)
    with pytest.raises(ValueError, match="needs gated=True"):
        MoEMLP(D, FF, E, S, 2, gated=False, gate_bias=True)
    with pytest.raises(ValueError, match="down_bias must be given"):
        MoEMLP(D, FF, E, S, 2).load_dense(w_in, w_in, w_out, parts, down_bias=torch.zeros(D))


def _expert_output_norms(dense: DenseMLP, x: torch.Tensor) -> torch.Tensor:
    """||f_Rj(x)|| from the dense MLP's own layers, masking all neurons but expert j's."""
    cols = []
    with torch.no_grad():
        pre_up = dense.up_proj(x)  # bias included
        h = dense.act_fn(pre_up) if dense.gate_proj is None else dense.act_fn(dense.gate_proj(x)) * pre_up  # (n, ff)
        for j in range(S, E):
            mask = torch.zeros(FF)
            mask[PARTS[j]] = 1
            cols.append(F.linear(h * mask, dense.down_proj.weight).norm(dim=-1))  # no down bias: shared
    return torch.stack(cols, dim=-1)  # (n, R)


@pytest.mark.parametrize("variant", ["gated", "ungated+bias"])
def test_router_stats_hold_each_routed_experts_output_norm(variant):
    dense, x = DenseMLP(**VARIANTS[variant]), inputs(50)
    mlp = moe_from(dense)
    stats = mlp.router_stats(x, chunk=16)  # several chunks
    y = _expert_output_norms(dense, x).double()
    torch.testing.assert_close(stats["xty"], x.double().T @ y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats["xtx"], x.double().T @ x.double())
    assert stats["n"] == 50


def test_init_and_fitted_routers_of_an_ungated_mlp_prefer_the_experts_that_fire():
    """The fitted router's top-3 must recover the truly largest experts far better than chance."""
    dense = DenseMLP(gated=False, up_bias=True)
    mlp = moe_from(dense)
    x = inputs(400, seed=5)
    mlp.fit_router(mlp.router_stats(x))
    test = inputs(200, seed=6)
    truth = _expert_output_norms(dense, test).topk(3, dim=-1).indices
    with torch.no_grad():
        fitted = mlp.router(test).topk(3, dim=-1).indices
        mlp.init_router()
        w_in = mlp.w_up[S:]  # ungated: the router estimate reads the up projection
        want = torch.einsum("rf,rfd->rd", mlp.w_down[S:].norm(dim=1), w_in)
        torch.testing.assert_close(mlp.router.weight, want / want.norm(dim=1).mean())

    def overlap(a, b):
        return sum(len(set(p.tolist()) & set(q.tolist())) for p, q in zip(a, b)) / (3 * len(a))

    assert overlap(fitted, truth) > 0.7  # chance: 3/6 = 0.5


# ------------------------------------------------------------------ fast paths against the reference loop


def _random_mlp(impl: str, d: int = D, ff: int = FF, experts: int = E, shared: int = S, top_k: int = 3,
                seed: int = 0, **kw) -> MoEMLP:
    torch.manual_seed(seed)
    mlp = MoEMLP(d, ff, experts, shared, top_k, impl=impl, **kw)
    for p in mlp.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return mlp


@pytest.mark.parametrize("impl", FAST[1:])  # `grouped` itself refuses these widths
@pytest.mark.parametrize("gated", [True, False])
def test_widths_off_the_16_byte_rule_match_the_loop(impl, gated):
    """6-neuron experts (24-byte rows in fp32), as in the digits model: `grouped_padded` pads them."""
    kw = dict(ff=60, experts=10, shared=2, gated=gated, up_bias=not gated, down_bias=True)
    x = inputs(41)
    assert_same_step(forward_backward(_random_mlp("loop", **kw), x), forward_backward(_random_mlp(impl, **kw), x))


@pytest.mark.parametrize("impl", FAST)
def test_no_shared_experts_and_experts_that_get_no_tokens(impl):
    """A zero router ties every logit: top-3 = experts 0..2 for every token, experts 3..5 idle (gradient 0)."""
    loop, fast = _random_mlp("loop", shared=0), _random_mlp(impl, shared=0)
    for m in (loop, fast):
        torch.nn.init.zeros_(m.router.weight)
    x = inputs()
    a, b = forward_backward(loop, x), forward_backward(fast, x)
    assert a[2].tolist() == [37, 37, 37, 0, 0, 0, 0, 0]
    assert_same_step(a, b)
    routed = b[3]["w_up"][S:] if S else b[3]["w_up"]
    assert routed[3:].abs().max() == 0 and routed[:3].abs().max() > 0


@pytest.mark.parametrize("impl", FAST)
def test_ties_at_the_top_k_boundary_go_to_the_lower_index_on_every_path(impl):
    """Routed experts 1, 2, 3 share one router row, so their logits tie on every token and the
    top-3 boundary often falls inside the tie."""
    loop, fast = _random_mlp("loop"), _random_mlp(impl)
    for m in (loop, fast):
        with torch.no_grad():
            m.router.weight[2:4] = m.router.weight[1]
    x = inputs(200)
    a, b = forward_backward(loop, x), forward_backward(fast, x)
    assert 0 < a[2][3] < a[2][1]  # the tie was cut: expert 1 chosen more often than expert 3
    assert_same_step(a, b)


@pytest.mark.parametrize("impl", FAST)
def test_frozen_experts_get_no_gradient_and_the_rest_still_matches(impl):
    """Expert-Frozen Tuning: only the input and the router train."""
    x = inputs()
    steps = []
    for name in ("loop", impl):
        mlp = _random_mlp(name, up_bias=True)
        for p in mlp.expert_parameters():
            p.requires_grad_(False)
        steps.append(forward_backward(mlp, x))
    for step in steps:
        assert all(step[3][n] is None for n in ("w_gate", "w_up", "w_down", "b_up"))
        step[3].update({n: torch.zeros(1) for n in ("w_gate", "w_up", "w_down", "b_up")})  # compare the rest
    assert_same_step(*steps)


@pytest.mark.parametrize("impl", FAST)
def test_eval_forward_without_autograd_matches_the_loop(impl):
    x = inputs(300)  # enough rows that `auto` would dispatch
    with torch.no_grad():
        want = _random_mlp("loop").eval()(x)
        got = _random_mlp(impl).eval()(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["loop", *FAST])
def test_empty_input(impl):
    mlp = _random_mlp(impl).train()
    x = torch.zeros(0, D, requires_grad=True)
    y = mlp(x)
    y.sum().backward()
    assert y.shape == (0, D) and x.grad.shape == (0, D) and mlp.last_load.sum() == 0


def test_fused_function_with_gates_other_than_one_matches_autograd():
    """MoEMLP's gate is exactly 1 in the forward (unit_gate skips the scaling); the Function
    must still be right for any g, e.g. soft gates: compare with autograd over plain ops."""
    from unislim.modeling.surgery.moe._fused import Spec, fused_moe

    mlp = _random_mlp("loop", up_bias=True, gate_bias=True)
    x = inputs(20)
    top = torch.stack([torch.randperm(R, generator=torch.Generator().manual_seed(i))[:3] for i in range(20)])
    g0 = torch.rand(20, 3, generator=torch.Generator().manual_seed(9)) + 0.5  # (N, k) soft gates
    token, order = mlp._sorted_slots(top, torch.arange(60.0).view(20, 3))[:2]
    order = order.long()
    counts = torch.bincount(top.flatten(), minlength=R).tolist()
    grads = []
    for fused in (False, True):
        xi, g = x.clone().requires_grad_(), g0.clone().requires_grad_()
        weights = [mlp.w_gate, mlp.w_up, mlp.w_down, mlp.b_gate, mlp.b_up]
        if fused:
            y = fused_moe(xi, g.flatten()[order], token, Spec(S, counts, mlp.act_fn, unit_gate=False), *weights)
        else:
            y = mlp._experts_dense(xi, 0, S) + mlp._routed_loop(xi, top, g)
        (y * torch.linspace(-1, 1, D)).sum().backward()
        grads.append((y.detach(), xi.grad, g.grad, *[w.grad.clone() for w in weights]))
        mlp.zero_grad(set_to_none=True)
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ auto


def test_auto_is_a_fixed_table_of_device_dtype_and_shapes():
    from unislim.modeling.surgery.moe.mlp import auto_impl

    f32, bf16 = torch.float32, torch.bfloat16
    assert auto_impl("cpu", f32, 896, 76, 64, 8, 24, 2048) == "fused"  # Qwen2-0.5B widths, the paper's layout
    assert auto_impl("cpu", f32, 896, 608, 8, 2, 2, 2048) == "fused"
    assert auto_impl("cpu", f32, 128, 6, 64, 8, 24, 2048) == "masked"  # the digits model's 6-neuron experts
    assert auto_impl("cpu", f32, 896, 76, 64, 8, 24, 8) == "masked"  # 8 tokens: ~3 rows per expert
    assert auto_impl("cpu", f32, 896, 19, 256, 32, 96, 2048) == "masked"  # 19-neuron experts
    assert auto_impl("cpu", f32, 896, 38, 128, 16, 48, 256) == "fused"  # 110 rows x 896 x 38 per expert
    assert auto_impl("cpu", f32, 128, 48, 8, 2, 2, 240) == "masked"  # 80 rows x 128 x 48: too little work
    assert auto_impl("cpu", f32, 128, 48, 8, 2, 2, 1024) == "fused"
    assert auto_impl("cuda", bf16, 896, 76, 64, 8, 24, 4096) == "grouped_padded"
    assert auto_impl("cuda", f32, 896, 76, 64, 8, 24, 4096) == "fused"  # grouped_mm has no fp32 CUDA kernel
    mlp = MoEMLP(D, FF, E, S, 3)
    picks = {mlp.resolve_impl(torch.zeros(n, D)) for _ in range(3) for n in (300,)}
    assert picks == {auto_impl("cpu", f32, D, FF // E, E, S, 3, 300)}  # the same every call
    assert mlp.resolve_impl(torch.zeros(2, D)) == "masked"


def test_auto_runs_what_it_picks():
    x = inputs(300)
    with torch.no_grad():
        auto = _random_mlp("auto").eval()
        picked = auto.resolve_impl(x)
        assert picked == "masked"  # 12-neuron experts: below MIN_EXPERT_WIDTH
        torch.testing.assert_close(auto(x), _random_mlp(picked).eval()(x), atol=0, rtol=0)


def test_auto_dispatches_when_experts_are_wide_and_busy_enough():
    mlp = _random_mlp("auto", d=64, ff=256, experts=4, shared=1, top_k=1)  # 64-neuron experts
    x = torch.randn(1200, 64, generator=torch.Generator().manual_seed(2))  # 400 rows x 64 x 64 per expert
    with torch.no_grad():
        assert mlp.resolve_impl(x) == "fused"
        y = mlp.eval()(x)
        mlp.impl = "fused"
        assert torch.equal(y, mlp(x))


def test_padded_grouped_refuses_a_hidden_size_off_the_rule():
    with pytest.raises(ValueError, match="hidden size"):
        MoEMLP(30, 60, 10, 2, 3, impl="grouped_padded")(torch.randn(3, 30))


# ------------------------------------------------------------------ CUDA


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("impl", ["fused", "grouped_padded", "masked", "auto"])
@pytest.mark.parametrize("ff", [96, 60])  # 12- and 6-neuron experts: 24 and 12 bytes in bf16, both off the rule
def test_cuda_bf16_paths_agree_with_the_loop(impl, ff):
    experts = 8 if ff == 96 else 10
    loop = _random_mlp("loop", ff=ff, experts=experts).cuda().bfloat16()
    fast = _random_mlp(impl, ff=ff, experts=experts).cuda().bfloat16()
    x = inputs(256).cuda().bfloat16()
    outs, grads = [], []
    for mlp in (loop, fast):
        xi = x.clone().requires_grad_()
        y = mlp.train()(xi)
        y.float().square().mean().backward()
        outs.append(y.float())
        grads.append([xi.grad.float()] + [p.grad.float() for p in mlp.parameters()])
    torch.testing.assert_close(outs[1], outs[0], atol=2e-2, rtol=2e-2)
    for g_loop, g_fast in zip(*grads):
        torch.testing.assert_close(g_fast, g_loop, atol=5e-2, rtol=5e-2)
