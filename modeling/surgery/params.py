"""Parameters one token of a task passes through, for any model with or without surgery."""

from __future__ import annotations

from typing import Callable

from torch import nn

from .moe.convert import moe_mlps


def expert_parameters(moe) -> list[nn.Parameter]:
    """The stacked (E, ...) expert weights of an MoE MLP (what Expert-Frozen Tuning freezes)."""
    if hasattr(moe, "expert_parameters"):
        return list(moe.expert_parameters())
    return [w for w in (getattr(moe, "w_gate", None), moe.w_up, moe.w_down) if w is not None]


def active_parameters(model: nn.Module, task: str, unused: Callable[[str], bool] | None = None) -> int:
    """All parameters, less those `unused(name)` says a token of `task` never touches (a family's
    other-modality copies and heads), less, in each MoE MLP, the routed experts a token of `task`
    skips (sparse: all but top-k; a task it runs dense uses every expert but not the router)."""
    unused = unused or (lambda name: False)
    total = sum(p.numel() for n, p in model.named_parameters() if not unused(n))
    for name, m in moe_mlps(model).items():
        if unused(f"{name}.w_up"):
            continue
        if task in getattr(m, "dense_tasks", ()):
            total -= m.router.weight.numel()
        else:
            stacked = [getattr(m, n, None) for n in ("w_gate", "w_up", "w_down", "b_gate", "b_up")]  # (E, ...)
            per_expert = sum(w.numel() // m.num_experts for w in stacked if w is not None)
            total -= (m.num_routed - m.top_k) * per_expert
    return total
