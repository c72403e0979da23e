"""Physical, training-free pruning of any adapter-described model: smaller matrices, not masks.

- `keep_neurons`: keep each MLP's highest-scoring neurons (rows of gate and up, columns of down;
  an ungated MLP has no gate), in their original order. The same fraction in every MLP, or
  per-layer widths (`global_widths`: one threshold over every MLP's scores). The widths are recorded
  (`mlp_widths` op) so the checkpoint reloads through `load_model` whatever they are; where every MLP
  ends up equally wide, the config's `intermediate_size` says so too and a stock `from_pretrained`
  reloads it.
- `drop_kv_groups`: remove whole GQA groups (a KV head and the query heads that read it), the same
  number per layer, updating the head counts and pinning `head_dim` in the (sub-)config.
- `drop_layers`: delete decoder blocks, renumbering the rest (config `num_hidden_layers`,
  `layer_types`, recorded ops).
Modules are replaced by qualified name through their parent (`nn.Module.set_submodule`), so dotted
projection names (`intermediate.dense`) replace the right module and nothing else.
"""

from __future__ import annotations

import torch
from torch import nn

from unislim.modeling.adapters import Adapter

from .record import record, register, renumber_layers


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


def top_indices(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """The `keep` highest-scoring indices, in ascending order (ties broken by index)."""
    order = torch.sort(scores.double(), descending=True, stable=True).indices[:keep]
    return torch.sort(order).values


def global_widths(scores: dict[str, torch.Tensor], keep: float, min_width: int = 1) -> dict[str, int]:
    """Per-MLP widths from one threshold over every MLP's neuron scores, each normalised by its
    layer's mean (so no layer's scale decides alone): keeps `keep` of all neurons in total."""
    normed = {name: s.double() / s.double().mean().clamp(min=1e-30) for name, s in scores.items()}
    flat = torch.cat(list(normed.values()))
    k = max(len(normed) * min_width, round(keep * flat.numel()))
    threshold = torch.sort(flat, descending=True, stable=True).values[k - 1]
    return {name: max(min_width, int((s >= threshold).sum())) for name, s in normed.items()}


def keep_neurons(model: nn.Module, adapter: Adapter, component: str, scores: dict[str, torch.Tensor],
                 keep: float | None = None, widths: dict[str, int] | None = None) -> dict[str, list[int]]:
    """Keep the top `keep` fraction of every MLP of `component` (or `widths[name]` neurons each);
    returns the kept indices per MLP and records the widths."""
    if (keep is None) == (widths is None):
        raise ValueError("give exactly one of keep (a fraction) or widths (per MLP)")
    if keep is not None and not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    kept: dict[str, list[int]] = {}
    for mlp in adapter.mlps(model, component):
        if f"{mlp.name}.neuron" not in scores:
            raise ValueError(f"no neuron scores for {mlp.name}: the calibration task never ran through it (in a "
                             "mixture-of-transformers model a task scores only the copies its tokens use)")
        k = max(1, round(keep * mlp.width)) if keep is not None else widths.get(mlp.name, mlp.width)
        index = top_indices(scores[f"{mlp.name}.neuron"], k)
        g, u, d = mlp.proj_names
        if mlp.gated:
            model.set_submodule(f"{mlp.name}.{g}", _slice_linear(mlp.gate, index, 0))
        model.set_submodule(f"{mlp.name}.{u}", _slice_linear(mlp.up, index, 0))
        model.set_submodule(f"{mlp.name}.{d}", _slice_linear(mlp.down, index, 1))
        module = model.get_submodule(mlp.name)
        if hasattr(module, "intermediate_size"):
            module.intermediate_size = k
        kept[mlp.name] = index.tolist()
    if kept:
        _record_widths(model, adapter, {name: len(v) for name, v in kept.items()}, mlp.proj_names)
    return kept


def _record_widths(model: nn.Module, adapter: Adapter, widths: dict[str, int], proj) -> None:
    record(model, {"op": "mlp_widths", "widths": widths, "proj": list(proj)})
    every = {m.width for c in ("und", "gen") for m in adapter.mlps(model, c)}
    key = adapter.heads.get("intermediate_size")
    if len(every) == 1 and key and hasattr(adapter.sizes(model), key):
        setattr(adapter.sizes(model), key, every.pop())  # uniform: the stock config describes it


@register("mlp_widths")
def _build_widths(model: nn.Module, op: dict) -> None:
    """Give the recorded MLPs their pruned widths (empty weights, filled by from_pretrained)."""
    g, u, d = op["proj"]
    for name, width in op["widths"].items():
        mlp = model.get_submodule(name)
        for proj, dim in ((g, 0), (u, 0), (d, 1)):
            if proj is None:
                continue
            old = mlp.get_submodule(proj)
            shape = [old.out_features, old.in_features]
            if shape[dim] == width:
                continue
            shape[dim] = width
            bias = old.bias is not None
            model.set_submodule(f"{name}.{proj}", nn.Linear(shape[1], shape[0], bias=bias, device=old.weight.device,
                                                            dtype=old.weight.dtype))
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = width


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
        qn, kn, vn, on = a.proj_names
        model.set_submodule(f"{a.name}.{qn}", _slice_linear(a.q, q_rows, 0))
        model.set_submodule(f"{a.name}.{kn}", _slice_linear(a.k, kv_rows, 0))
        model.set_submodule(f"{a.name}.{vn}", _slice_linear(a.v, kv_rows, 0))
        model.set_submodule(f"{a.name}.{on}", _slice_linear(a.o, q_rows, 1))
        module = model.get_submodule(a.name)
        for attr, value in (("num_heads", len(heads)), ("num_key_value_heads", len(groups)),
                            ("num_kv_heads", len(groups))):
            if hasattr(module, attr):
                setattr(module, attr, value)
        kept[a.name] = groups.tolist()
    if attns:
        sizes, names = adapter.sizes(model), adapter.heads
        per = attns[0].num_heads // attns[0].num_kv_heads
        setattr(sizes, names["head_dim"], attns[0].head_dim)  # no longer hidden_size // heads
        setattr(sizes, names["num_kv_heads"], attns[0].num_kv_heads - n_drop)
        setattr(sizes, names["num_heads"], (attns[0].num_kv_heads - n_drop) * per)
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
    model.set_submodule(adapter.layers, new)
    sizes = adapter.sizes(model)
    if getattr(sizes, "layer_types", None):
        sizes.layer_types = [sizes.layer_types[i] for i in keep]
    setattr(sizes, adapter.heads["num_layers"], len(keep))
    renumber_layers(model, adapter.layers, keep)
    return keep


def least_important(importance: torch.Tensor, k: int, protect: tuple[int, ...] = ()) -> list[int]:
    """Indices of the k smallest entries, never those in `protect` (e.g. the first layer)."""
    order = [i for i in torch.argsort(importance.double(), stable=True).tolist() if i not in protect]
    return sorted(order[:k])
