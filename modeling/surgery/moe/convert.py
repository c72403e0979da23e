"""Dense → MoE conversion of any adapter-described MLP (Slim & Sparse §4.2, Eq. 8–9), in place.

    partition = convert_to_moe(model, adapter, {"model.layers.1.mlp": scores, ...}, num_experts=64,
                               num_shared=8, top_k=24, dense_tasks=("und",))
    freeze_experts(model, True)     # Expert-Frozen Tuning: experts frozen, routers and the rest train

Each chosen MLP becomes a `MoEMLP` whose experts are slices of its dense weights
(`partition_neurons`), so with every expert active the model is the dense one. `dense_tasks`:
tasks whose tokens run the MoE dense (every expert, gate 1) — the paper's understanding path when
one MLP serves both tasks; the task comes from the model's task scope (`surgery.scope`). The op is
recorded (`moe`) so the checkpoint reloads through `load_model`.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from unislim.modeling.adapters import Adapter

from ..record import default_task, record, register
from ..scope import scope_of
from .mlp import MoEMLP
from .partition import partition_neurons


class _TaskDense:
    """Forward pre-hook: run an MoE MLP dense (gate 1) for tokens of `dense_tasks`; with `frozen`,
    on detached experts (understanding stays frozen while generation trains the sparse path)."""

    def __init__(self, model: nn.Module, dense_tasks: Iterable[str], frozen: bool):
        self.scope, self.default = scope_of(model), default_task(model)
        self.dense_tasks, self.frozen = frozenset(dense_tasks), frozen

    def __call__(self, module: MoEMLP, args) -> None:
        dense = (self.scope.task or self.default) in self.dense_tasks
        module.run_dense, module.freeze_dense = dense, dense and self.frozen


def _moe_from_spec(spec: dict, op: dict, act: nn.Module, device, dtype) -> MoEMLP:
    with torch.device(device):
        moe = MoEMLP(spec["hidden"], spec["width"], op["num_experts"], op["num_shared"], op["top_k"],
                     impl=op["impl"], hidden_act=act, gated=spec["gated"], up_bias=spec["up_bias"],
                     down_bias=spec["down_bias"], gate_bias=spec["gate_bias"])
    return moe.to(dtype)


def _attach(model: nn.Module, name: str, moe: MoEMLP, op: dict) -> None:
    model.set_submodule(name, moe)
    moe.dense_tasks = frozenset(op.get("dense_tasks", ()))  # read by active_parameters
    if op.get("dense_tasks"):
        moe.register_forward_pre_hook(_TaskDense(model, op["dense_tasks"], op.get("frozen_dense", False)))


def convert_to_moe(model: nn.Module, adapter: Adapter, neuron_scores: dict[str, torch.Tensor], *,
                   num_experts: int, num_shared: int, top_k: int, component: str = "gen",
                   layers: list[int] | None = None, impl: str = "auto", aux_loss_coef: float = 0.01,
                   dense_tasks: Iterable[str] = (), frozen_dense: bool = False) -> dict[str, list[list[int]]]:
    """Replace the `component` MLPs of `layers` (default: every layer but the first and last) by MoE
    MLPs split by `partition_neurons` over `neuron_scores` (MLP name, or `<name>.neuron`, → (ff,)
    cumulative score, Eq. 8). Returns `{mlp name: [[neuron indices of expert e], ...]}`, experts
    0..num_shared-1 shared."""
    mlps = adapter.mlps(model, component)
    n_layers = len(adapter.decoder_layers(model))
    layers = list(range(1, n_layers - 1)) if layers is None else list(layers)
    chosen = [m for m in mlps if m.layer in layers]
    missing = sorted(set(layers) - {m.layer for m in chosen})
    if missing:
        raise ValueError(f"partition.layers: {missing} have no dense {component} MLP in this {n_layers}-layer model "
                         f"(have {[m.layer for m in mlps]})")
    if not adapter.mlp[component]:
        raise ValueError("partition: the adapter's MLP is the decoder layer itself (model.adapter.mlp: ''); "
                         "dense → MoE needs the MLP as one module to replace")
    op = {"op": "moe", "mlps": {}, "num_experts": num_experts, "num_shared": num_shared, "top_k": top_k,
          "impl": impl, "aux_loss_coef": aux_loss_coef, "dense_tasks": sorted(dense_tasks),
          "frozen_dense": frozen_dense, "act": adapter.mlp_act}
    partition: dict[str, list[list[int]]] = {}
    for mlp in chosen:
        scores = neuron_scores.get(mlp.name, neuron_scores.get(f"{mlp.name}.neuron"))
        if scores is None:
            raise KeyError(f"no neuron scores for {mlp.name} (have {sorted(neuron_scores)[:8]}...)")
        dense = model.get_submodule(mlp.name)
        act = getattr(dense, adapter.mlp_act, None)
        if act is None:
            raise ValueError(f"model.adapter.mlp_act: {mlp.name} has no activation attribute {adapter.mlp_act!r}")
        spec = {"hidden": mlp.down.out_features, "width": mlp.width, "gated": mlp.gated,
                "up_bias": mlp.up.bias is not None, "down_bias": mlp.down.bias is not None,
                "gate_bias": mlp.gated and mlp.gate.bias is not None}
        parts = partition_neurons(scores, num_experts, num_shared)
        weight = mlp.down.weight
        moe = _moe_from_spec(spec, op, act, weight.device, weight.dtype)
        moe.load_dense(mlp.gate.weight if mlp.gated else None, mlp.up.weight, mlp.down.weight, parts,
                       up_bias=mlp.up.bias, down_bias=mlp.down.bias, gate_bias=mlp.gate.bias if mlp.gated else None)
        moe.train(dense.training)
        _attach(model, mlp.name, moe, op)
        op["mlps"][mlp.name] = spec
        partition[mlp.name] = [p.tolist() for p in parts]
    record(model, op)
    return partition


@register("moe")
def _build_moe(model: nn.Module, op: dict) -> None:
    for name, spec in op["mlps"].items():
        dense = model.get_submodule(name)
        ref = next(dense.parameters())
        _attach(model, name, _moe_from_spec(spec, op, getattr(dense, op["act"]), ref.device, ref.dtype), op)


def moe_mlps(model: nn.Module) -> dict[str, MoEMLP]:
    """Qualified name → MoEMLP."""
    return {n: m for n, m in model.named_modules() if isinstance(m, MoEMLP)}


def freeze_experts(model: nn.Module, frozen: bool) -> int:
    """Expert-Frozen Tuning: `requires_grad = not frozen` on every expert weight (shared and routed;
    routers and everything else untouched). Returns the parameters now frozen (0 when unfreezing)."""
    count = 0
    from ..params import expert_parameters

    for m in moe_mlps(model).values():
        for w in expert_parameters(m):
            w.requires_grad_(not frozen)
            count += w.numel()
    return count if frozen else 0


def moe_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """`aux_loss_coef` × the mean load-balancing loss of the last training forward's MoE MLPs."""
    ops = [op for op in (getattr(model.config, "unislim", None) or {}).get("surgery", []) if op["op"] == "moe"]
    aux = [m.aux_loss for m in moe_mlps(model).values() if m.aux_loss is not None]
    if not aux or not ops:
        return None
    return ops[-1]["aux_loss_coef"] * torch.stack(aux).mean()
