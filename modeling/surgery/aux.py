"""Auxiliary training losses that surgery adds: MoE load balancing and MoD predictor BCE.

The one training loop calls `reset(model)` before a forward and adds `total(model)` to the family's
task loss after it; both are no-ops on a model without such surgery.
"""

from __future__ import annotations

import torch
from torch import nn

from .mod.layer import mod_aux_loss
from .moe.convert import moe_aux_loss, moe_mlps


def reset(model: nn.Module) -> None:
    for m in moe_mlps(model).values():
        m.aux_loss = None
    state = model.__dict__.get("unislim_route_state")
    if state is not None:
        state.aux_losses = []


def parts(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weighted auxiliary losses of the last forward, by name (`moe_aux_loss`, `mod_aux_loss`)."""
    out = {}
    for name, value in (("moe_aux_loss", moe_aux_loss(model)), ("mod_aux_loss", mod_aux_loss(model))):
        if value is not None:
            out[name] = value
    return out


def total(model: nn.Module) -> torch.Tensor | None:
    values = list(parts(model).values())
    return sum(values) if values else None
