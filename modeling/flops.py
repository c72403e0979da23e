"""Forward FLOPs of any module call, as it actually runs: `count_flops(fn)`.

`torch.utils.flop_counter.FlopCounterMode` counts every matmul-like aten op of whatever runs
under it — HF modules called with keyword arguments, pruned widths, tokens gathered by
Mixture-of-Depths routers, experts a token was routed to — so nothing is a formula over the config.
Two ops it has no formula for are added here: CPU attention
(`_scaled_dot_product_flash_attention_for_cpu`, what SDPA dispatches to on CPU: 4·B·H·Tq·Tk·hd,
the same count as the CUDA kernels' formulas) and `_grouped_mm` (an MoE's grouped expert GEMM:
2·rows·k·n summed over groups). FLOPs = 2 × multiply-adds; element-wise ops are not counted.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    b, h, tq, d = query_shape
    tk, dv = key_shape[-2], value_shape[-1]
    return 2 * b * h * tq * tk * d + 2 * b * h * tq * tk * dv  # QKᵀ and AV


def _sdpa_cpu_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                             **kwargs) -> int:
    return 2 * _sdpa_cpu_flops(query_shape, key_shape, value_shape)  # dQ, dK, dV, dP: twice the forward


def _grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    # (M, K) x (G, K, N) with row offsets: every row meets one group's (K, N) matrix
    if len(a_shape) == 2 and len(b_shape) == 3:
        return 2 * a_shape[0] * a_shape[1] * b_shape[2]
    if len(a_shape) == 3 and len(b_shape) == 3:  # batched: (G, M, K) x (G, K, N)
        return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]
    return 2 * a_shape[-2] * a_shape[-1] * b_shape[-1]


def _shapes(fn):
    """FlopCounterMode hands formulas the shapes of tensor arguments."""

    def formula(*args, out_shape=None, **kwargs):
        return fn(*args, out_shape=out_shape)

    return formula


CUSTOM = {
    aten._scaled_dot_product_flash_attention_for_cpu: _shapes(_sdpa_cpu_flops),
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _shapes(_sdpa_cpu_backward_flops),
    aten._grouped_mm: _shapes(_grouped_mm_flops),
}


def counter() -> FlopCounterMode:
    """A FlopCounterMode that also counts CPU attention and grouped GEMMs."""
    return FlopCounterMode(display=False, custom_mapping=CUSTOM)


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of everything `fn()` runs (forward, and backward if it calls it)."""
    with counter() as mode:
        fn()
    return int(mode.get_total_flops())
