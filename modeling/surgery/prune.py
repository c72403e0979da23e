"""Physical, training-free pruning: smaller weight matrices, not masks.

Three surgeries, each from importance scores (see `importance.py`):
- `keep_neurons`: keep the top `keep` fraction of each MLP's neurons (rows of gate and up,
  columns of down), in their original order, the same count in every layer so the stock config
  (`intermediate_size`) still describes the model;
- `drop_kv_groups`: remove whole GQA groups (a KV head and the query heads that read it), the
  same number per layer, updating `num_attention_heads` / `num_key_value_heads` and pinning `head_dim`;
- `drop_layers`: delete decoder blocks, renumbering the rest and updating `num_hidden_layers`
  (and `layer_types` where the config has it).
The result saves with `save_pretrained` and reloads with the model's own `from_pretrained`.
"""

from __future__ import annotations

import torch
from torch import nn

from unislim.modeling.adapters import Adapter


def _slice_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> nn.Linear:
    """A new Linear keeping `index` along `dim` (0: outputs, 1: inputs) of the weight."""
    weight = linear.weight.detach().index_select(dim, index.to(linear.weight.device))
    bias = linear.bias
    if bias is not None and dim == 0:
        bias = bias.detach().index_select(0, index.to(bias.device))
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return new


def _set(parent: nn.Module, name: str, module: nn.Module) -> None:
    setattr(parent, name, module)


def top_indices(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """The `keep` highest-scoring indices, in ascending order (ties broken by index)."""
    return torch.sort(torch.topk(scores.double(), keep, sorted=False).indices).values


def keep_neurons(model: nn.Module, adapter: Adapter, component: str, scores: dict[str, torch.Tensor],
                 keep: float) -> dict[str, list[int]]:
    """Keep the top `keep` fraction of neurons of every MLP of `component`; returns kept indices."""
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    kept: dict[str, list[int]] = {}
    for mlp in adapter.mlps(model, component):
        if f"{mlp.name}.neuron" not in scores:
            raise ValueError(f"no neuron scores for {mlp.name}: the calibration task never ran through it (in a "
                             "mixture-of-transformers model a task scores only the copies its tokens use)")
        k = max(1, round(keep * mlp.width))
        index = top_indices(scores[f"{mlp.name}.neuron"], k)
        module = model.get_submodule(mlp.name)
        g, u, d = adapter.mlp_proj
        _set(module, g, _slice_linear(mlp.gate, index, 0))
        _set(module, u, _slice_linear(mlp.up, index, 0))
        _set(module, d, _slice_linear(mlp.down, index, 1))
        if hasattr(module, "intermediate_size"):
            module.intermediate_size = k
        kept[mlp.name] = index.tolist()
    widths = {len(v) for v in kept.values()}
    if not adapter.is_mot and len(widths) == 1:
        model.config.intermediate_size = widths.pop()
    return kept


def drop_kv_groups(model: nn.Module, adapter: Adapter, component: str, scores: dict[str, torch.Tensor],
                   n_drop: int) -> dict[str, list[int]]:
    """Remove the `n_drop` lowest-scoring KV groups of every attention; returns kept groups."""
    attns = adapter.attentions(model, component)
    kept: dict[str, list[int]] = {}
    for a in attns:
        if not 0 <= n_drop < a.num_kv_heads:
            raise ValueError(f"can drop 0..{a.num_kv_heads - 1} KV groups, got {n_drop}")
        groups = top_indices(scores[f"{a.o_name}.kv_group"], a.num_kv_heads - n_drop)
        per = a.num_heads // a.num_kv_heads
        heads = (groups[:, None] * per + torch.arange(per)).flatten()  # query heads of the kept groups
        q_rows = (heads[:, None] * a.head_dim + torch.arange(a.head_dim)).flatten()
        kv_rows = (groups[:, None] * a.head_dim + torch.arange(a.head_dim)).flatten()
        module = model.get_submodule(a.name)
        suffix = a.o_name.rsplit(".", 1)[1][len(adapter.attn_proj[3]):]
        qn, kn, vn, on = (p + suffix for p in adapter.attn_proj)
        _set(module, qn, _slice_linear(a.q, q_rows, 0))
        _set(module, kn, _slice_linear(a.k, kv_rows, 0))
        _set(module, vn, _slice_linear(a.v, kv_rows, 0))
        _set(module, on, _slice_linear(a.o, q_rows, 1))
        for attr, value in (("num_heads", len(heads)), ("num_key_value_heads", len(groups)),
                            ("num_kv_heads", len(groups))):
            if hasattr(module, attr):
                setattr(module, attr, value)
        kept[a.name] = groups.tolist()
    if attns:
        n_heads, n_kv = adapter.heads
        per = attns[0].num_heads // attns[0].num_kv_heads
        model.config.head_dim = attns[0].head_dim  # no longer hidden_size // heads
        setattr(model.config, n_kv, attns[0].num_kv_heads - n_drop)
        setattr(model.config, n_heads, (attns[0].num_kv_heads - n_drop) * per)
    return kept


def drop_layers(model: nn.Module, adapter: Adapter, drop: list[int]) -> list[int]:
    """Delete decoder blocks `drop`; returns the original indices of the blocks kept."""
    layers = adapter.decoder_layers(model)
    bad = [i for i in drop if not 0 <= i < len(layers)]
    if bad or len(set(drop)) >= len(layers):
        raise ValueError(f"cannot drop layers {drop} of a {len(layers)}-layer model")
    keep = [i for i in range(len(layers)) if i not in set(drop)]
    new = nn.ModuleList(layers[i] for i in keep)
    for new_idx, layer in enumerate(new):
        for sub in layer.modules():
            if hasattr(sub, "layer_idx"):
                sub.layer_idx = new_idx
    parent_name, _, attr = adapter.layers.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
    config = model.config
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in keep]
    config.num_hidden_layers = len(keep)
    return keep


def least_important(importance: torch.Tensor, k: int, protect: tuple[int, ...] = ()) -> list[int]:
    """Indices of the k smallest entries, never those in `protect` (e.g. the first layer)."""
    order = [i for i in torch.argsort(importance.double()).tolist() if i not in protect]
    return sorted(order[:k])
