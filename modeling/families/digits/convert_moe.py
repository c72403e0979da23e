"""Dense -> MoE conversion (Slim & Sparse §4.2) and Expert-Frozen Tuning's freezing switch.

    moe, partition = convert_to_moe(dense, {"model.layers.1.mlp": scores, ...}, num_experts=64,
                                    num_shared=8, top_k=24)
    freeze_experts(moe, True)     # phase 1: experts frozen, router and the rest train
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from unislim.modeling.hooks import HookSet
from .modeling_unidigits import GEN_SUFFIX, UniDigitsModel
from .configuration_unidigits_moe import UniDigitsMoEConfig
from unislim.modeling.surgery.moe.mlp import MoEMLP
from .modeling_unidigits_moe import UniDigitsMoEModel
from unislim.modeling.surgery.moe.partition import partition_neurons

_NOT_COPIED = ("model_type", "architectures", "transformers_version", "auto_map", "moe")


def convert_to_moe(model: UniDigitsModel, neuron_scores: dict[str, torch.Tensor], *, layers: list[int] | None = None,
                   num_experts: int, num_shared: int, top_k: int, component: str = "gen", impl: str = "auto",
                   aux_loss_coef: float = 0.01, und_frozen: bool = False,
                   calibrate: Callable[[UniDigitsModel], object] | None = None) -> tuple[UniDigitsMoEModel, dict]:
    """A `UniDigitsMoEModel` with `model`'s weights whose generation MLPs in `layers` (default: every
    layer but the first and last) are split into experts by `partition_neurons`.

    neuron_scores: MLP qualified name (`model.layers.2.mlp_moe_gen`; `<name>.neuron`, the key of
    the score files, is accepted too) -> (ff,) cumulative score over tasks (Eq. 8). Returns the
    model (same device, dtype and train/eval mode) and the partition
    `{mlp name: [[neuron indices of expert 0], ...]}`, experts 0..num_shared-1 shared.

    Routers start from the weight estimate `MoEMLP.init_router`. With `calibrate` (a function that
    runs calibration forwards through the dense model it is given, e.g. generation prompts through
    `generate_images`), each router is instead fitted by least squares to its experts' output
    norms on the inputs that MLP saw (`MoEMLP.fit_router`).
    """
    if type(model) is not UniDigitsModel:
        raise TypeError(f"convert_to_moe converts a dense UniDigitsModel, got {type(model).__name__}")
    moe = {"layers": layers, "component": component, "num_experts": num_experts, "num_shared": num_shared,
           "top_k": top_k, "aux_loss_coef": aux_loss_coef, "impl": impl, "und_frozen": und_frozen}
    fields = {k: v for k, v in model.config.to_dict().items() if k not in _NOT_COPIED}
    config = UniDigitsMoEConfig.from_dict({**fields, "moe": moe})  # validates moe, naming the bad key
    ref = next(model.parameters())
    with torch.device(ref.device):
        new = UniDigitsMoEModel(config).to(ref.dtype)
    mlp_attr = "mlp" + (GEN_SUFFIX if config.variant == "mot" else "")
    names = [f"model.layers.{i}.{mlp_attr}" for i in config.moe["layers"]]

    keep = new.state_dict().keys()  # every weight but the replaced MLPs'
    missing, _ = new.load_state_dict({k: v for k, v in model.state_dict().items() if k in keep}, strict=False)
    assert all(k.rsplit(".", 1)[0] in names or k.rsplit(".", 2)[0] in names for k in missing), missing

    partition: dict[str, list[list[int]]] = {}
    for name in names:
        scores = neuron_scores.get(name, neuron_scores.get(f"{name}.neuron"))
        if scores is None:
            raise KeyError(f"no neuron scores for {name} (have {sorted(neuron_scores)[:8]}...)")
        dense = model.get_submodule(name)
        parts = partition_neurons(scores, num_experts, num_shared)
        new.get_submodule(name).load_dense(dense.gate_proj.weight, dense.up_proj.weight, dense.down_proj.weight, parts)
        partition[name] = [p.tolist() for p in parts]
    if calibrate is not None:
        _fit_routers(model, new, names, calibrate)
    return new.train(model.training), partition


def _fit_routers(dense: UniDigitsModel, moe: UniDigitsMoEModel, names: list[str], calibrate: Callable) -> None:
    stats: dict[str, dict[str, torch.Tensor]] = {}

    def record(name, module, args, kwargs):
        s = moe.get_submodule(name).router_stats(args[0])
        stats[name] = {k: stats[name][k] + v for k, v in s.items()} if name in stats else s

    with HookSet(dense) as hooks, torch.no_grad():
        for name in names:
            hooks.pre(name, record)
        calibrate(dense)
    for name in names:
        moe.get_submodule(name).fit_router(stats[name])


def freeze_experts(model: torch.nn.Module, frozen: bool) -> int:
    """Expert-Frozen Tuning: sets `requires_grad = not frozen` on every expert weight (shared and
    routed; routers and all other parameters untouched). Returns the number of parameters now
    frozen by it (0 when unfreezing)."""
    count = 0
    for m in model.modules():
        if isinstance(m, MoEMLP):
            for w in (m.w_gate, m.w_up, m.w_down):
                w.requires_grad_(not frozen)
                count += w.numel()
    return count if frozen else 0
