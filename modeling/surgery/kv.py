"""What a decoder layer writes to a KV cache for some tokens, without running the layer.

A layer skipped for a token during cached decoding must still leave that token's keys and values in
the layer's cache, or later tokens find a hole: transformers' `DynamicLayer` grows by
concatenation, so the layer's cache comes out one entry short and every later key sits at the
wrong slot (`docs/unified_models.md`, "The KV-cache pitfall"). `write_kv` computes exactly what the
layer's attention would write — `input_layernorm` → `k_proj` / `v_proj`, the model's own rotary on
the keys — and appends it; the query, attention, `o_proj` and MLP are not computed.

Used by the families' decoding loops (`families/_decoding.LayerSkip`) and by Mixture-of-Depths
routers during cached decoding (`surgery/mod/layer.py`).
"""

from __future__ import annotations

import sys

import torch
from torch import nn


def writes_kv_alone(layer: nn.Module) -> bool:
    """A Llama-style layer (Llama, Janus's Llama, Emu3): input_layernorm → self_attn.{k,v}_proj,
    rotary keys, no per-head key norm. Anything else (a surgery wrapper, q/k-norm attention) must
    run whole instead."""
    attn = getattr(layer, "self_attn", None)
    return (hasattr(layer, "input_layernorm") and attn is not None and hasattr(attn, "k_proj")
            and hasattr(attn, "v_proj") and hasattr(attn, "head_dim") and not hasattr(attn, "k_norm"))


def layer_cache(kwargs: dict):
    """The KV cache a decoder layer was called with (transformers 5.x: `cache=`), or None."""
    return kwargs.get("cache", kwargs.get("past_key_values"))


def write_kv(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> None:
    """Append what `layer`'s attention writes to the cache for `hidden` (B, T, d), and nothing else."""
    cache = layer_cache(kwargs)
    if cache is None:  # nothing later tokens could read
        return
    attn = layer.self_attn
    h = layer.input_layernorm(hidden)  # (B, T, d)
    shape = (*h.shape[:-1], -1, attn.head_dim)
    keys = attn.k_proj(h).view(shape).transpose(1, 2)  # (B, KV, T, hd)
    values = attn.v_proj(h).view(shape).transpose(1, 2)
    cos, sin = kwargs["position_embeddings"]
    rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb  # the model's own rotary
    _, keys = rotary(keys, keys, cos, sin)
    cache.update(keys, values, attn.layer_idx)
