"""Adapters as data: a config-only adapter scores exactly like the built-in one; ungated MLPs, dotted
projection names, sizes in a sub-config and decoder stacks outside `model.layers` are described
and pruned by qualified name (the in-memory model gains no stray modules)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, BertConfig, BertModel, GPTJConfig, Qwen2Config

from tests.causal_lms import GPTJ_ADAPTER
from unislim.modeling.adapters import ADAPTERS, Adapter, AdapterError, adapter_for
from unislim.modeling.importance import CalibrationRecorder, scores_from_stats
from unislim.modeling.surgery.prune import keep_neurons


def _qwen2():
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                        num_hidden_layers=3, num_attention_heads=4,
                                                        num_key_value_heads=2)).eval()


def _stats(model, adapter):
    ids = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(1))
    with CalibrationRecorder(model, adapter) as rec, torch.no_grad():
        model(input_ids=ids)
    return rec.stats(), scores_from_stats(rec.stats(), model, adapter)


def test_a_config_only_adapter_gets_the_scores_of_the_built_in_one():
    model = _qwen2()
    spelled = {k: v for k, v in ADAPTERS["qwen2"].to_dict().items() if k != "name"}  # every key, as YAML would
    built_in, from_yaml = adapter_for(model), Adapter.from_dict(spelled)
    assert from_yaml.name == "custom" and from_yaml.digest() != built_in.digest()  # the name is part of the data
    (s1, a), (s2, b) = _stats(model, built_in), _stats(model, from_yaml)
    assert s1.keys() == s2.keys() and a.keys() == b.keys()
    assert all(torch.equal(s1[k], s2[k]) for k in s1) and all(torch.equal(a[k], b[k]) for k in a)


def test_an_ungated_mlp_outside_model_layers_is_described_in_yaml_only():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GPTJConfig(vocab_size=64, n_embd=32, n_inner=64, n_layer=2, n_head=4,
                                                        rotary_dim=4, bos_token_id=0, eos_token_id=0)).eval()
    with pytest.raises(AdapterError, match="no adapter for model_type 'gptj'"):
        adapter_for(model)
    adapter = adapter_for(model, GPTJ_ADAPTER)
    mlps, attns = adapter.mlps(model, "und"), adapter.attentions(model, "und")
    assert [m.name for m in mlps] == ["transformer.h.0.mlp", "transformer.h.1.mlp"] and not mlps[0].gated
    assert attns[0].num_heads == attns[0].num_kv_heads == 4 and attns[0].o_name == "transformer.h.0.attn.out_proj"
    _, scores = _stats(model, adapter)
    assert scores["transformer.h.1.mlp.neuron"].shape == (64,) and scores["transformer.h.0.attn.out_proj.head"].shape == (4,)


def test_dotted_projections_are_pruned_by_qualified_name_through_their_parent():
    """BERT keeps its MLP in two modules (`intermediate.dense`, `output.dense`) of the layer: the
    replacement must land there, not as a new child named 'intermediate.dense'."""
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4)).eval()
    adapter = Adapter.from_dict({"layers": "encoder.layer", "mlp": "", "mlp_act": "intermediate.intermediate_act_fn",
                                 "mlp_proj": {"gate": None, "up": "intermediate.dense", "down": "output.dense"},
                                 "attention": "attention",
                                 "attn_proj": {"q": "self.query", "k": "self.key", "v": "self.value",
                                               "o": "output.dense"}})
    before, n_modules = model.num_parameters(), len(list(model.named_modules()))
    scores = {f"{m.name}.neuron": torch.rand(m.width) for m in adapter.mlps(model, "und")}
    keep_neurons(model, adapter, "und", scores, keep=0.5)
    removed = 32 * (32 + 1) + 32 * 32  # per layer: 32 rows (+ biases) of the up projection, 32 columns of down
    assert model.num_parameters() == before - 2 * removed  # no stray modules holding the old weights
    assert len(list(model.named_modules())) == n_modules
    assert model.encoder.layer[0].intermediate.dense.out_features == 32
    assert model.encoder.layer[0].output.dense.in_features == 32
    model(torch.randint(0, 64, (2, 6)))  # still runs


def test_sizes_come_from_a_sub_config():
    layer = nn.Module()
    layer.self_attn = nn.Module()
    for name, out in (("q_proj", 32), ("k_proj", 16), ("v_proj", 16), ("o_proj", 32)):
        setattr(layer.self_attn, name, nn.Linear(32, out))
    layer.mlp = nn.Module()
    for name in ("gate_proj", "up_proj"):
        setattr(layer.mlp, name, nn.Linear(32, 64))
    layer.mlp.down_proj = nn.Linear(64, 32)
    model = nn.Module()
    model.language_model = nn.Module()
    model.language_model.layers = nn.ModuleList([layer])
    model.config = SimpleNamespace(model_type="janus-like", text_config=SimpleNamespace(
        num_attention_heads=4, num_key_value_heads=2, hidden_size=32, head_dim=None))
    adapter = Adapter.from_dict({"layers": "language_model.layers", "config": "text_config"})
    (attn,) = adapter.attentions(model, "und")
    assert (attn.num_heads, attn.num_kv_heads, attn.head_dim) == (4, 2, 8)
    with pytest.raises(AdapterError, match="model.adapter.heads.num_heads"):
        Adapter.from_dict({"layers": "language_model.layers"}).attentions(model, "und")  # top-level config: none


def test_adapter_errors_name_the_key():
    model = _qwen2()
    with pytest.raises(AdapterError, match=r"unknown key\(s\) \['mlps'\]"):
        Adapter.from_dict({"mlps": "mlp"})
    with pytest.raises(AdapterError, match="model.adapter.layers.*'model.blocks'"):
        adapter_for(model, {"layers": "model.blocks"}).decoder_layers(model)
    with pytest.raises(AdapterError, match="model.adapter.mlp_proj"):
        adapter_for(model, {"mlp_proj": {"down": "w2"}}).mlps(model, "und")
    assert adapter_for(copy.deepcopy(model), {"mlp_act": "act_fn"}).digest() != adapter_for(model).digest()
