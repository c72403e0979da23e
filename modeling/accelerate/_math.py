"""Pure tensor functions behind the techniques (unit-tested on their own)."""

from __future__ import annotations

from collections.abc import Collection

import torch
import torch.nn.functional as F


def cfg_scale_at(segments: tuple[tuple[float, float], ...], index: int, steps: int) -> float:
    """The guidance scale of step `index` of `steps`: the last segment whose start <= index / steps."""
    done = index / steps
    scale = segments[0][1]
    for start, value in segments:
        if start <= done:
            scale = value
    return float(scale)


def mean_cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean over rows of cos(x_row, y_row); x, y (..., d)."""
    return float(F.cosine_similarity(x.float(), y.float(), dim=-1).mean())


def most_redundant(cosine: dict[int, float], count: int) -> set[int]:
    """The `count` layers whose output is most similar to their input (ties: lower index first)."""
    order = sorted(cosine, key=lambda i: (-cosine[i], i))
    return set(order[:count])


def vnorm_keep(v: torch.Tensor, n_image: int, keep: int) -> torch.Tensor:
    """Indices of the tokens to keep: the `keep` image tokens (the first `n_image` positions) whose
    value vectors have the largest L2 norm, in their original order, then every text token.

    v (B, T, KV * hd) the value projection of one layer -> (B, keep + T - n_image) long.
    """
    B, T, _ = v.shape
    norms = v[:, :n_image].float().norm(dim=-1)  # (B, n_image)
    image = torch.sort(torch.topk(norms, keep, dim=1).indices, dim=1).values  # (B, keep)
    text = torch.arange(n_image, T, device=v.device).expand(B, -1)  # (B, T - n_image)
    return torch.cat([image, text], dim=1)


def layers_left(num_layers: int, skipped: Collection[int]) -> list[int]:
    return [i for i in range(num_layers) if i not in set(skipped)]
