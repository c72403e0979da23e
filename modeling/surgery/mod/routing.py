"""Mixture-of-Depths token routing as pure tensor functions (Raposo et al. 2024, arXiv 2404.02258;
UniMoD, arXiv 2502.06474 §3).

A routed layer processes only `k = ceil(c·T)` tokens of each sample: the router's top-k (training,
and at inference for tasks whose tokens all exist at once), or the tokens an auxiliary predictor
accepts (inference of causal text: top-k would look at future tokens, MoD §3.5). The selected
tokens are *gathered* (hidden states, RoPE cos/sin, the attention mask among them), the layer runs
on the short sequence, and the update `r_i · (f(x_i) − x_i)` is scattered back (MoD Eq. 1); the
other tokens pass by unchanged, so their compute really is skipped.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def capacity_tokens(capacity: float, T: int) -> int:
    """k = ceil(c·T), at least 1 and at most T. c·T is rounded to 1e-6 first so that 0.7·40 is 28
    (not 29 from the binary float 28.000000000000004)."""
    return max(1, min(T, math.ceil(round(capacity * T, 6))))


def topk_selection(priority: torch.Tensor, k: int) -> torch.Tensor:
    """priority (B, T) → order (B, k): the k highest tokens of each sample, in sequence order."""
    return priority.topk(k, dim=1).indices.sort(dim=1).values


def mask_selection(selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """selected (B, T) bool, any count per sample → order (B, n), valid (B, n) with n the largest count.

    Each row lists its selected tokens in sequence order, then (where a sample has fewer than n)
    unselected fillers marked invalid: they run through the layer but are no one's key and are
    not scattered back.
    """
    n = max(1, int(selected.sum(dim=1).max()))
    order = torch.argsort((~selected).to(torch.int8), dim=1, stable=True)[:, :n]  # (B, n)
    return order, selected.gather(1, order)


def priority(router_logits: torch.Tensor, eligible: torch.Tensor, forced: torch.Tensor) -> torch.Tensor:
    """Top-k priority: forced tokens (never skipped) first, pads last, the rest by router logit. (B, T)"""
    p = router_logits.detach().float()
    p = torch.where(eligible, p, torch.full_like(p, -1e9))
    return torch.where(forced, torch.full_like(p, 1e9), p)


def gather_tokens(x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """x (B, T, ...) → (B, n, ...) at order (B, n)."""
    idx = order.view(*order.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return x.gather(1, idx)


def gather_mask(mask: torch.Tensor, order: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The attention mask among the selected tokens. mask (B, 1, T, T) bool → (B, 1, n, n).

    Invalid fillers are no one's key; every token still sees itself (no empty softmax rows).
    """
    B, _, T, _ = mask.shape
    n = order.shape[1]
    rows = mask[:, 0].gather(1, order[:, :, None].expand(-1, -1, T))  # (B, n, T)
    sub = rows.gather(2, order[:, None, :].expand(-1, n, -1))  # (B, n, n)
    sub = sub & valid[:, None, :]
    sub = sub | torch.eye(n, dtype=torch.bool, device=mask.device)
    return sub[:, None]


def scatter_update(hidden: torch.Tensor, order: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """hidden (B, T, d) + update (B, n, d) added at order (B, n) (distinct per row) → (B, T, d)."""
    return hidden.scatter_add(1, order[:, :, None].expand(-1, -1, hidden.shape[-1]), update)


def router_weight(logits: torch.Tensor) -> torch.Tensor:
    """r = 2·sigmoid(logit): exactly 1 for a zero-initialised router, so a freshly routed model at
    capacity 1.0 is the dense model; gradients reach the router through r (MoD Eq. 1)."""
    return 2.0 * torch.sigmoid(logits)


def predictor_loss(pred_logits: torch.Tensor, chosen: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """BCE of the auxiliary predictor against top-k membership over real tokens (MoD §3.5).
    pred_logits, chosen, eligible (B, T); the predictor's input is detached, so this loss trains
    only the predictor and leaves the language model's objective untouched."""
    return F.binary_cross_entropy_with_logits(pred_logits[eligible], chosen[eligible].float())


def layer_flops(*, B: int, T: int, n: int, d: int, q_out: int, kv_out: int, ff: int,
                router: bool = True, predictor: bool = False) -> int:
    """Analytic forward FLOPs (2·MACs) of one decoder layer that processes n of T tokens per sample:
    q/k/v/o and gate/up/down projections on B·n tokens, QKᵀ and AV on n×n, and the d→1 router
    (and predictor) on all B·T tokens. Matches `count_flops` of the reference evaluator."""
    proj = 2 * B * n * (d * q_out + 2 * d * kv_out + q_out * d + 3 * d * ff)
    attention = 4 * B * n * n * q_out
    routing = 2 * B * T * d * (int(router) + int(predictor))
    return proj + attention + routing
