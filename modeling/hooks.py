"""Forward hooks through one helper that records every handle and always removes them.

    with HookSet(model) as hooks:
        hooks.pre("model.layers.0.mlp.down_proj", fn)      # fn(name, module, args, kwargs)
        hooks.post("model.layers.0.self_attn", fn)         # fn(name, module, args, kwargs, output)
        model(**batch)
    # every handle is removed here, even on an exception; with `require_data=True` (the default)
    # leaving the block raises if a hooked module never ran, naming it

Modules are addressed by qualified name (`model.layers.3.mlp`), never by object, because the
statistics they collect cross process boundaries keyed by those names.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable

from torch import nn


class HookError(RuntimeError):
    """A hooked module saw no data (wrong name, skipped layer, empty calibration set)."""


class HookSet:
    def __init__(self, model: nn.Module, require_data: bool = True):
        self.model = model
        self.require_data = require_data
        self.calls: Counter[str] = Counter()
        self._handles: list[Any] = []
        self._names: list[str] = []

    def _module(self, name: str) -> nn.Module:
        try:
            return self.model.get_submodule(name)
        except AttributeError:
            raise HookError(f"no module named {name!r} in {type(self.model).__name__}") from None

    def pre(self, name: str, fn: Callable[..., Any]) -> None:
        def hook(module, args, kwargs):
            self.calls[name] += 1
            fn(name, module, args, kwargs)

        self._handles.append(self._module(name).register_forward_pre_hook(hook, with_kwargs=True))
        self._names.append(name)

    def post(self, name: str, fn: Callable[..., Any]) -> None:
        def hook(module, args, kwargs, output):
            self.calls[name] += 1
            fn(name, module, args, kwargs, output)

        self._handles.append(self._module(name).register_forward_hook(hook, with_kwargs=True))
        self._names.append(name)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> HookSet:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.remove()
        if exc_type is None and self.require_data:
            silent = sorted({n for n in self._names if self.calls[n] == 0})
            if silent:
                raise HookError(f"hooked module(s) saw no data: {silent}")
