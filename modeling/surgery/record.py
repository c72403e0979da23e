"""Surgery is recorded in the checkpoint's own config and re-applied when it loads.

`config.unislim` (a plain dict, saved in `config.json` by `save_pretrained`) holds:
- `family`: the model family that made the checkpoint;
- `adapter`: the adapter the surgery was recorded against (so a reload finds the same modules);
- `default_task`: the task surgery assumes when no task scope is set (a causal LM's `text`);
- `surgery`: the structural operations, in order, e.g.
  `{"op": "mlp_widths", "widths": {"model.layers.3.mlp": 40}, "proj": ["gate_proj", "up_proj", "down_proj"]}`.

Each op type has a *builder* (`register`) that gives a freshly constructed model the op's
structure — modules of the recorded shapes, empty — so `from_pretrained` then fills every weight
from the checkpoint exactly (`modeling.loading`). A surgery that only edits config sizes that the
stock class reads (uniform widths, KV heads, layer count) needs no op: a stock `from_pretrained`
reloads it.
"""

from __future__ import annotations

import copy
import re
from typing import Any, Callable

from torch import nn

KEY = "unislim"
BUILDERS: dict[str, Callable[[nn.Module, dict[str, Any]], None]] = {}


def register(op: str):
    """Decorator: `@register("moe") def build(model, op): ...` rebuilds op's structure on load."""

    def wrap(fn):
        BUILDERS[op] = fn
        return fn

    return wrap


def info(config) -> dict[str, Any]:
    """`config.unislim` (created empty on first use)."""
    data = getattr(config, KEY, None)
    if not isinstance(data, dict):
        data = {}
        setattr(config, KEY, data)
    return data


def ops(config) -> list[dict[str, Any]]:
    return list((getattr(config, KEY, None) or {}).get("surgery", []))


def record(model: nn.Module, op: dict[str, Any]) -> None:
    """Append `op` to the model's recorded surgery (call after applying it in memory)."""
    if op["op"] not in BUILDERS:
        raise KeyError(f"surgery op {op['op']!r} has no builder (known: {sorted(BUILDERS)})")
    info(model.config).setdefault("surgery", []).append(copy.deepcopy(op))


def stamp(model: nn.Module, *, family: str, adapter, default_task: str | None = None) -> None:
    """Record which family and adapter the checkpoint's surgery refers to."""
    data = info(model.config)
    data["family"] = family
    data["adapter"] = adapter.to_dict()
    if default_task is not None:
        data.setdefault("default_task", default_task)


def default_task(model: nn.Module) -> str | None:
    return (getattr(model.config, KEY, None) or {}).get("default_task")


def rebuild(model: nn.Module) -> None:
    """Apply every recorded op's structure to a freshly constructed model (weights come after)."""
    _load_builders()
    for op in ops(model.config):
        if op["op"] not in BUILDERS:
            raise ValueError(f"{type(model).__name__}: the checkpoint records surgery {op['op']!r}, which this "
                             f"version of unislim cannot rebuild (known: {sorted(BUILDERS)})")
        BUILDERS[op["op"]](model, op)


def renumber_layers(model: nn.Module, layers_path: str, keep: list[int]) -> None:
    """After deleting decoder layers, rewrite the module names in recorded ops (`<layers>.<i>...`,
    as dict keys or list items) to the new numbering and drop those of deleted layers, so a reload
    rebuilds the same structure. Ops therefore name modules, never bare layer indices."""
    new_index = {old: new for new, old in enumerate(keep)}
    pattern = re.compile(rf"^{re.escape(layers_path)}\.(\d+)(\.|$)")

    def rename(name: str) -> str | None:
        m = pattern.match(name)
        if m is None:
            return name
        old = int(m.group(1))
        if old not in new_index:
            return None
        return f"{layers_path}.{new_index[old]}{m.group(2)}{name[m.end():]}"

    def walk(value):
        if isinstance(value, dict):
            out = {}
            for k, v in value.items():
                k2 = rename(k) if isinstance(k, str) else k
                if k2 is not None:
                    out[k2] = walk(v)
            return out
        if isinstance(value, list):
            items = [rename(v) if isinstance(v, str) else walk(v) for v in value]
            return [v for v in items if v is not None]
        return value

    data = info(model.config)
    data["surgery"] = [walk(op) for op in data.get("surgery", [])]


def _load_builders() -> None:
    from . import prune  # noqa: F401  (each module registers its builders when imported)
    from .mod import layer  # noqa: F401
    from .moe import convert  # noqa: F401
