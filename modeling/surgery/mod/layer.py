"""Per-task Mixture-of-Depths routers (UniMoD, arXiv 2502.06474) and per-task layer skipping,
around any decoder layer called Llama-style: `layer(hidden_states, attention_mask=..., position_embeddings=(cos, sin), ...)`.

    add_mod(model, adapter, capacity={"und": {2: 0.5}, "gen": {1: 0.7, 2: 0.4}}, routing="task")
    skip_layers(model, adapter, task="gen", layers=[2])      # gen tokens run past layer 2

The layer keeps its class, weights and names: its class is swapped for a subclass whose `forward`
first asks the model's task scope which task is running (`surgery.scope`; none set: the model's
`default_task`), then
- skips the layer for that task, or
- routes: a d→1 router per task (or one `shared` router: the task-agnostic baseline) picks
  ceil(c·T) tokens of each sample (top-k in training; the auxiliary predictor's per-token decision
  at inference for causal tasks, MoD §3.5); only they are gathered — hidden states, RoPE cos/sin,
  the attention mask among them, any other per-token argument — and run; `x + r·(f(x) − x)` is
  scattered back (MoD Eq. 1), so the other tokens' compute really is skipped;
- or runs dense (capacity 1 for the task; or a KV cache in use for a task routed by top-k, which
  needs the whole sequence at once).
**Cached decoding of a causal task** (its predictor decides per token, at inference) routes as the
uncached forward does, token by token: a token the predictor rejects is no query and no key of
this layer — its keys and values are still written to the cache (so every layer's cache stays
aligned with the attention mask), but a per-layer key history kept on the cache object
(`cache.unislim_mod_keys[layer]`, (B, cached tokens) bool) hides them from every later token.
A step whose tokens all skip the layer writes only their K/V (`surgery.kv.write_kv`) and returns its
input. So decoding with a cache gives what decoding without one gives (tests/families).
Routers (`mod_routers.<name>`) and predictors (`mod_predictors.<name>`) are submodules of the layer.
Both ops are recorded (`mod`, `skip_layers`), so the checkpoint reloads through `load_model`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from unislim.modeling.adapters import Adapter

from ..kv import layer_cache, write_kv, writes_kv_alone
from ..record import default_task, record, register
from ..scope import Scope, scope_of
from . import routing


@dataclass
class RoutingRecord:
    """Tokens each layer processed, per task: `processed[(task, layer)]`, `total[(task, layer)]`
    (token counts) and `keep[(task, layer, T)]` ((T,) how often each position was processed)."""

    processed: dict = field(default_factory=dict)
    total: dict = field(default_factory=dict)
    keep: dict = field(default_factory=dict)
    samples: dict = field(default_factory=dict)

    def add(self, task: str, layer: int, kept: torch.Tensor) -> None:  # kept (B, T) bool
        B, T = kept.shape
        for store, key, value in ((self.processed, (task, layer), int(kept.sum())), (self.total, (task, layer), B * T),
                                  (self.samples, (task, layer, T), B)):
            store[key] = store.get(key, 0) + value
        key = (task, layer, T)
        self.keep[key] = self.keep.get(key, 0) + kept.sum(0).double().cpu()

    def keep_fraction(self) -> dict[str, float]:
        """`{task}/layer{l}` → processed / all tokens."""
        return {f"{t}/layer{l}": self.processed[(t, l)] / self.total[(t, l)] for t, l in sorted(self.processed)}


class RouteState:
    """Shared by every routed layer of one model (a plain object, not a module)."""

    def __init__(self, scope: Scope, default: str | None):
        self.scope, self.default = scope, default
        self.record: RoutingRecord | None = None
        self.aux_losses: list[torch.Tensor] = []
        self.dense = False  # every layer processes every token (router fitting)
        self.observe = None  # fn(layer, task, x, y) after a dense run (router fitting)

    @property
    def task(self) -> str | None:
        return self.scope.task or self.default


@dataclass
class RouteSpec:
    """What one layer does per task."""

    index: int
    capacity: dict[str, float] = field(default_factory=dict)  # task -> fraction of tokens processed
    skip: set[str] = field(default_factory=set)  # tasks that run past this layer
    routing: str = "task"  # task | shared
    causal: set[str] = field(default_factory=set)  # tasks decided per token at inference (predictor)
    keep_last: dict[str, int] = field(default_factory=dict)  # task -> last N tokens never skipped

    def router_name(self, task: str) -> str:
        return task if self.routing == "task" else "shared"


def _state(model: nn.Module) -> RouteState:
    state = model.__dict__.get("unislim_route_state")
    if state is None:
        state = RouteState(scope_of(model), default_task(model))
        model.__dict__["unislim_route_state"] = state
    return state


def route_state(model: nn.Module) -> RouteState:
    return _state(model)


def _gather_kwargs(kwargs: dict[str, Any], order: torch.Tensor, valid: torch.Tensor, B: int, T: int) -> dict:
    """The layer's keyword arguments restricted to the selected tokens (B, n)."""
    out = {}
    for key, value in kwargs.items():
        if key == "attention_mask":
            out[key] = _gather_attention_mask(value, order, valid)
        elif key == "position_embeddings" and isinstance(value, (tuple, list)):
            out[key] = tuple(routing.gather_tokens(v.expand(B, *v.shape[1:]), order) for v in value)
        elif torch.is_tensor(value) and value.dim() >= 2 and value.shape[1] == T and value.shape[0] in (1, B):
            out[key] = routing.gather_tokens(value.expand(B, *value.shape[1:]), order)  # position_ids, gen_mask
        else:
            out[key] = value
    return out


def _gather_attention_mask(mask: torch.Tensor | None, order: torch.Tensor, valid: torch.Tensor):
    if mask is None:  # causal without padding: causal among the kept tokens (kept in sequence order)
        if bool(valid.all()):
            return None
        n = order.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=order.device).tril()
        return ((causal & valid[:, None, :]) | torch.eye(n, dtype=torch.bool, device=order.device))[:, None]
    if mask.dim() == 4:
        if mask.dtype == torch.bool:
            return routing.gather_mask(mask.expand(order.shape[0], *mask.shape[1:]), order, valid)
        allowed = routing.gather_mask(mask.expand(order.shape[0], *mask.shape[1:]) == 0, order, valid)
        return torch.zeros(allowed.shape, dtype=mask.dtype, device=mask.device).masked_fill(
            ~allowed, torch.finfo(mask.dtype).min)
    if mask.dim() == 2:
        return mask.gather(1, order) & valid
    raise ValueError(f"mod: cannot restrict a {mask.dim()}-D attention mask to the routed tokens")


class RoutedLayer:
    """Mixin for the swapped class (see module docstring)."""

    unislim_route: RouteSpec
    unislim_state: RouteState

    def forward(self, hidden_states, *args, **kwargs):
        spec, state = self.unislim_route, self.unislim_state
        task = state.task
        if task in spec.skip:
            return hidden_states
        capacity = spec.capacity.get(task, 1.0)
        routed = capacity < 1.0 and not state.dense
        if routed and layer_cache(kwargs) is not None:
            name = spec.router_name(task)
            if task in spec.causal and name in self.mod_predictors and not self.training:
                return self._cached_causal_forward(hidden_states, task, name, kwargs)
            routed = False  # top-k needs the whole sequence: decoding with a cache runs dense
        if routed and args:
            raise TypeError(f"mod: layer {spec.index} was called with positional arguments besides the hidden "
                            "states; routing needs them by keyword (attention_mask=, position_embeddings=, ...)")
        if not routed:
            out = super().forward(hidden_states, *args, **kwargs)
            if state.observe is not None and task is not None:
                state.observe(self, task, hidden_states, out[0] if isinstance(out, tuple) else out)
            if state.record is not None and task is not None:
                state.record.add(task, spec.index, torch.ones(hidden_states.shape[:2], dtype=torch.bool,
                                                              device=hidden_states.device))
            return out
        return self._routed_forward(hidden_states, task, capacity, kwargs)

    def _routed_forward(self, hidden, task: str, capacity: float, kwargs: dict):
        spec, state, scope = self.unislim_route, self.unislim_state, self.unislim_state.scope
        B, T, _ = hidden.shape
        mask = scope.token_mask
        eligible = mask.to(hidden.device) if mask is not None and tuple(mask.shape) == (B, T) else \
            torch.ones(B, T, dtype=torch.bool, device=hidden.device)
        forced = torch.zeros_like(eligible)
        keep = spec.keep_last.get(task, 0)
        if keep:
            forced[:, -keep:] = True
        name = spec.router_name(task)
        logits = self.mod_routers[name](hidden).squeeze(-1).float()  # (B, T)
        predictor = self.mod_predictors[name] if task in spec.causal and name in self.mod_predictors else None
        if predictor is not None and not self.training:  # causal inference: per-token decision
            accept = predictor(hidden).squeeze(-1) > 0  # (B, T)
            order, valid = routing.mask_selection((accept & eligible) | forced)  # (B, n)
        else:
            k = routing.capacity_tokens(capacity, T)
            order = routing.topk_selection(routing.priority(logits, eligible, forced), k)  # (B, k)
            valid = torch.ones_like(order, dtype=torch.bool)
            if predictor is not None:  # training: learn to predict top-k membership (MoD §3.5)
                chosen = torch.zeros_like(eligible).scatter(1, order, True)
                pred = predictor(hidden.detach()).squeeze(-1)  # (B, T)
                state.aux_losses.append(routing.predictor_loss(pred, chosen, eligible))
        if state.record is not None:
            state.record.add(task, spec.index, torch.zeros_like(eligible).scatter(1, order, valid))
        h = routing.gather_tokens(hidden, order)  # (B, n, d)
        out = super().forward(h, **_gather_kwargs(kwargs, order, valid, B, T))
        out = out[0] if isinstance(out, tuple) else out  # (B, n, d)
        weight = routing.router_weight(logits.gather(1, order)) * valid  # (B, n)
        return routing.scatter_update(hidden, order, (out - h) * weight[..., None].to(h.dtype))


    def _cached_causal_forward(self, hidden, task: str, name: str, kwargs: dict):
        """The predictor's per-token decision over the tokens of one cached forward (see the module
        docstring): accepted tokens attend to the accepted tokens before them (this layer's key
        history) and get x + r·(f(x) − x); the rest keep x and are hidden from later tokens."""
        spec, state, scope = self.unislim_route, self.unislim_state, self.unislim_state.scope
        if spec.keep_last.get(task):
            raise ValueError(f"mod: keep_last for the causal task {task!r} cannot be decided token by token "
                             "while decoding with a KV cache (the last tokens of a sample are not known yet)")
        B, T, _ = hidden.shape
        mask = scope.token_mask
        eligible = mask.to(hidden.device) if mask is not None and tuple(mask.shape) == (B, T) else \
            torch.ones(B, T, dtype=torch.bool, device=hidden.device)
        accept = (self.mod_predictors[name](hidden).squeeze(-1) > 0) & eligible  # (B, T)
        if state.record is not None:
            state.record.add(task, spec.index, accept)
        cache = layer_cache(kwargs)
        keys = _key_history(cache, self.self_attn.layer_idx, accept)  # (B, P + T)
        if not bool(accept.any()) and writes_kv_alone(self):
            write_kv(self, hidden, kwargs)
            return hidden
        kwargs = {**kwargs, "attention_mask": _restrict_keys(kwargs.get("attention_mask"), keys, T)}
        out = super().forward(hidden, **kwargs)
        out = out[0] if isinstance(out, tuple) else out  # (B, T, d)
        weight = routing.router_weight(self.mod_routers[name](hidden).squeeze(-1).float()) * accept  # (B, T)
        return hidden + (out - hidden) * weight[..., None].to(hidden.dtype)


def _key_history(cache, layer_idx: int, accept: torch.Tensor) -> torch.Tensor:
    """This layer's keys so far (the cached tokens it accepted, then `accept`), kept on the cache
    object. Cached positions the router never decided on (written while no routing ran, or by a
    KV-safe layer skip) are keys, as they would be for a dense layer."""
    store = cache.__dict__.setdefault("unislim_mod_keys", {})
    past = cache.get_seq_length(layer_idx)
    prev = store.get(layer_idx)
    if prev is None or prev.shape[0] != accept.shape[0] or prev.shape[1] > past:
        prev = accept.new_ones(accept.shape[0], 0)
    if prev.shape[1] < past:
        prev = torch.cat([prev, accept.new_ones(accept.shape[0], past - prev.shape[1])], 1)
    keys = torch.cat([prev.to(accept.device), accept], 1)  # (B, P + T)
    store[layer_idx] = keys
    return keys


def select_cache_rows(cache, index: torch.Tensor) -> None:
    """Keep the batch rows `index` of a KV cache and of its MoD key histories (e.g. dropping the
    unconditional rows once a guidance schedule needs them no more)."""
    cache.batch_select_indices(index)
    store = cache.__dict__.get("unislim_mod_keys", {})
    for layer_idx, keys in store.items():
        store[layer_idx] = keys[index.to(keys.device)]


def _restrict_keys(mask: torch.Tensor | None, keys: torch.Tensor, T: int) -> torch.Tensor:
    """The attention mask (B, 1, T, P + T) of T new queries over every cached and new key, less the
    keys this layer does not hold (`keys` False); each query still sees itself (no empty rows)."""
    B, K = keys.shape
    device = keys.device
    causal = torch.ones(T, K, dtype=torch.bool, device=device).tril(K - T)[None, None]  # (1, 1, T, K)
    if mask is None:
        allowed = causal.expand(B, 1, T, K)
    elif mask.dim() == 4:
        allowed = mask.bool() if mask.dtype == torch.bool else mask == 0
        allowed = allowed[..., -K:].expand(B, 1, T, K)
    else:
        raise ValueError(f"mod: cannot restrict a {mask.dim()}-D attention mask to a layer's routed keys")
    eye = torch.zeros(T, K, dtype=torch.bool, device=device)
    eye[torch.arange(T), torch.arange(K - T, K)] = True
    allowed = (allowed & keys[:, None, None, :]) | eye[None, None]
    if mask is None or mask.dtype == torch.bool:
        return allowed
    return torch.zeros(allowed.shape, dtype=mask.dtype, device=device).masked_fill(~allowed,
                                                                                  torch.finfo(mask.dtype).min)


@functools.cache
def _routed_class(cls: type) -> type:
    return type(cls.__name__, (RoutedLayer, cls), {"__module__": cls.__module__, "__qualname__": cls.__qualname__})


def _routed(model: nn.Module, layer: nn.Module, index: int) -> nn.Module:
    """Swap `layer`'s class for its routed form (once) and give it a spec and the model's state."""
    if not isinstance(layer, RoutedLayer):
        layer.__class__ = _routed_class(type(layer))
        layer.unislim_route = RouteSpec(index)
        layer.unislim_state = _state(model)
    return layer


def _router(d: int, device, dtype) -> nn.Linear:
    router = nn.Linear(d, 1, bias=False, device=device, dtype=dtype)
    nn.init.zeros_(router.weight)  # r = 2·sigmoid(0) = 1: starts as the dense model
    return router


def _build_mod(model: nn.Module, op: dict) -> None:
    layers = _layers_by_name(model, op)
    for name, caps in op["layers"].items():
        index, layer = layers[name]
        _routed(model, layer, index)
        spec = layer.unislim_route
        spec.capacity.update({t: float(c) for t, c in caps.items()})
        spec.routing, spec.causal = op["routing"], set(op.get("causal_tasks", []))
        spec.keep_last.update({t: int(n) for t, n in op.get("keep_last", {}).items()})
        ref = next(layer.parameters())
        routers = sorted({spec.router_name(t) for t, c in caps.items() if c < 1.0})
        layer.mod_routers = nn.ModuleDict({r: _router(op["hidden"], ref.device, ref.dtype) for r in routers})
        layer.mod_predictors = nn.ModuleDict({
            r: nn.Linear(op["hidden"], 1, device=ref.device, dtype=ref.dtype) for r in routers
            if any(spec.router_name(t) == r and t in spec.causal for t, c in caps.items() if c < 1.0)})


def _layers_by_name(model: nn.Module, op: dict) -> dict[str, tuple[int, nn.Module]]:
    path = op["layers_path"]
    return {f"{path}.{i}": (i, layer) for i, layer in enumerate(model.get_submodule(path))}


register("mod")(_build_mod)


def add_mod(model: nn.Module, adapter: Adapter, capacity: dict[str, dict[int, float]], *, routing_mode: str = "task",
            causal_tasks: tuple[str, ...] = (), keep_last: dict[str, int] | None = None,
            aux_weight: float = 1.0) -> dict:
    """Insert per-task routers: `capacity[task][layer index]` < 1 routes that task's tokens in that
    layer (routers zero: router weight 1; predictors for `causal_tasks`). Returns the recorded op."""
    if routing_mode not in ("task", "shared"):
        raise ValueError(f"mod routing must be 'task' or 'shared', got {routing_mode!r}")
    if routing_mode == "shared":
        per_layer = {}
        for task, caps in capacity.items():
            for i, c in caps.items():
                per_layer.setdefault(i, set()).add(round(float(c), 9))
        uneven = {i: sorted(v) for i, v in per_layer.items() if len(v) > 1}
        if uneven:
            raise ValueError(f"mod routing 'shared' uses one capacity per layer for every task, got {uneven}")
    n = len(adapter.decoder_layers(model))
    bad = sorted({i for caps in capacity.values() for i in caps if not 0 <= int(i) < n})
    if bad:
        raise ValueError(f"mod: layers {bad} outside 0..{n - 1}")
    layers: dict[str, dict[str, float]] = {}
    for task, caps in capacity.items():
        for i, c in caps.items():
            if not 0 < float(c) <= 1:
                raise ValueError(f"mod capacity[{task!r}][{i}] must be in (0, 1], got {c}")
            if float(c) < 1.0:
                layers.setdefault(adapter.layer_name(int(i)), {})[task] = float(c)
    op = {"op": "mod", "layers_path": adapter.layers, "layers": layers, "routing": routing_mode,
          "causal_tasks": sorted(causal_tasks), "keep_last": dict(keep_last or {}), "aux_weight": aux_weight,
          "hidden": adapter.sizes(model).hidden_size}
    _build_mod(model, op)
    record(model, op)
    return op


@register("skip_layers")
def _build_skip(model: nn.Module, op: dict) -> None:
    layers = _layers_by_name(model, op)
    for name in op["layers"]:
        index, layer = layers[name]
        _routed(model, layer, index).unislim_route.skip.add(op["task"])


def skip_layers(model: nn.Module, adapter: Adapter, task: str, layers: list[int]) -> dict:
    """Tokens of `task` run past `layers` (the other tasks still run them); recorded."""
    n = len(adapter.decoder_layers(model))
    bad = [i for i in layers if not 0 <= i < n]
    if bad:
        raise ValueError(f"skip_layers: layers {bad} outside 0..{n - 1}")
    op = {"op": "skip_layers", "layers_path": adapter.layers, "task": task,
          "layers": [adapter.layer_name(i) for i in sorted(layers)]}
    _build_skip(model, op)
    record(model, op)
    return op


def routed_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, RoutedLayer)]


def router_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if ".mod_routers." in n or ".mod_predictors." in n]


def mod_aux_loss(model: nn.Module) -> torch.Tensor | None:
    """`aux_weight` × the mean predictor BCE of the last training forward (trains only the predictors)."""
    state = model.__dict__.get("unislim_route_state")
    if state is None or not state.aux_losses:
        return None
    ops = [op for op in (getattr(model.config, "unislim", None) or {}).get("surgery", []) if op["op"] == "mod"]
    return (ops[-1]["aux_weight"] if ops else 1.0) * torch.stack(state.aux_losses).mean()
