"""`MoEMLP`: a dense MLP cut into shared + routed experts (Slim & Sparse, arXiv 2512.02351 §4.2).

A dense MLP of width ff is cut into E experts of f = ff / E neurons (a partition of its neurons,
`partition.py`); S of them are shared (always on), R = E - S are routed, k per token:

    MoE(x) = f_S(x) + sum_{j in TopK(router(x))} G_j f_Rj(x)                          (Eq. 9)

with the residual (straight-through) gate G = 1 + (p - p.detach()), p = softmax over the k selected
logits: every selected expert contributes with weight exactly 1 in the forward, so with k = R the
MoE *is* the dense MLP, while the router still receives the gradient of p. The experts are the
dense weights, sliced and stacked: `w_gate`, `w_up` (E, f, d) and `w_down` (E, d, f).

Gated (SwiGLU, Qwen2/Llama): f_e(x) = W_down_e (act(W_gate_e x) * (W_up_e x)). Ungated (fc1 -> act
-> fc2, Phi/GPT-J/OPT): f_e(x) = W_down_e act(W_up_e x + b_up_e), no `w_gate`. Up and gate biases
are per neuron, so they are cut with their neurons: `b_up`, `b_gate` (E, f). A down bias (d,)
belongs to no expert: it is added once, `b_down`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from ._experts import grouped_experts, grouped_mm as _grouped_mm, hidden_fn, pad_experts
from ._fused import Spec, fused_moe

IMPLS = ("auto", "loop", "grouped", "fused", "grouped_padded", "masked")


def grouped_mm_supported(d: int, f: int, dtype: torch.dtype) -> bool:
    """Whether `grouped_mm` accepts these widths: every row stride a multiple of 16 bytes."""
    return _grouped_mm is not None and (d * dtype.itemsize) % 16 == 0 and (f * dtype.itemsize) % 16 == 0


# `auto`'s table, measured with bench/moe.py on CPU (BENCHMARKS.md, "MoE MLP (issue 15)"): below either,
# dispatching tokens to experts costs more than running every expert densely under a mask.
MIN_EXPERT_WIDTH = 32  # neurons per expert: 19-neuron experts (d 896) lose to `masked` even at 2,048 tokens
MIN_EXPERT_MACS = 1_500_000  # rows per routed expert x hidden x expert width, per call


def auto_impl(device_type: str, dtype: torch.dtype, hidden: int, expert_size: int, num_experts: int, num_shared: int,
              top_k: int, tokens: int) -> str:
    """The impl `auto` runs for one call: a fixed table, not a timed probe, so the choice is the
    same on every run and every rank for the same shapes (a probe on a machine shared with other
    jobs would pick by their load). From bench/moe.py on CPU (fp32, one thread):

    - `masked` when experts are narrower than MIN_EXPERT_WIDTH or each routed expert's share of
      the call is under MIN_EXPERT_MACS multiply-adds: then a per-expert GEMM is too small to pay
      for its fixed cost (~0.1 ms of dispatch per expert on CPU) and running the dense work under
      a mask is cheaper. The digits model (6-neuron experts), and any layout at a few tokens.
    - otherwise `grouped_padded` on CUDA in bf16/fp16 (one grouped GEMM per projection; a guess
      until bench/moe.py runs on a GPU: none was at hand), `fused` everywhere else (CPU, and CUDA
      fp32, where `grouped_mm` has no kernel).
    """
    rows_per_expert = tokens * top_k / max(1, num_experts - num_shared)
    if expert_size < MIN_EXPERT_WIDTH or rows_per_expert * hidden * expert_size < MIN_EXPERT_MACS:
        return "masked"
    if device_type == "cuda" and dtype in (torch.bfloat16, torch.float16) and grouped_mm_supported(hidden, 16, dtype):
        return "grouped_padded"
    return "fused"


class MoEMLP(nn.Module):
    """A gated or ungated MLP split into S shared + R routed experts, top-k routing (Eq. 9).

    impl (every one computes the same function and gradients; they differ in speed):
    `loop` — the reference: a readable per-expert loop over tokens sorted by expert, autograd
    through it (its backward is slow: per-expert nodes allocate full-size gradients);
    `grouped` — the same sort, then one `grouped_mm` per projection over all experts (runs on CPU
    in fp32 and on CUDA in bf16; widths must keep 16-byte strides as they are);
    `fused` — the whole MLP as one autograd Function, expert by expert, gate and up in one GEMM,
    no (T k, d) copies, the backward written out (`_fused.py`; the CPU path);
    `grouped_padded` — `grouped` with gate and up fused and each expert zero-padded to the
    16-byte rule, so any expert width runs (`_experts.py`; the CUDA bf16 path);
    `masked` — every expert densely, h masked to the selected ones: dense cost, no dispatch (for
    experts too narrow or too few rows for dispatch to pay);
    `auto` — picked per call from device, dtype and shapes by `auto_impl` (a fixed table).

    gated: SwiGLU experts (`w_gate`, `w_up`, `w_down`); False: fc1 -> act -> fc2 (`w_gate` is None).
    up_bias / gate_bias / down_bias: the dense MLP's biases, `b_up`, `b_gate` (E, f) cut with the
    neurons, `b_down` (d,) added once (Llama's `mlp_bias` has all three, Phi/GPT-J up and down).
    hidden_act: an `ACT2FN` name or the dense MLP's own activation module (e.g. `NewGELUActivation`).

    After each sparse forward: `last_load` (R,) long, routed slots per expert; in training also
    `aux_loss`, the Switch load-balancing loss R * sum_j f_j P_j (1.0 when perfectly balanced).
    `extra_flops`: 2 * MACs of the expert matmuls of the last call (the router is an nn.Linear),
    read by `count_flops`. `run_dense` (set by the model for understanding forwards) makes a call
    without `dense=` run every expert with gate 1; `freeze_dense` then also detaches the weights.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, num_shared: int, top_k: int,
                 impl: str = "auto", hidden_act: str | nn.Module = "silu", *, gated: bool = True,
                 up_bias: bool = False, down_bias: bool = False, gate_bias: bool = False):
        super().__init__()
        if intermediate_size % num_experts:
            raise ValueError(f"num_experts={num_experts} must divide intermediate_size={intermediate_size}")
        if not 0 <= num_shared < num_experts or not 1 <= top_k <= num_experts - num_shared:
            raise ValueError(f"need 0 <= num_shared < num_experts and 1 <= top_k <= num_experts - num_shared "
                             f"(got num_experts={num_experts}, num_shared={num_shared}, top_k={top_k})")
        if gate_bias and not gated:
            raise ValueError("gate_bias=True needs gated=True (an ungated MLP has no gate projection)")
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        d, E, f = hidden_size, num_experts, intermediate_size // num_experts
        self.hidden_size, self.expert_size = d, f
        self.num_experts, self.num_shared, self.top_k, self.impl = E, num_shared, top_k, impl
        self.gated = gated
        if gated:
            self.w_gate = nn.Parameter(torch.empty(E, f, d))
        else:
            self.register_parameter("w_gate", None)
        self.w_up = nn.Parameter(torch.empty(E, f, d))
        self.w_down = nn.Parameter(torch.empty(E, d, f))
        self.b_up = nn.Parameter(torch.zeros(E, f)) if up_bias else None
        self.b_gate = nn.Parameter(torch.zeros(E, f)) if gate_bias else None
        self.b_down = nn.Parameter(torch.zeros(d)) if down_bias else None
        self.router = nn.Linear(d, self.num_routed, bias=False)
        self.act_fn = ACT2FN[hidden_act] if isinstance(hidden_act, str) else hidden_act
        self.run_dense = False
        self.freeze_dense = False
        self.aux_loss: torch.Tensor | None = None
        self.last_load = torch.zeros(self.num_routed, dtype=torch.long, device="cpu")  # not meta in from_pretrained
        self.extra_flops = 0

    @property
    def num_routed(self) -> int:
        return self.num_experts - self.num_shared

    @property
    def num_projections(self) -> int:
        """Matmuls per expert: 3 gated (gate, up, down), 2 ungated."""
        return 3 if self.gated else 2

    def expert_parameters(self) -> list[nn.Parameter]:
        """The experts' weights and biases (shared and routed): what Expert-Frozen Tuning freezes.
        The router is not among them."""
        weights = (self.w_gate, self.w_up, self.w_down, self.b_gate, self.b_up, self.b_down)
        return [w for w in weights if w is not None]

    def extra_repr(self) -> str:
        kind = "gated" if self.gated else "ungated"
        biases = (("gate", self.b_gate), ("up", self.b_up), ("down", self.b_down))
        bias = "+".join(n for n, b in biases if b is not None)
        return (f"hidden={self.hidden_size}, experts={self.num_experts} x {self.expert_size} "
                f"(shared {self.num_shared}), top_k={self.top_k}, impl={self.impl}, {kind}"
                + (f", bias={bias}" if bias else ""))

    # ------------------------------------------------------------ from a dense MLP
    @torch.no_grad()
    def load_dense(self, gate: torch.Tensor | None, up: torch.Tensor, down: torch.Tensor, partition: list[torch.Tensor],
                   up_bias: torch.Tensor | None = None, down_bias: torch.Tensor | None = None,
                   gate_bias: torch.Tensor | None = None) -> None:
        """Copies the dense weights, expert e = the neurons `partition[e]`, then `init_router()`.

        gate, up (ff, d); down (d, ff) — `gate_proj.weight`, `up_proj.weight`, `down_proj.weight`
        (ungated: gate=None, up = `fc1.weight`, down = `fc2.weight`). up_bias, gate_bias (ff,),
        down_bias (d,): the biases, required exactly when the module was built with them.
        """
        if len(partition) != self.num_experts or any(len(p) != self.expert_size for p in partition):
            raise ValueError(f"partition must be {self.num_experts} experts of {self.expert_size} neurons, got "
                             f"{[len(p) for p in partition]}")
        for name, given, have in (("gate", gate, self.w_gate), ("up_bias", up_bias, self.b_up),
                                  ("gate_bias", gate_bias, self.b_gate), ("down_bias", down_bias, self.b_down)):
            if (given is None) != (have is None):
                raise ValueError(f"{name} must be given exactly when the MoEMLP has it ({self.extra_repr()}; "
                                 f"got {name}={'None' if given is None else 'a tensor'})")
        index = torch.stack([torch.as_tensor(p) for p in partition]).to(up.device)  # (E, f)
        if gate is not None:
            self.w_gate.copy_(gate[index])  # (E, f, d)
        self.w_up.copy_(up[index])
        self.w_down.copy_(down[:, index].permute(1, 0, 2))  # (d, E, f) -> (E, d, f)
        if up_bias is not None:
            self.b_up.copy_(up_bias[index])  # (E, f)
        if gate_bias is not None:
            self.b_gate.copy_(gate_bias[index])
        if down_bias is not None:
            self.b_down.copy_(down_bias)
        self.init_router()

    @torch.no_grad()
    def init_router(self) -> None:
        """Router row j = sum over the neurons i of routed expert j of ||W_down[:, i]|| * W_in[i],
        W_in the gate projection (gated) or the up projection (ungated).

        A linear estimate of how strongly expert j fires on x (a neuron contributes when its
        pre-activation W_in[i] x is large, in proportion to the norm of its output column), so
        top-k already prefers the active experts at step 0 instead of breaking ties by index.
        Scaled so the rows have mean norm 1: logits of order 1 for unit-variance inputs.
        """
        S = self.num_shared
        w_in = self.w_gate if self.gated else self.w_up
        down_norm = self.w_down[S:].float().norm(dim=1)  # (R, f)
        rows = torch.einsum("rf,rfd->rd", down_norm, w_in[S:].float())  # (R, d)
        rows = rows / rows.norm(dim=1).mean().clamp_min(1e-12)
        self.router.weight.copy_(rows)

    @torch.no_grad()
    def router_stats(self, x: torch.Tensor, chunk: int = 4096) -> dict[str, torch.Tensor]:
        """Sufficient statistics to fit the router on sample inputs x (..., d), float64, summable
        over batches: `xtx` = X^T X (d, d), `xty` = X^T Y (d, R) with Y the norm of each routed
        expert's output, `n` the number of rows."""
        x = x.reshape(-1, self.hidden_size)
        S, R = self.num_shared, self.num_routed
        stats = {"xtx": x.new_zeros(self.hidden_size, self.hidden_size, dtype=torch.float64),
                 "xty": x.new_zeros(self.hidden_size, R, dtype=torch.float64),
                 "n": x.new_tensor(float(len(x)), dtype=torch.float64)}
        for xc in x.split(chunk):  # (n, d)
            h = self._hidden(xc, S, self.num_experts)  # (n, R * f)
            y = torch.einsum("nrf,rdf->nrd", h.view(len(xc), R, -1), self.w_down[S:]).norm(dim=-1)  # (n, R)
            stats["xtx"] += xc.double().T @ xc.double()
            stats["xty"] += xc.double().T @ y.double()
        return stats

    @torch.no_grad()
    def fit_router(self, stats: dict[str, torch.Tensor], ridge: float = 1e-6) -> None:
        """Least-squares router from `router_stats`: logit_j(x) ~ ||f_Rj(x)||, a calibrated
        alternative to `init_router`. Scaled to logits of root-mean-square 1 on the samples."""
        xtx, xty = stats["xtx"], stats["xty"]
        reg = ridge * xtx.diagonal().mean().clamp_min(1e-12) * torch.eye(len(xtx), dtype=xtx.dtype, device=xtx.device)
        w = torch.linalg.solve(xtx + reg, xty).T  # (R, d)
        rms = (torch.einsum("rd,de,re->", w, xtx, w) / (stats["n"] * len(w))).sqrt()
        self.router.weight.copy_(w / rms.clamp_min(1e-12))

    # ------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, dense: bool | None = None) -> torch.Tensor:
        """x (..., d) -> (..., d). `dense=True`: every expert, gate 1 (= the dense MLP);
        `None`: `self.run_dense`."""
        dense = self.run_dense if dense is None else dense
        shape, d = x.shape, self.hidden_size
        x = x.reshape(-1, d)  # (N, d)
        N, S, E, f = x.shape[0], self.num_shared, self.num_experts, self.expert_size
        per_expert = 2 * N * self.num_projections * d * f
        if dense:
            self.extra_flops = per_expert * E
            return self._add_down_bias(self._experts_dense(x, 0, E, detach=self.freeze_dense),
                                       detach=self.freeze_dense).view(shape)
        logits = self.router(x).float()  # (N, R)
        impl = self.resolve_impl(x)
        if impl == "masked":  # no top-k indices: a selection mask, every expert run densely
            gates = self._masked_gates(logits).to(x.dtype)  # (N, R), 0 off the top k
            out = self._experts_dense(x, 0, E, mask=torch.cat([gates.new_ones(N, S), gates], dim=1))
            load = (gates != 0).sum(0)
        else:
            top = torch.sort(logits, dim=-1, descending=True, stable=True).indices[:, : self.top_k]  # (N, k) ties: idx
            p = torch.softmax(logits.gather(-1, top), dim=-1)  # (N, k)
            gate = (1.0 + (p - p.detach())).to(x.dtype)  # (N, k): exactly 1 forward, d/dp = 1 backward
            if impl == "fused":
                token, g, counts = self._sorted_slots(top, gate)
                spec = Spec(S, counts.tolist(), self.act_fn, unit_gate=bool((g == 1).all()))
                out = fused_moe(x, g, token, spec, self.w_gate, self.w_up, self.w_down, self.b_gate, self.b_up)
            else:  # the shared experts (one dense MLP of width S * f) + the routed ones
                routed = {"loop": self._routed_loop, "grouped": self._routed_grouped,
                          "grouped_padded": self._routed_padded}[impl]
                out = self._experts_dense(x, 0, S) + routed(x, top, gate)
            load = torch.bincount(top.flatten(), minlength=self.num_routed)  # (R,)
        out = self._add_down_bias(out)  # (N, d)
        self.last_load = load.detach()
        if self.training and N > 0:
            frac = load.float() / (N * self.top_k)  # f_j: share of routed slots
            prob = torch.softmax(logits, dim=-1).mean(0)  # P_j: mean router probability
            self.aux_loss = self.num_routed * (frac * prob).sum()
        self.extra_flops = per_expert * (S + self.top_k)
        return out.view(shape)

    def resolve_impl(self, x: torch.Tensor) -> str:
        """The impl a sparse forward on x runs: `self.impl`, or for `auto` the pick of `auto_impl`."""
        if self.impl != "auto":
            self._use_grouped(x)  # raises for `grouped` off the stride rule
            if self.impl == "grouped_padded" and not grouped_mm_supported(self.hidden_size, 16, x.dtype):
                raise ValueError(f"impl='grouped_padded' pads the expert width, not the hidden size: "
                                 f"{self.hidden_size} in {x.dtype} breaks the 16-byte rule (use impl='fused')")
            return self.impl
        return auto_impl(x.device.type, x.dtype, self.hidden_size, self.expert_size, self.num_experts,
                         self.num_shared, self.top_k, x.shape[0])

    def _use_grouped(self, x: torch.Tensor) -> bool:
        """Whether the plain `grouped` path runs (it needs 16-byte strides as they are)."""
        if self.impl not in ("auto", "grouped"):
            return False
        ok = grouped_mm_supported(self.hidden_size, self.expert_size, x.dtype)
        if self.impl == "grouped":
            if not ok:
                raise ValueError(f"impl='grouped' needs 16-byte row strides: hidden {self.hidden_size} and expert width "
                                 f"{self.expert_size} in {x.dtype} do not give them (use impl='grouped_padded' or "
                                 f"'auto')")
            return True
        return self.resolve_impl(x) == "grouped"

    def _add_down_bias(self, out: torch.Tensor, detach: bool = False) -> torch.Tensor:
        if self.b_down is None:
            return out
        return out + (self.b_down.detach() if detach else self.b_down)

    def _act(self, a_gate: torch.Tensor | None, a_up: torch.Tensor) -> torch.Tensor:
        """The hidden activations from the pre-activations (bias included): act(gate) * up, or act(up)."""
        return self.act_fn(a_up) if a_gate is None else self.act_fn(a_gate) * a_up

    def _hidden(self, x: torch.Tensor, lo: int, hi: int, detach: bool = False) -> torch.Tensor:
        """Hidden activations of experts lo..hi-1 on every row, (N, d) -> (N, (hi - lo) * f)."""
        d = self.hidden_size
        w_gate, w_up, b_gate, b_up = (None if w is None else w[lo:hi]
                                      for w in (self.w_gate, self.w_up, self.b_gate, self.b_up))
        if detach:
            w_gate, w_up, b_gate, b_up = (None if w is None else w.detach() for w in (w_gate, w_up, b_gate, b_up))
        flat = lambda b: None if b is None else b.reshape(-1)  # noqa: E731
        a_gate = None if w_gate is None else F.linear(x, w_gate.reshape(-1, d), flat(b_gate))
        return self._act(a_gate, F.linear(x, w_up.reshape(-1, d), flat(b_up)))

    def _experts_dense(self, x: torch.Tensor, lo: int, hi: int, detach: bool = False,
                       mask: torch.Tensor | None = None) -> torch.Tensor:
        """Experts lo..hi-1 as one dense MLP of width (hi - lo) * f, no down bias.  x (N, d) -> (N, d).
        mask (N, hi - lo): each expert's h scaled per row (`masked`: its gate, 0 when not selected)."""
        w_down = self.w_down[lo:hi].detach() if detach else self.w_down[lo:hi]
        h = self._hidden(x, lo, hi, detach)  # (N, n * f)
        if mask is not None:
            h = (h.view(len(x), hi - lo, self.expert_size) * mask[:, :, None]).view(h.shape)
        return F.linear(h, w_down.transpose(0, 1).reshape(self.hidden_size, -1))  # (d, n, f) -> (d, n * f)

    def _masked_gates(self, logits: torch.Tensor) -> torch.Tensor:
        """The routed gates as an (N, R) matrix: G = 1 + (p - p.detach()) on each row's top k, 0
        elsewhere. The same selection as the sorted path (ties to the lower index) from the k-th
        largest value and a rank among ties, no sort; p = softmax over the selected logits (the
        others masked to -inf), so values and gradients are those of Eq. 9. Without autograd the
        gates are just the selection (G = 1)."""
        k, R = self.top_k, logits.shape[-1]
        kth = logits.kthvalue(R - k + 1, dim=-1, keepdim=True).values  # (N, 1) the k-th largest logit
        above, tied = logits > kth, logits == kth
        selected = above | (tied & (tied.cumsum(-1) <= k - above.sum(-1, keepdim=True)))  # (N, R), k per row
        if not (torch.is_grad_enabled() and logits.requires_grad):
            return selected.to(logits.dtype)
        p = torch.softmax(logits.masked_fill(~selected, float("-inf")), dim=-1)
        return (1.0 + (p - p.detach())) * selected

    def _fused_in(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Experts lo..hi-1's input projection as one: w_in (n, m, d), b_in (n, m) or None, rows
        [gate | up] per expert (m = 2f) gated, the up projection (m = f) ungated. A copy when gated
        (the parameters stay `w_gate`, `w_up`); the gradient flows back through it."""
        if not self.gated:
            return self.w_up[lo:hi], None if self.b_up is None else self.b_up[lo:hi]
        w_in = torch.cat([self.w_gate[lo:hi], self.w_up[lo:hi]], dim=1)
        if self.b_gate is None and self.b_up is None:
            return w_in, None
        zero = self.w_up.new_zeros(hi - lo, self.expert_size)
        return w_in, torch.cat([zero if b is None else b[lo:hi] for b in (self.b_gate, self.b_up)], dim=1)

    def _routed_padded(self, x: torch.Tensor, top: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """`grouped` with gate and up fused and the experts zero-padded to the 16-byte rule."""
        S, E, f = self.num_shared, self.num_experts, self.expert_size
        token, g, counts = self._sorted_slots(top, gate)
        w_in, b_in = self._fused_in(S, E)
        w_in, b_in, w_down, fp = pad_experts(w_in, b_in, self.w_down[S:], f, self.gated)
        return grouped_experts(x, token, g, counts, w_in, b_in, w_down, hidden_fn(self.act_fn, self.gated, fp))

    def _sorted_slots(self, top: torch.Tensor, gate: torch.Tensor):
        """The N * k (token, expert) slots sorted by expert: token index, gate, tokens per expert."""
        k = top.shape[1]
        order = torch.argsort(top.flatten(), stable=True)  # (N * k,)
        counts = torch.bincount(top.flatten(), minlength=self.num_routed)  # (R,)
        return order // k, gate.flatten()[order], counts

    def _routed_loop(self, x: torch.Tensor, top: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """Reference: for each routed expert, gather its tokens, run its MLP, scatter-add back."""
        token, g, counts = self._sorted_slots(top, gate)
        out = torch.zeros_like(x)  # (N, d)
        start = 0
        for j, n in enumerate(counts.tolist()):
            if n == 0:
                continue
            e, rows = self.num_shared + j, token[start : start + n]
            xj = x[rows]  # (n, d)
            bias = lambda b: None if b is None else b[e]  # noqa: E731
            a_gate = None if self.w_gate is None else F.linear(xj, self.w_gate[e], bias(self.b_gate))
            h = self._act(a_gate, F.linear(xj, self.w_up[e], bias(self.b_up)))  # (n, f)
            out.index_add_(0, rows, F.linear(h, self.w_down[e]) * g[start : start + n, None])
            start += n
        return out

    def _routed_grouped(self, x: torch.Tensor, top: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """The same sort; then one grouped GEMM per projection, expert j on rows offs[j-1]:offs[j]."""
        token, g, counts = self._sorted_slots(top, gate)
        offs = torch.cumsum(counts, 0).to(torch.int32)  # (R,) group ends; offs[-1] = N * k
        xs = x[token]  # (N * k, d)
        S = self.num_shared

        def project(w, b):  # (N * k, f); a bias: each slot its expert's
            a = _grouped_mm(xs, w[S:].transpose(-2, -1), offs=offs)
            return a if b is None else a + b[S:].repeat_interleave(counts, dim=0)

        a_gate = None if self.w_gate is None else project(self.w_gate, self.b_gate)
        a_up = project(self.w_up, self.b_up)
        ys = _grouped_mm(self._act(a_gate, a_up), self.w_down[S:].transpose(-2, -1), offs=offs)  # (N * k, d)
        return torch.zeros_like(x).index_add_(0, token, ys * g[:, None])
