"""Least-squares router initialisation for Mixture-of-Depths layers (`mod.router_init: fit`)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .layer import route_state, routed_layers


@torch.no_grad()
def fit_routers(model: nn.Module, run: Callable[[], None], logit_std: float = 0.05, ridge: float = 1e-3) -> dict:
    """Initialise every router so that its top-k starts at the tokens the layer changes most:
    w ∝ argmin ‖X w − y‖² + λ‖w‖², y = log(‖f(x) − x‖ / ‖x‖) per real token, X the layer's input
    hidden states (both centred), over the dense forwards `run()` makes (with task scopes set).

    Top-k only ranks, so w is then scaled until the logits' std is `logit_std`: the router weight
    2·sigmoid(logit) stays within a few percent of 1 and the model starts close to the dense one
    restricted to the chosen tokens (instead of to an arbitrary tie-break of zero logits).
    Returns the R² of each router's fit, keyed `layer{i}/{router}`.
    """
    state = route_state(model)
    data: dict[tuple[int, str], list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def observe(layer, task, x, y):  # x, y (B, T, d): a dense run of `layer` for `task`
        spec = layer.unislim_route
        mask = state.scope.token_mask
        rows = mask.to(x.device) if mask is not None and tuple(mask.shape) == tuple(x.shape[:2]) else \
            torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        rel = ((y - x).norm(dim=-1) / x.norm(dim=-1).clamp(min=1e-6)).clamp(min=1e-6).log()  # (B, T)
        data.setdefault((spec.index, spec.router_name(task)), []).append((x[rows].float(), rel[rows]))

    was_training = model.training
    state.dense, state.observe = True, observe
    try:
        model.eval()
        run()
    finally:
        state.dense, state.observe = False, None
        model.train(was_training)
    layers = {layer.unislim_route.index: layer for layer in routed_layers(model)}
    quality = {}
    for (i, name), parts in sorted(data.items()):
        if i not in layers or name not in layers[i].mod_routers:
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
