"""Physical pruning of stock transformers models: reload with from_pretrained, exact param counts."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from unislim.modeling.adapters import adapter_for
from unislim.modeling.importance import CalibrationRecorder, scores_from_stats
from unislim.modeling.surgery.prune import drop_kv_groups, drop_layers, keep_neurons, least_important

D, FF, L, H, KV, V = 32, 48, 4, 4, 2, 64


def _model(cls, config_cls):
    torch.manual_seed(0)
    return cls(config_cls(vocab_size=V, hidden_size=D, intermediate_size=FF, num_hidden_layers=L,
                          num_attention_heads=H, num_key_value_heads=KV, max_position_embeddings=64,
                          tie_word_embeddings=False)).eval()


def _scores(model):
    with CalibrationRecorder(model, adapter_for(model)) as rec, torch.no_grad():
        model(input_ids=torch.randint(0, V, (4, 12), generator=torch.Generator().manual_seed(0)))
    return scores_from_stats(rec.stats(), model, adapter_for(model))


def _n(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("cls,config_cls", [(Qwen2ForCausalLM, Qwen2Config), (LlamaForCausalLM, LlamaConfig)],
                         ids=["qwen2", "llama"])
def test_pruned_model_reloads_with_expected_size(cls, config_cls, tmp_path):
    model = _model(cls, config_cls)
    scores, before = _scores(model), _n(model)
    adapter = adapter_for(model)
    bias = 1 if cls is Qwen2ForCausalLM else 0  # Qwen2 has q/k/v biases
    hd = D // H

    keep_neurons(model, adapter, "und", scores, keep=0.5)
    assert _n(model) == before - L * 3 * D * (FF // 2)
    n = _n(model)
    drop_kv_groups(model, adapter, "und", scores, n_drop=1)
    per_layer_removed = (H // KV) * hd * D * 2 + 2 * hd * D + bias * ((H // KV) * hd + 2 * hd)
    assert _n(model) == n - L * per_layer_removed
    n, layer_size = _n(model), _n(model.model.layers[1])
    kept = drop_layers(model, adapter, least_important(scores["layer_importance.block"], 1, protect=(0,)))
    assert len(kept) == L - 1 and 0 in kept and _n(model) == n - layer_size

    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is cls and _n(reloaded) == _n(model)
    assert reloaded.config.num_hidden_layers == L - 1 and reloaded.config.num_key_value_heads == KV - 1
    assert reloaded.config.intermediate_size == FF // 2
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected)


def test_keeping_everything_reproduces_outputs_exactly():
    model = _model(Qwen2ForCausalLM, Qwen2Config)
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    scores = _scores(model)
    keep_neurons(model, adapter_for(model), "und", scores, keep=1.0)
    drop_kv_groups(model, adapter_for(model), "und", scores, n_drop=0)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


def test_neurons_kept_are_the_top_scores():
    model = _model(Qwen2ForCausalLM, Qwen2Config)
    scores = _scores(model)
    kept = keep_neurons(model, adapter_for(model), "und", scores, keep=0.25)
    s = scores["model.layers.2.mlp.neuron"]
    assert sorted(kept["model.layers.2.mlp"]) == sorted(torch.topk(s, 12).indices.tolist())
    assert kept["model.layers.2.mlp"] == sorted(kept["model.layers.2.mlp"])  # original order kept
