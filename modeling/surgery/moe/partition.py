"""Expert partition of a dense MLP's neurons (Slim & Sparse, arXiv 2512.02351 §4.2, Eq. 8).

Pure tensor functions, no model: the cumulative score of a neuron over tasks is
`S_i = sum_t s_i^(t)` (Eq. 8, `cumulative_scores`); the neurons with the highest `S_i` form the
shared experts, the rest are dealt to the routed experts by rank in snake order
(1..R, R..1, 1..R, ...) so every routed expert gets a similar mix of important and unimportant
neurons (`partition_neurons`).
"""

from __future__ import annotations

import torch


def cumulative_scores(per_task: dict[str, torch.Tensor]) -> torch.Tensor:
    """Eq. 8: S_i = sum over tasks t of s_i^(t).  {task: (ff,)} -> (ff,) float64."""
    if not per_task:
        raise ValueError("cumulative_scores needs the scores of at least one task")
    shapes = {name: tuple(s.shape) for name, s in per_task.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"per-task neuron scores differ in shape: {shapes}")
    return torch.stack([s.detach().double().cpu() for s in per_task.values()]).sum(0)


def _snake(ranked: torch.Tensor, n: int) -> list[torch.Tensor]:
    """Deal `ranked` (best first) to n bins in snake order: bin of the p-th item is p mod n on even
    rounds and n - 1 - (p mod n) on odd rounds. Returns each bin's items in ascending order."""
    p = torch.arange(len(ranked))
    rnd, within = p // n, p % n
    bin_of = torch.where(rnd % 2 == 0, within, n - 1 - within)  # (len,)
    return [torch.sort(ranked[bin_of == b]).values for b in range(n)]


def partition_neurons(scores: torch.Tensor, num_experts: int, num_shared: int) -> list[torch.Tensor]:
    """Splits ff neurons into `num_experts` experts of ff / num_experts neurons each.

    scores (ff,): cumulative importance (Eq. 8). Returns one (ff / E,) long tensor per expert,
    ascending neuron indices. Experts 0 .. num_shared - 1 are the shared experts and together hold
    the top num_shared * ff / E neurons; the other neurons go to the routed experts
    num_shared .. E - 1 by rank in snake order. Ties in score are ranked by index.
    """
    if scores.dim() != 1:
        raise ValueError(f"scores must be one score per neuron, shape (ff,); got shape {tuple(scores.shape)}")
    ff = scores.numel()
    if num_experts < 1 or not 0 <= num_shared < num_experts:
        raise ValueError(f"need num_experts >= 1 and 0 <= num_shared < num_experts (got num_experts={num_experts}, "
                         f"num_shared={num_shared})")
    if ff % num_experts:
        raise ValueError(f"the MLP width ff={ff} is not divisible by num_experts={num_experts} "
                         f"(experts must have equal widths; divisors near {num_experts}: "
                         f"{[e for e in range(max(1, num_experts // 2), 2 * num_experts + 1) if ff % e == 0]})")
    width = ff // num_experts
    ranked = torch.sort(scores.detach().double().cpu(), descending=True, stable=True).indices  # (ff,) best first
    n_shared = num_shared * width
    shared = _snake(ranked[:n_shared], num_shared) if num_shared else []
    routed = _snake(ranked[n_shared:], num_experts - num_shared)
    return shared + routed
