"""Which task the tokens now running through a model belong to: one small object per model.

Surgery that behaves per task (an MoE MLP that stays dense for understanding, Mixture-of-Depths
routers per task, layers skipped for one task) reads it; family code that knows the task sets it
around a forward:

    with task_scope(model, "gen", token_mask=keys):   # (B, T) bool, True = a real token
        model.gen_velocity(...)

The scope is a plain attribute of the root model (`model.unislim_scope`), shared by reference with
every surgery module, so nothing is threaded through `forward` signatures that HF models own. With
no scope set, surgery uses its `default_task` (a causal LM's only task, `text`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

ATTR = "unislim_scope"


@dataclass
class Scope:
    task: str | None = None
    token_mask: torch.Tensor | None = None  # (B, T) bool: real tokens of the current sequence
    forced: torch.Tensor | None = None  # (B, T) bool: tokens routing may never skip


def scope_of(model: nn.Module) -> Scope:
    """The model's scope object, created on first use (through a DDP / DeepSpeed wrapper's `.module`)."""
    while list(model._modules) == ["module"]:  # DistributedDataParallel, DeepSpeedEngine
        model = model.module
    scope = model.__dict__.get(ATTR)
    if scope is None:
        scope = Scope()
        model.__dict__[ATTR] = scope  # a plain attribute: not a module, not in the state dict
    return scope


@contextmanager
def task_scope(model: nn.Module, task: str, token_mask: torch.Tensor | None = None,
               forced: torch.Tensor | None = None) -> Iterator[Scope]:
    """Set the task (and its token masks) for the duration of a call; nested scopes restore."""
    scope = scope_of(model)
    saved = (scope.task, scope.token_mask, scope.forced)
    scope.task, scope.token_mask, scope.forced = task, token_mask, forced
    try:
        yield scope
    finally:
        scope.task, scope.token_mask, scope.forced = saved
