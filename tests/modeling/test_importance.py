"""Adapters, the hook helper and the importance statistics on real transformers modules."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from unislim.modeling.adapters import adapter_for
from unislim.modeling.hooks import HookError, HookSet
from unislim.modeling.importance import (
    CalibrationRecorder, head_scores, kv_group_scores, merge_stats, neuron_scores, scores_from_stats, top_overlap,
)


def _tiny(cls, config_cls, **kw):
    torch.manual_seed(0)
    config = config_cls(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **kw)
    return cls(config).eval()


@pytest.fixture(scope="module")
def qwen():
    return _tiny(Qwen2ForCausalLM, Qwen2Config)


def _record(model, input_ids, mask=None):
    with CalibrationRecorder(model, adapter_for(model)) as rec, torch.no_grad():
        rec.token_mask = mask
        model(input_ids=input_ids)
    return rec.stats()


def test_adapters_find_every_part(qwen):
    llama = _tiny(LlamaForCausalLM, LlamaConfig)
    for model in (qwen, llama):
        a = adapter_for(model)
        mlps, attns = a.mlps(model, "gen"), a.attentions(model, "und")
        assert [m.name for m in mlps] == [f"model.layers.{i}.mlp" for i in range(3)]
        assert mlps[0].width == 48 and attns[0].num_heads == 4 and attns[0].num_kv_heads == 2
        assert attns[2].o_name == "model.layers.2.self_attn.o_proj" and attns[0].head_dim == 8
    with pytest.raises(ValueError, match="component must be one of"):
        adapter_for(qwen).mlps(qwen, "video")


def test_neuron_score_matches_direct_computation(qwen):
    ids = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(1))
    captured = {}
    hook = qwen.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: captured.setdefault("h", a[0]))
    stats = _record(qwen, ids)
    hook.remove()
    h = captured["h"].reshape(-1, 48).double()  # (N, ff)
    direct = h.abs().mean(0) * qwen.model.layers[1].mlp.down_proj.weight.double().norm(dim=0)
    scores = scores_from_stats(stats, qwen, adapter_for(qwen))
    torch.testing.assert_close(scores["model.layers.1.mlp.neuron"], direct, rtol=1e-9, atol=0)
    assert scores["model.layers.1.self_attn.o_proj.head"].shape == (4,)
    assert scores["model.layers.1.self_attn.o_proj.kv_group"].shape == (2,)


def test_statistics_reduce_exactly_across_shards(qwen):
    ids = torch.randint(0, 64, (6, 12), generator=torch.Generator().manual_seed(2))
    whole = scores_from_stats(_record(qwen, ids), qwen, adapter_for(qwen))
    merged = merge_stats([_record(qwen, ids[:2]), _record(qwen, ids[2:])])
    split = scores_from_stats(merged, qwen, adapter_for(qwen))
    assert whole.keys() == split.keys()
    for k in whole:
        torch.testing.assert_close(split[k], whole[k], rtol=1e-6, atol=1e-9)


def test_token_mask_leaves_padding_out(qwen):
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[:, :3] = False
    stats = _record(qwen, ids, mask)
    assert stats["layer.0.tokens"].item() == 10 and stats["model.layers.0.mlp.tokens"].item() == 10


def test_layer_cosines_see_a_dead_mlp(qwen):
    model = _tiny(Qwen2ForCausalLM, Qwen2Config)
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight.zero_()
    s = scores_from_stats(_record(model, torch.randint(0, 64, (2, 6))), model, adapter_for(model))
    assert s["layer_cos.mlp"][2].item() == pytest.approx(1.0)
    assert s["layer_importance.mlp"][2].item() == pytest.approx(0.0, abs=1e-6)
    assert s["layer_importance.mlp"][0].item() > 1e-5 and (s["layer_cos.block"] <= 1 + 1e-6).all()


def test_score_math():
    w = torch.tensor([[3.0, 0.0], [4.0, 1.0]])  # columns of norm 5 and 1
    torch.testing.assert_close(neuron_scores(torch.tensor([2.0, 8.0]), 2, w), torch.tensor([5.0, 4.0], dtype=torch.float64))
    w_o = torch.ones(2, 4)  # 2 heads of dim 2: Frobenius norm 2 each
    torch.testing.assert_close(head_scores(torch.tensor([1.0, 3.0]), 1, w_o, 2), torch.tensor([2.0, 6.0], dtype=torch.float64))
    torch.testing.assert_close(kv_group_scores(torch.tensor([1.0, 2.0, 3.0, 4.0]), 2), torch.tensor([3.0, 7.0]))
    assert top_overlap(torch.arange(10.0), torch.arange(10.0)) == 1.0
    assert top_overlap(torch.arange(10.0), -torch.arange(10.0)) == 0.0


def test_hookset_removes_handles_and_names_silent_modules(qwen):
    with pytest.raises(HookError, match=r"model.layers.0.mlp"):
        with HookSet(qwen) as hooks:
            hooks.post("model.layers.0.mlp", lambda *a: None)
    with pytest.raises(RuntimeError, match="boom"):
        with HookSet(qwen) as hooks:
            hooks.post("model.layers.0.mlp", lambda *a: None)
            raise RuntimeError("boom")
    assert not qwen.model.layers[0].mlp._forward_hooks
    with pytest.raises(HookError, match="no module named"):
        HookSet(qwen).pre("model.layers.9.mlp", lambda *a: None)
