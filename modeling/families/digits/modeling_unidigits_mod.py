"""The reference model with task-aware Mixture-of-Depths layers (UniMoD, arXiv 2502.06474).

`ModDecoderLayer` *is* a `UniDigitsDecoderLayer` (same weights, same names, so a dense checkpoint
loads into it and the adapters still find every projection) plus, per routed task, a d→1 router
and, for causal tasks, a d→1 auxiliary predictor. For a sample of task t with capacity c < 1 in
this layer, router_t picks ceil(c·T) tokens (`routing.py`); only they are gathered and run through
attention (among themselves) and the MLP; `x + r·(f(x) − x)` is scattered back (MoD Eq. 1).

The layer learns which task it serves from the model: `und_logits` and `gen_hidden` (the backbone
half of `gen_velocity`), which every entry point goes through, set the task, the real-token mask
and the never-skip tokens on a state object all layers share, for the duration of the call. Generation is routed
afresh at every denoising step (each step is one `gen_velocity` call; the time embedding is in the
image tokens' hidden states, so the router sees the step).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from unislim.modeling.families.digits.modeling_unidigits import UniDigitsDecoderLayer, UniDigitsModel, UniDigitsOutput

from unislim.modeling.surgery.mod import routing
from .configuration_unidigits_mod import UniDigitsModConfig


@dataclass
class Route:
    """What the layers need to know about the samples now running through them."""

    task: str
    eligible: torch.Tensor  # (B, T) bool: real tokens (pads are picked last)
    forced: torch.Tensor  # (B, T) bool: never skipped


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


class _RoutingState:
    """Shared by every layer of one model (a plain object, not a module)."""

    def __init__(self):
        self.route: Route | None = None
        self.aux_losses: list[torch.Tensor] = []
        self.record: RoutingRecord | None = None


def _router(d: int) -> nn.Linear:
    router = nn.Linear(d, 1, bias=False)
    router.is_mod_router = True
    return router


class ModDecoderLayer(UniDigitsDecoderLayer):
    """A decoder layer with per-task token routers (see module docstring)."""

    def __init__(self, config: UniDigitsModConfig, layer_idx: int, state: _RoutingState):
        super().__init__(config, layer_idx)
        self.layer_idx = layer_idx
        self.capacity = {t: c[layer_idx] for t, c in config.mod_capacity.items()}
        self.router_name = config.router_name
        self.causal = set(config.mod_causal_tasks)
        routed = config.routed(layer_idx)  # router name -> tasks it serves here
        d = config.hidden_size
        self.mod_routers = nn.ModuleDict({name: _router(d) for name in routed})
        self.mod_predictors = nn.ModuleDict(
            {name: nn.Linear(d, 1) for name, tasks in routed.items() if self.causal & set(tasks)})
        self.state = state

    def forward(self, hidden, cos_sin, mask, gen_mask):  # hidden (B, T, d); mask (B, 1, T, T)
        route = self.state.route
        if route is None or self.capacity[route.task] >= 1.0:
            if route is not None and self.state.record is not None:
                self.state.record.add(route.task, self.layer_idx, torch.ones_like(route.eligible))
            return super().forward(hidden, cos_sin, mask, gen_mask)
        B, T, _ = hidden.shape
        if route.eligible.shape != (B, T):
            raise ValueError(f"layer {self.layer_idx}: {T} tokens arrive but {tuple(route.eligible.shape)} were "
                             "routed (a token filter before a MoD layer is not supported)")
        name = self.router_name(route.task)
        logits = self.mod_routers[name](hidden).squeeze(-1).float()  # (B, T)
        predictor = self.mod_predictors[name] if route.task in self.causal else None
        if predictor is not None and not self.training:  # causal inference: per-token decision
            accept = predictor(hidden).squeeze(-1) > 0  # (B, T)
            order, valid = routing.mask_selection((accept & route.eligible) | route.forced)  # (B, n)
        else:
            k = routing.capacity_tokens(self.capacity[route.task], T)
            order = routing.topk_selection(routing.priority(logits, route.eligible, route.forced), k)  # (B, k)
            valid = torch.ones_like(order, dtype=torch.bool)
            if predictor is not None:  # training: learn to predict top-k membership (MoD §3.5)
                chosen = torch.zeros_like(route.eligible).scatter(1, order, True)
                pred = predictor(hidden.detach()).squeeze(-1)  # (B, T)
                self.state.aux_losses.append(routing.predictor_loss(pred, chosen, route.eligible))
        if self.state.record is not None:
            kept = torch.zeros_like(route.eligible).scatter(1, order, valid)
            self.state.record.add(route.task, self.layer_idx, kept)

        h = routing.gather_tokens(hidden, order)  # (B, n, d)
        cos_sin_sel = tuple(routing.gather_tokens(x, order) for x in cos_sin)  # (B, n, hd) each
        sub_mask = routing.gather_mask(mask, order, valid)  # (B, 1, n, n)
        gen_sel = None if gen_mask is None else gen_mask.gather(1, order)  # (B, n)
        out = super().forward(h, cos_sin_sel, sub_mask, gen_sel)  # (B, n, d)
        weight = routing.router_weight(logits.gather(1, order)) * valid  # (B, n)
        return routing.scatter_update(hidden, order, (out - h) * weight[..., None].to(h.dtype))


@dataclass
class ModOutput(UniDigitsOutput):
    mod_aux_loss: torch.Tensor | None = None


class UniDigitsModModel(UniDigitsModel):
    """The reference model whose decoder layers are `ModDecoderLayer`s (see module docstring)."""

    config_class = UniDigitsModConfig
    config: UniDigitsModConfig
    _no_split_modules = ["ModDecoderLayer"]

    def __init__(self, config: UniDigitsModConfig):
        super().__init__(config)
        self._routing_state = _RoutingState()
        self.model.layers = nn.ModuleList(
            ModDecoderLayer(config, i, self._routing_state) for i in range(config.num_hidden_layers))
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        if getattr(module, "is_mod_router", False):  # r = 2·sigmoid(0) = 1: starts as the dense model
            nn.init.zeros_(module.weight)

    @classmethod
    def from_dense(cls, dense: UniDigitsModel, **mod_fields) -> UniDigitsModModel:
        """The dense model's weights in MoD layers (`mod_capacity=...`, `mod_routing=...`, ...),
        routers zero (router weight 1), predictors freshly initialised."""
        fields = {k: v for k, v in dense.config.to_dict().items() if k not in ("model_type", "transformers_version")}
        config = UniDigitsModConfig(**{**fields, **mod_fields})
        model = cls(config).to(device=dense.device, dtype=dense.dtype)
        missing, unexpected = model.load_state_dict(dense.state_dict(), strict=False)
        assert not unexpected, f"dense weights without a place in the MoD model: {unexpected[:5]}"
        assert all(".mod_" in k for k in missing), f"MoD model weights the dense one lacks: {missing[:5]}"
        for layer in model.model.layers:
            for router in layer.mod_routers.values():
                nn.init.zeros_(router.weight)
        return model.train(dense.training)

    def router_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if ".mod_" in n]

    # ------------------------------------------------------------ routing context
    @contextmanager
    def _routing(self, task: str, key_mask: torch.Tensor) -> Iterator[None]:
        keep = self.config.mod_keep_last[task]
        forced = torch.zeros_like(key_mask)
        if keep:
            forced[:, -keep:] = True
        self._routing_state.route = Route(task, key_mask, forced)
        try:
            yield
        finally:
            self._routing_state.route = None

    @contextmanager
    def record_routing(self) -> Iterator[RoutingRecord]:
        """Count the tokens every layer processes while active."""
        self._routing_state.record = RoutingRecord()
        try:
            yield self._routing_state.record
        finally:
            self._routing_state.record = None

    # ------------------------------------------------------------ task forwards
    def und_logits(self, images, input_ids, *args, **kwargs):
        n_img = self.config.num_image_tokens
        key_mask = torch.cat([torch.ones_like(input_ids[:, :1].expand(-1, n_img), dtype=torch.bool),
                              input_ids != self.config.pad_token_id], dim=1)  # (B, 32 + L)
        with self._routing("und", key_mask):
            return super().und_logits(images, input_ids, *args, **kwargs)

    def gen_hidden(self, prompt_ids, x_t, *args, **kwargs):
        n_img = self.config.num_image_tokens
        key_mask = torch.cat([prompt_ids != self.config.pad_token_id,  # (B, P + 32)
                              torch.ones_like(prompt_ids[:, :1].expand(-1, n_img), dtype=torch.bool)], dim=1)
        with self._routing("gen", key_mask):
            return super().gen_hidden(prompt_ids, x_t, *args, **kwargs)

    def forward(self, **batch) -> ModOutput:
        """The reference training forward; in training mode the predictors' BCE (MoD §3.5) is
        added to the loss with weight `mod_aux_weight` (it trains only the predictors)."""
        self._routing_state.aux_losses = []
        out = ModOutput(**super().forward(**batch))
        aux = self._routing_state.aux_losses
        if aux:
            out.mod_aux_loss = torch.stack(aux).mean()
            if out.loss is not None:
                out.loss = out.loss + self.config.mod_aux_weight * out.mod_aux_loss
        self._routing_state.aux_losses = []
        return out


@torch.no_grad()
def fit_routers(model: UniDigitsModModel, batches: list[dict], logit_std: float = 0.05, ridge: float = 1e-3) -> dict:
    """Initialise every router by least squares so that its top-k starts at the tokens the layer
    changes most: w ∝ argmin ‖X w − y‖² + λ‖w‖², y = log(‖f(x) − x‖ / ‖x‖) per real token, X the
    layer's input hidden states (both centred), over the dense model's forwards on `batches`.

    Top-k only ranks, so w is then scaled until the logits' std is `logit_std`: the router weight
    2·sigmoid(logit) stays within a few percent of 1 and the model starts close to the dense one
    restricted to the chosen tokens (instead of to an arbitrary tie-break of zero logits).
    Returns the R² of each router's fit, keyed `layer{i}/{router}`.
    """
    layers = list(model.model.layers)
    saved = [layer.capacity for layer in layers]
    data: dict[tuple[int, str], list[tuple[torch.Tensor, torch.Tensor]]] = {}
    state = model._routing_state

    def hook(layer, args, output):
        route = state.route
        x, y = args[0], output  # (B, T, d)
        rows = route.eligible
        rel = ((y - x).norm(dim=-1) / x.norm(dim=-1).clamp(min=1e-6)).clamp(min=1e-6).log()  # (B, T)
        data.setdefault((layer.layer_idx, layer.router_name(route.task)), []).append((x[rows].float(), rel[rows]))

    handles = [layer.register_forward_hook(hook) for layer in layers]
    was_training = model.training
    try:
        for layer in layers:
            layer.capacity = dict.fromkeys(layer.capacity, 1.0)  # dense: every token, the layer's own update
        model.eval()
        for batch in batches:
            model(**batch)
    finally:
        for layer, caps in zip(layers, saved):
            layer.capacity = caps
        for h in handles:
            h.remove()
        model.train(was_training)
    quality = {}
    for (i, name), parts in sorted(data.items()):
        if name not in layers[i].mod_routers:
            continue
        X = torch.cat([p[0] for p in parts]).double()  # (N, d)
        y = torch.cat([p[1] for p in parts]).double()  # (N,)
        Xc, yc = X - X.mean(0), y - y.mean()
        gram = Xc.T @ Xc
        damping = ridge * gram.trace() / gram.shape[0] * torch.eye(gram.shape[0], dtype=gram.dtype)
        w = torch.linalg.solve(gram + damping, Xc.T @ yc)  # (d,)
        r2 = 1 - float(((Xc @ w - yc) ** 2).sum() / (yc**2).sum().clamp(min=1e-12))
        w = w * (logit_std / (X @ w).std().clamp(min=1e-12))
        router = layers[i].mod_routers[name]
        router.weight.copy_(w.to(router.weight)[None])
        quality[f"layer{i}/{name}"] = round(r2, 4)
    return quality
