"""`impl="fused"`: a whole `MoEMLP` (shared + routed experts, no down bias) as one autograd Function.

Why one Function instead of autograd over a loop: the loop's backward is dominated by glue, not
math. Every `x[rows]` and `w[e]` in it is an autograd node whose backward allocates a full
(N, d) or (E, f, d) zero tensor to hold one expert's slice, and autograd then sums R of them:
at 0.5B widths, 64 experts, the loop's forward + backward costs 1.3-1.5x the dense MLP's at 2,048
tokens and 2.8x at 256, for half the arithmetic (BENCHMARKS.md, issue 15). Here the
forward and the backward are written out expert by expert, and dx, dw_gate, dw_up, dw_down are
each one buffer filled in place.

Per routed expert e, on its n slots (rows of x sorted by expert):
    x_e = x[rows]                        index_select into a reused (n_max, d) block
    a = x_e @ [W_gate_e; W_up_e]^T       one GEMM of width 2f for gate and up (MKL ran 76 output
                                         columns at 61 GFLOP/s, 152 at 73, one core)
    h = act(a_gate) * a_up  (* g)        the gate scales h (n, f), not the output (n, d)
    out[rows] += h @ W_down_e^T          index_add_
The shared experts are one dense MLP of width S * f over every row (no gather). Only the
pre-activations are kept for the backward (what autograd would keep); x and the upstream gradient
are gathered again per expert. Frozen weights (Expert-Frozen Tuning) skip their GEMMs.
`unit_gate`: every g is exactly 1 (MoEMLP's straight-through gate G = 1 + (p - p.detach())),
so h is not scaled by it; the gradient w.r.t. g is the same either way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable


class Spec(NamedTuple):
    """What the Function needs besides tensors."""

    num_shared: int
    counts: list[int]  # slots per routed expert, in the order of the sorted slots
    act: Callable[[torch.Tensor], torch.Tensor]
    unit_gate: bool


def fused_moe(x: torch.Tensor, g: torch.Tensor, token: torch.Tensor, spec: Spec, w_gate: torch.Tensor | None,
              w_up: torch.Tensor, w_down: torch.Tensor, b_gate: torch.Tensor | None = None,
              b_up: torch.Tensor | None = None) -> torch.Tensor:
    """Shared + routed experts, x (N, d) -> (N, d). g (M,), token (M,): the routed slots sorted by
    expert (their gates and rows). Weights as `MoEMLP` holds them: w_gate, w_up (E, f, d), w_down
    (E, d, f), b_gate, b_up (E, f); w_gate None for an ungated MLP. Outside autograd (nothing
    needs a gradient) it runs the same forward without keeping the pre-activations."""
    tensors = (x, g, w_gate, w_up, w_down, b_gate, b_up)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return _FusedMoE.apply(token, spec, *tensors)
    return _forward(token, spec, *tensors, keep=False)[0]


# ------------------------------------------------------------------ pieces


def _in_weight(w_gate, w_up, lo: int, hi: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Experts lo..hi-1's input projection (m, d): [gate rows | up rows] gated (m = 2nf), up (nf)."""
    up = w_up[lo:hi].flatten(0, 1)  # (n f, d), a view
    if w_gate is None:
        return up
    return torch.cat([w_gate[lo:hi].flatten(0, 1), up], out=out)


def _in_bias(b_gate, b_up, gated: bool, lo: int, hi: int, f: int, like: torch.Tensor) -> torch.Tensor | None:
    if b_gate is None and b_up is None:
        return None
    part = lambda b: like.new_zeros((hi - lo) * f) if b is None else b[lo:hi].flatten()  # noqa: E731
    return torch.cat([part(b_gate), part(b_up)]) if gated else part(b_up)


def _project(x, w, b, out=None):
    """x (n, d) @ w (m, d)^T (+ b): the pre-activations (n, m)."""
    return torch.mm(x, w.T, out=out) if b is None else torch.addmm(b, x, w.T, out=out)


def _hidden(a: torch.Tensor, act, gated: bool) -> torch.Tensor:
    """Pre-activations (n, m) -> h: act(gate half) * up half, or act(a). Outside autograd only."""
    if not gated:
        return act(a)
    width = a.shape[1] // 2
    h = act(a[:, :width])
    return h * a[:, width:] if h.data_ptr() == a.data_ptr() else h.mul_(a[:, width:])  # in place unless act aliased


def _shared_down(w_down: torch.Tensor, S: int) -> torch.Tensor:
    """The shared experts' down projection as one (d, S f) matrix (a copy of S experts)."""
    return w_down[:S].permute(1, 0, 2).flatten(1)


# ------------------------------------------------------------------ forward


def _forward(token, spec, x, g, w_gate, w_up, w_down, b_gate, b_up, keep: bool):
    N, d = x.shape
    S, f, gated = spec.num_shared, w_up.shape[1], w_gate is not None
    a_shared = None
    if S:
        a_shared = _project(x, _in_weight(w_gate, w_up, 0, S), _in_bias(b_gate, b_up, gated, 0, S, f, x))
        out = _hidden(a_shared, spec.act, gated) @ _shared_down(w_down, S).T  # (N, d)
    else:
        out = x.new_zeros(N, d)
    n_max, m = max(spec.counts, default=0), (2 if gated else 1) * f
    x_buf, y_buf = x.new_empty(n_max, d), x.new_empty(n_max, d)  # reused: no allocation per expert
    w_buf = x.new_empty(m, d)
    a_all = x.new_empty(token.numel() if keep else n_max, m)  # pre-activations of the sorted slots
    start = 0
    for j, n in enumerate(spec.counts):
        if n == 0:
            continue
        e, s = S + j, slice(start, start + n)
        rows = token[s]
        xj = torch.index_select(x, 0, rows, out=x_buf[:n])  # (n, d)
        a = _project(xj, _in_weight(w_gate, w_up, e, e + 1, out=w_buf), _in_bias(b_gate, b_up, gated, e, e + 1, f, x),
                     out=a_all[s] if keep else a_all[:n])  # (n, m)
        h = _hidden(a, spec.act, gated)
        if not spec.unit_gate:
            h = h * g[s, None]
        out.index_add_(0, rows, torch.mm(h, w_down[e].T, out=y_buf[:n]))  # (n, d)
        start += n
    return out, a_shared, (a_all if keep else None)


# ------------------------------------------------------------------ the Function


class _FusedMoE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, token, spec, x, g, w_gate, w_up, w_down, b_gate, b_up):
        out, a_shared, a_all = _forward(token, spec, x, g, w_gate, w_up, w_down, b_gate, b_up, keep=True)
        ctx.save_for_backward(token, x, g, w_gate, w_up, w_down, b_gate, b_up, a_shared, a_all)
        ctx.spec = spec
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        token, x, g, w_gate, w_up, w_down, b_gate, b_up, a_shared, a_all = ctx.saved_tensors
        spec = ctx.spec
        need_x, need_g, need_wg, need_wu, need_wd, need_bg, need_bu = ctx.needs_input_grad[2:]
        S, f, gated, d = spec.num_shared, w_up.shape[1], w_gate is not None, x.shape[1]
        need_a = need_x or need_wg or need_wu or need_bg or need_bu
        grad_out = grad_out.contiguous()
        unused = [S + j for j, n in enumerate(spec.counts) if n == 0]  # experts whose gradient is 0

        def buffer(w, need):  # one gradient buffer per weight, every expert's slice written below
            if not need:
                return None
            buf = torch.empty_like(w)
            buf[unused] = 0
            return buf

        dw_gate, dw_up, dw_down = buffer(w_gate, need_wg), buffer(w_up, need_wu), buffer(w_down, need_wd)
        db_gate, db_up = buffer(b_gate, need_bg), buffer(b_up, need_bu)
        dx = None
        dg = torch.zeros_like(g) if need_g else None

        def input_grads(da, xs, lo, hi, w_in, out=None, dw_buf=None):
            """Fills the input projection's weight and bias gradients of experts lo..hi-1 from da (n, m)
            and xs (n, d); returns dL/dxs (n, d) if x needs it. Gate and up together are one GEMM
            into dw_buf (m, d), then copied: twice as wide as each alone, which the BLAS runs faster."""
            half = (hi - lo) * f
            gate_part, up_part = (da[:, :half], da[:, half:]) if gated else (None, da)
            if gated and dw_gate is not None and dw_up is not None:
                dw_in = torch.mm(da.T, xs, out=dw_buf)  # (m, d)
                dw_gate[lo:hi].flatten(0, 1).copy_(dw_in[:half])
                dw_up[lo:hi].flatten(0, 1).copy_(dw_in[half:])
            else:
                if dw_gate is not None:
                    torch.mm(gate_part.T, xs, out=dw_gate[lo:hi].flatten(0, 1))  # (n f, d)
                if dw_up is not None:
                    torch.mm(up_part.T, xs, out=dw_up[lo:hi].flatten(0, 1))
            if db_gate is not None:
                torch.sum(gate_part, 0, out=db_gate[lo:hi].flatten())
            if db_up is not None:
                torch.sum(up_part, 0, out=db_up[lo:hi].flatten())
            return torch.mm(da, w_in, out=out) if need_x else None  # (n, d)

        def hidden_and_grad(a, da_out=None):
            """h = hidden(a) for a (n, m), and the map dL/dh -> dL/da (autograd through act; the
            gate and up halves are separate leaves, so no slice's backward pads them to (n, m))."""
            with torch.enable_grad():
                if not gated:
                    leaves = (a.detach().requires_grad_(need_a),)
                    h = spec.act(leaves[0])
                else:
                    width = a.shape[1] // 2
                    leaves = tuple(half.detach().requires_grad_(need_a) for half in (a[:, :width], a[:, width:]))
                    h = spec.act(leaves[0]) * leaves[1]

            def grad_of(dh):
                parts = torch.autograd.grad(h, leaves, dh)
                return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1, out=da_out)

            return h.detach(), grad_of

        if S:
            h, grad_of = hidden_and_grad(a_shared)  # (N, S f)
            down = _shared_down(w_down, S)  # (d, S f)
            if dw_down is not None:
                dw_down[:S].copy_((grad_out.T @ h).view(d, S, f).permute(1, 0, 2))
            if need_a:
                da = grad_of(grad_out @ down)  # (N, m_s)
                dx = input_grads(da, x, 0, S, _in_weight(w_gate, w_up, 0, S))
        if dx is None and need_x:
            dx = torch.zeros_like(x)

        n_max, m = max(spec.counts, default=0), (2 if gated else 1) * f
        grad_buf, x_buf, dx_buf = (x.new_empty(n_max, d) for _ in range(3))
        w_buf, dw_buf, da_buf = x.new_empty(m, d), x.new_empty(m, d), x.new_empty(n_max, m)
        start = 0
        for j, n in enumerate(spec.counts):
            if n == 0:
                continue
            e, s = S + j, slice(start, start + n)
            rows, gs = token[s], g[s, None]
            grad_j = torch.index_select(grad_out, 0, rows, out=grad_buf[:n])  # (n, d)
            h, grad_of = hidden_and_grad(a_all[s], da_buf[:n])  # (n, f) before the gate
            if dw_down is not None:
                torch.mm(grad_j.T, h if spec.unit_gate else h * gs, out=dw_down[e])  # (d, f)
            dh = grad_j @ w_down[e]  # (n, f)
            if dg is not None:
                torch.sum(dh * h, -1, out=dg[s])
            if need_a:
                da = grad_of(dh if spec.unit_gate else dh * gs)  # (n, m)
                xj = torch.index_select(x, 0, rows, out=x_buf[:n]) if (need_wg or need_wu) else None
                w_in = _in_weight(w_gate, w_up, e, e + 1, out=w_buf) if need_x else None
                dxj = input_grads(da, xj, e, e + 1, w_in, out=dx_buf[:n], dw_buf=dw_buf)
                if dxj is not None:
                    dx.index_add_(0, rows, dxj)
            start += n
        return None, None, dx, dg, dw_gate, dw_up, dw_down, db_gate, db_up
