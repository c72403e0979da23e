"""`MoEMLP`'s `grouped_padded` impl as pure tensor functions (`fused` is `_fused.py`).

They take the experts' weights with gate and up fused into one input projection:

    w_in (R, m, d), m = 2f (gated: rows [gate | up]) or f (ungated); b_in (R, m) or None;
    w_down (R, d, f); hidden(a) maps the pre-activations a (n, m) to h (n, f).

`grouped_experts` takes the routed slots (token, expert) sorted by expert — `token` (M,) the row
of x of each slot, `g` (M,) its gate, `counts` (R,) the slots of each routed expert — and returns
the sum over slots of g * f_e(x_token), (N, d). The gate scales h (M, f) rather than the output
(M, d): the same product, f / d of the work.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)

Hidden = Callable[[torch.Tensor], torch.Tensor]


def hidden_fn(act: Callable, gated: bool, f: int) -> Hidden:
    """a (n, m) -> h (n, f): act(a[:, :f]) * a[:, f:] (gated) or act(a) (ungated)."""
    if gated:
        return lambda a: act(a[:, :f]) * a[:, f:]
    return act


def padded_width(n: int, dtype: torch.dtype) -> int:
    """The least n' >= n whose rows are a multiple of 16 bytes (`grouped_mm`'s stride rule)."""
    step = max(1, 16 // dtype.itemsize)
    return -(-n // step) * step


# ------------------------------------------------------------------ grouped GEMM, padded


def pad_experts(w_in: torch.Tensor, b_in: torch.Tensor | None, w_down: torch.Tensor, f: int, gated: bool):
    """w_in, b_in, w_down with each expert's f neurons zero-padded to `padded_width(f)`, so that
    `grouped_mm` takes them. The padded neurons have zero input and output weights (and bias), so
    they add exactly 0: act(0) * 0 gated, and a zero column of W_down either way. Differentiable:
    the gradients reach the unpadded weights."""
    fp = padded_width(f, w_in.dtype)
    if fp == f:
        return w_in, b_in, w_down, f
    parts = (w_in[:, :f], w_in[:, f:]) if gated else (w_in,)  # (R, f, d) each
    w_in = torch.cat([F.pad(w, (0, 0, 0, fp - f)) for w in parts], dim=1)  # (R, m', d)
    if b_in is not None:
        b_parts = (b_in[:, :f], b_in[:, f:]) if gated else (b_in,)
        b_in = torch.cat([F.pad(b, (0, fp - f)) for b in b_parts], dim=1)  # (R, m')
    return w_in, b_in, F.pad(w_down, (0, fp - f)), fp  # (R, d, f')


def grouped_experts(x: torch.Tensor, token: torch.Tensor, g: torch.Tensor, counts: torch.Tensor, w_in: torch.Tensor,
                    b_in: torch.Tensor | None, w_down: torch.Tensor, hidden: Hidden) -> torch.Tensor:
    """All experts in two `grouped_mm`s over the gathered slots (M, d); the weights must already
    keep 16-byte strides (`pad_experts`). autograd differentiates `grouped_mm`."""
    offs = torch.cumsum(counts, 0).to(torch.int32)  # (R,) group ends
    xs = x.index_select(0, token)  # (M, d)
    a = grouped_mm(xs, w_in.transpose(-2, -1), offs=offs)  # (M, m)
    if b_in is not None:
        a = a + b_in.repeat_interleave(counts, dim=0, output_size=token.numel())  # each slot its expert's bias
    h = hidden(a) * g[:, None]  # (M, f)
    ys = grouped_mm(h, w_down.transpose(-2, -1), offs=offs)  # (M, d)
    return x.new_zeros(x.shape).index_add_(0, token, ys)
