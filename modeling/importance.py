"""Importance scores (Slim & Sparse, arXiv 2512.02351 §3) from sufficient statistics.

Two halves, kept apart so the math is testable on its own:
- pure functions (`neuron_scores`, `head_scores`, ...) turn float64 sums and counts into scores;
- `CalibrationRecorder` hooks a model (through `HookSet`) and accumulates those sums over any
  number of forwards. Its `stats()` are plain tensors keyed by module name: statistics from
  several workers are reduced by adding them (`merge_stats`), so N workers give exactly the
  single-process scores.

Statistics recorded per layer i (names from the adapter):
  `layer.{i}.block_cos`, `.attn_cos`, `.mlp_cos`: sum over tokens of cos(input, output) of the
      block, of the attention sublayer (x → x + attn) and of the MLP sublayer (Eq. 3), `.tokens`;
  `{mlp}.abs_sum` (ff,), `{mlp}.tokens`: sum of |h| for h the gated activation entering down_proj;
  `{o_proj}.head_norm_sum` (H,), `{o_proj}.tokens`: sum of ‖z_h‖₂ of each head's output entering o_proj.

What they cost (issue 15). A layer's statistics take a few passes over tensors the layer has just
made: three norms and three dot products per token for the three cosines, one pass over h for the
neuron sums (in L2-sized chunks of real rows on CPU), one norm per head. Reductions run in the activations'
own precision with torch's pairwise sums (float32 at least) and accumulate in float64 on the
activations' device, so no activation is copied to float64 and nothing waits for the device
before `stats()`; the order is fixed, so two runs give bit-identical statistics. A forward run
through `CalibrationRecorder.run(fn, stop_early=True)` ends after the last decoder layer: the LM
head (151,936 words on Qwen2, a quarter of a 0.5B model's forward) and any generation head, which
no statistic reads, never run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, TypeVar

import torch
from torch import nn

from .adapters import Adapter
from .hooks import HookSet


# ---------------------------------------------------------------------------------------------
# Math


def neuron_scores(abs_sum: torch.Tensor, count: torch.Tensor | float, w_down: torch.Tensor) -> torch.Tensor:
    """Eq. 7: s_i = E_x[|h_i|] · ‖W_down[:, i]‖₂.  abs_sum (ff,), w_down (d, ff) → (ff,) float64."""
    return (abs_sum.double() / float(count)) * w_down.detach().double().norm(dim=0)


def head_scores(norm_sum: torch.Tensor, count: torch.Tensor | float, w_o: torch.Tensor, num_heads: int) -> torch.Tensor:
    """A head's contribution through o_proj: E‖z_h‖₂ · ‖W_o[:, h·hd:(h+1)·hd]‖_F.  → (H,) float64."""
    d, width = w_o.shape
    w = w_o.detach().double().view(d, num_heads, width // num_heads)  # (d, H, hd)
    return (norm_sum.double() / float(count)) * w.pow(2).sum(dim=(0, 2)).sqrt()


def kv_group_scores(head: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """GQA: query heads h·(H/KV) … share KV head h; a group's score is the sum of its heads'."""
    return head.view(num_kv_heads, -1).sum(dim=1)


def top_overlap(a: torch.Tensor, b: torch.Tensor, frac: float = 0.5) -> float:
    """|top-k(a) ∩ top-k(b)| / k with k = frac · n (the paper's Figure 2)."""
    k = max(1, int(round(frac * a.numel())))
    ta, tb = set(a.topk(k).indices.tolist()), set(b.topk(k).indices.tolist())
    return len(ta & tb) / k


def merge_stats(parts: Iterable[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Exact reduction of sufficient statistics from several workers (all sums)."""
    out: dict[str, torch.Tensor] = {}
    for part in parts:
        for k, v in part.items():
            out[k] = out[k] + v if k in out else v.clone()
    return out


# ---------------------------------------------------------------------------------------------
# Reductions: one layer's statistics from the tensors its hooks see

_EPS = 1e-8  # F.cosine_similarity's: each norm is clamped to at least this
_CPU_CHUNK = 1 << 18  # elements of h per CPU chunk (1 MiB in float32): |h| is summed while in L2


def _wide(x: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 → float32 (a dot product must not round to 8 bits); wider dtypes as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _cos_sums(x: torch.Tensor, mid: torch.Tensor, out: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Σ over real tokens of cos(x, mid), cos(x, out), cos(mid, out) → (3,) float64 (attn, block, mlp).

    x, mid, out (B, T, d) or (N, d); `mid is x` when the attention sublayer is gone (the identity).
    keep (B, T) bool or None. cos(a, b) = a·b / (max(‖a‖, ε) · max(‖b‖, ε)), as F.cosine_similarity
    (which takes six passes and three temporaries per pair; this is one pass per norm and per dot).
    """
    x, out = _wide(x), _wide(out)
    nx, no = torch.linalg.vector_norm(x, dim=-1), torch.linalg.vector_norm(out, dim=-1)  # (B, T)
    if mid is x:
        mid, nm, d_xm = x, nx, nx * nx
    else:
        mid = _wide(mid)
        nm, d_xm = torch.linalg.vector_norm(mid, dim=-1), torch.linalg.vecdot(x, mid)
    d_xo, d_mo = torch.linalg.vecdot(x, out), torch.linalg.vecdot(mid, out)  # (B, T)
    nx, nm, no = nx.clamp_min(_EPS), nm.clamp_min(_EPS), no.clamp_min(_EPS)
    cos = torch.stack([d_xm / (nx * nm), d_xo / (nx * no), d_mo / (nm * no)])  # (3, B, T)
    if keep is not None:
        cos = torch.where(keep, cos, 0.0)  # not a product: a padding row may hold NaN
    return cos.flatten(1).sum(1, dtype=torch.float64)


def _abs_sum(h: torch.Tensor, pad: torch.Tensor | None, spans: list[tuple[int, int]] | None) -> torch.Tensor:
    """Σ_t |h_t| over the real rows of h (N, ff) → (ff,) float64.

    The real rows are those not flagged in pad (N,) bool on a GPU, and the runs [start, end) of
    `spans` on CPU (None: every row). On CPU h is read once, in chunks of rows: |chunk| goes to a
    buffer that stays in L2 and is summed there, so no |h| temporary (40 MB at Qwen2-0.5B widths),
    no float64 copy (`sum(dtype=torch.float64)` would make one) and no masking pass (padding rows
    are never read). Each chunk is summed pairwise in float32, the chunks in float64.
    """
    acc = _acc(h.dtype)
    if h.device.type != "cpu":  # one kernel each; the caching allocator makes the temporary cheap
        a = h.abs()
        if pad is not None:
            a.masked_fill_(pad[:, None], 0)  # not a product: a padding row may hold NaN
        return a.sum(0, dtype=acc).double()
    n, ff = h.shape
    rows = max(1, _CPU_CHUNK // ff)
    buf = torch.empty(min(rows, n), ff, dtype=h.dtype)
    total = torch.zeros(ff, dtype=torch.float64)
    for first, end in [(0, n)] if spans is None else spans:
        for start in range(first, end, rows):
            stop = min(start + rows, end)
            total += torch.abs(h[start:stop], out=buf[:stop - start]).sum(0, dtype=acc)  # (ff,)
    return total


def _head_norm_sum(z: torch.Tensor, num_heads: int, head_dim: int, pad: torch.Tensor | None) -> torch.Tensor:
    """Σ_t ‖z_{t,h}‖₂ over the rows of z (N, H·hd) not flagged in pad → (H,) float64."""
    norms = torch.linalg.vector_norm(z.reshape(-1, num_heads, head_dim), dim=-1, dtype=_acc(z.dtype))  # (N, H)
    if pad is not None:
        norms = norms.masked_fill(pad[:, None], 0)
    return norms.sum(0, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# Recording


def _tensor(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _hidden(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


@dataclass(frozen=True)
class _Masking:
    """The token mask as the reductions use it, made once per mask and device."""

    keep: torch.Tensor | None  # (B, T) bool on the activations' device; None: every token is real
    pad: torch.Tensor | None  # (B·T,) bool, ~keep flattened
    count: int | torch.Tensor  # real tokens per (B, T) tensor: an int, or a float64 device tensor
    spans: list[tuple[int, int]] | None = None  # CPU: the runs [start, end) of real rows of the B·T

    @staticmethod
    def of(keep: torch.Tensor) -> _Masking:
        """From a (B, T) bool mask on the activations' device. On CPU, where looking at the mask
        costs no wait, a mask of real tokens only is dropped and the real rows are listed as runs."""
        if keep.device.type != "cpu":
            return _Masking(keep, ~keep.reshape(-1), keep.sum(dtype=torch.float64))
        flat = keep.reshape(-1)
        if bool(flat.all()):
            return _Masking(None, None, flat.numel())
        edges = [0, *(torch.nonzero(flat[1:] != flat[:-1]).flatten() + 1).tolist(), flat.numel()]
        spans = [(a, b) for a, b in zip(edges[:-1], edges[1:]) if flat[a]]
        return _Masking(keep, ~flat, sum(b - a for a, b in spans), spans)


class _StopForward(BaseException):
    """Ends a forward after its last decoder layer (`CalibrationRecorder.run(..., stop_early=True)`).

    A BaseException, like GeneratorExit: a model's own `except Exception` must not swallow it."""

    def __init__(self, recorder: CalibrationRecorder):
        super().__init__("stopped after the last decoder layer")
        self.recorder = recorder


_R = TypeVar("_R")


class CalibrationRecorder:
    """Accumulates the statistics above while the model runs calibration batches.

    Set `token_mask` ((B, T) bool, True = a real token) before each forward to leave padding
    out; set `bucket` (e.g. a denoising-step bucket) to also keep statistics per bucket.

    Any forward inside the `with` block is recorded. A single forward whose output is not needed
    can skip everything after the last decoder layer:

        with CalibrationRecorder(model, adapter, components) as recorder:
            recorder.token_mask = mask
            recorder.run(lambda: model(input_ids=ids, attention_mask=mask), stop_early=True)  # → None

    `stop_early` (here, or for every `run` through the constructor) raises a private exception from
    the last decoder layer's hook once its statistics are taken and catches it in `run`. Leave it
    off for a loop that needs each forward's output (a denoising loop: it would end in its first
    step); a forward that skips the last layer just runs to its end. Calls of the model outside
    `run` never stop.
    """

    def __init__(self, model: nn.Module, adapter: Adapter, components: Iterable[str] = ("und", "gen"),
                 stop_early: bool = False):
        self.model, self.adapter = model, adapter
        self.bucket: str | None = None
        self.stop_early = stop_early
        self._token_mask: torch.Tensor | None = None
        self._masking: tuple[torch.device, _Masking] | None = None  # made from token_mask on first use
        self._sums: dict[str, torch.Tensor] = {}  # float64, on the activations' device
        self._counts: dict[str, int] = {}  # token counts known on the host
        self._inputs: dict[int, torch.Tensor] = {}
        self._mids: dict[int, torch.Tensor] = {}
        self._stop_at: int | None = None  # the layer whose hook ends the forward (inside `run` only)
        self._entered = False
        self.mlps = {m.name: m for c in components for m in adapter.mlps(model, c)}  # shared: one entry
        self.attns = {a.o_name: a for c in components for a in adapter.attentions(model, c)}
        self._hooks = HookSet(model)

    # -- lifecycle
    def __enter__(self) -> CalibrationRecorder:
        layers = self.adapter.decoder_layers(self.model)
        for i, layer in enumerate(layers):
            name = f"{self.adapter.layers}.{i}"
            self._hooks.pre(name, lambda n, m, a, k, i=i: self._layer_in(i, a, k))
            if hasattr(layer, self.adapter.attention):  # else pruned away: attention is the identity
                self._hooks.post(f"{name}.{self.adapter.attention}", lambda n, m, a, k, o, i=i: self._attn_out(i, o))
            self._hooks.post(name, lambda n, m, a, k, o, i=i: self._layer_out(i, o))
        for name, mlp in self.mlps.items():
            self._hooks.pre(mlp.down_name, lambda n, m, a, k, key=name: self._mlp_in(key, a[0]))
        for o_name in self.attns:
            self._hooks.pre(o_name, lambda n, m, a, k, key=o_name: self._o_in(key, a[0]))
        self._hooks.__enter__()
        self._entered = True
        return self

    def __exit__(self, *exc) -> None:
        self._entered = False
        self._inputs.clear()
        self._mids.clear()
        self._hooks.__exit__(*exc)

    def run(self, fn: Callable[[], _R], stop_early: bool | None = None) -> _R | None:
        """`fn()` (a model forward) under the hooks: its result, or None when it was stopped early.

        stop_early (default: the constructor's): end the forward once the last decoder layer's
        statistics are taken (see the class docstring)."""
        if not self._entered:
            raise RuntimeError("CalibrationRecorder.run needs the hooks: call it inside `with CalibrationRecorder(...)`")
        stop = self.stop_early if stop_early is None else stop_early
        self._stop_at = len(self.adapter.decoder_layers(self.model)) - 1 if stop else None
        try:
            return fn()
        except _StopForward as e:
            if e.recorder is not self:
                raise
            return None
        finally:
            self._stop_at = None
            self._inputs.clear()  # a forward that failed half-way leaves its layers' inputs behind
            self._mids.clear()

    @property
    def require_data(self) -> bool:
        """Raise on leaving if a hooked module saw no data; turn off for a legitimately empty shard."""
        return self._hooks.require_data

    @require_data.setter
    def require_data(self, value: bool) -> None:
        self._hooks.require_data = value

    @property
    def token_mask(self) -> torch.Tensor | None:
        """(B, T) bool, True = a real token; None = every token is real."""
        return self._token_mask

    @token_mask.setter
    def token_mask(self, mask: torch.Tensor | None) -> None:
        self._token_mask, self._masking = mask, None

    # -- accumulation
    def _add(self, key: str, value: torch.Tensor | int) -> None:
        """Add a float64 device tensor (or an int count) to `key` and to the current bucket's `key`."""
        for k in (key,) if self.bucket is None else (key, f"bucket.{self.bucket}/{key}"):
            if isinstance(value, int):
                self._counts[k] = self._counts.get(k, 0) + value
            elif k in self._sums:
                self._sums[k].add_(value)
            else:
                self._sums[k] = value.clone()  # value may be a view shared by several keys

    def _mask_for(self, x: torch.Tensor) -> _Masking:
        """The masking of x (B, T, ·); 2-D inputs (N, ·) are rows already routed: all are counted."""
        if x.dim() != 3 or self._token_mask is None:
            return _Masking(None, None, x.shape[0] if x.dim() != 3 else x.shape[0] * x.shape[1])
        if self._token_mask.shape != x.shape[:2]:
            raise ValueError(f"token_mask of shape {tuple(self._token_mask.shape)} does not match activations "
                             f"{tuple(x.shape)} (B, T, ·)")
        if self._masking is None or self._masking[0] != x.device:
            self._masking = (x.device, _Masking.of(self._token_mask.to(x.device, torch.bool)))
        return self._masking[1]

    def _layer_in(self, i: int, args, kwargs) -> None:
        self._inputs[i] = _hidden(args, kwargs).detach()

    def _attn_out(self, i: int, output) -> None:
        self._mids[i] = self._inputs[i] + _tensor(output).detach()  # the residual sum x + attn, as the layer forms it

    def _layer_out(self, i: int, output) -> None:
        x, out = self._inputs.pop(i), _tensor(output).detach()
        mid = self._mids.pop(i, x)  # no attention sublayer: it is the identity
        masking = self._mask_for(x)
        attn, block, mlp = _cos_sums(x, mid, out, masking.keep)
        self._add(f"layer.{i}.attn_cos", attn)
        self._add(f"layer.{i}.block_cos", block)
        self._add(f"layer.{i}.mlp_cos", mlp)
        self._add(f"layer.{i}.tokens", masking.count)
        if i == self._stop_at:
            raise _StopForward(self)

    def _mlp_in(self, name: str, h: torch.Tensor) -> None:  # h (B, T, ff) or (N, ff)
        h = h.detach()
        masking = self._mask_for(h)
        self._add(f"{name}.abs_sum", _abs_sum(h.reshape(-1, h.shape[-1]), masking.pad, masking.spans))  # Σ|h|
        self._add(f"{name}.tokens", masking.count)

    def _o_in(self, name: str, z: torch.Tensor) -> None:  # z (B, T, H·hd) or (N, H·hd)
        ref, z = self.attns[name], z.detach()
        masking = self._mask_for(z)
        self._add(f"{name}.head_norm_sum", _head_norm_sum(z, ref.num_heads, ref.head_dim, masking.pad))
        self._add(f"{name}.tokens", masking.count)

    def stats(self) -> dict[str, torch.Tensor]:
        """Every sum so far as float64 CPU tensors (the only point that waits for the device)."""
        out = {}
        for k in dict.fromkeys([*self._sums, *self._counts]):
            total = self._sums[k].cpu() if k in self._sums else torch.zeros((), dtype=torch.float64)
            out[k] = total + self._counts.get(k, 0)  # a new tensor: never the accumulator itself
        return out


def scores_from_stats(stats: dict[str, torch.Tensor], model: nn.Module, adapter: Adapter,
                      components: Iterable[str] = ("und", "gen"), prefix: str = "") -> dict[str, torch.Tensor]:
    """Scores for one set of statistics (`prefix` selects a bucket, e.g. "bucket.0/").

    Returns `layer_importance.{block,attn,mlp}` (L,) as 1 − mean cosine (higher = more important),
    `{mlp}.neuron` (ff,), `{o_proj}.head` (H,) and `{o_proj}.kv_group` (KV,), all float64.
    """
    n_layers = len(adapter.decoder_layers(model))
    out: dict[str, torch.Tensor] = {}
    tokens = torch.stack([stats[f"{prefix}layer.{i}.tokens"] for i in range(n_layers)])
    for part in ("block", "attn", "mlp"):
        cos = torch.stack([stats[f"{prefix}layer.{i}.{part}_cos"] for i in range(n_layers)]) / tokens
        out[f"layer_cos.{part}"] = cos
        out[f"layer_importance.{part}"] = 1.0 - cos
    for c in components:
        for mlp in adapter.mlps(model, c):
            if f"{prefix}{mlp.name}.abs_sum" in stats:
                out[f"{mlp.name}.neuron"] = neuron_scores(stats[f"{prefix}{mlp.name}.abs_sum"],
                                                          stats[f"{prefix}{mlp.name}.tokens"], mlp.down.weight)
        for attn in adapter.attentions(model, c):
            if f"{prefix}{attn.o_name}.head_norm_sum" in stats:
                head = head_scores(stats[f"{prefix}{attn.o_name}.head_norm_sum"],
                                   stats[f"{prefix}{attn.o_name}.tokens"], attn.o.weight, attn.num_heads)
                out[f"{attn.o_name}.head"] = head
                out[f"{attn.o_name}.kv_group"] = kv_group_scores(head, attn.num_kv_heads)
    return out
