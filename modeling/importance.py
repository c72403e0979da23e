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
"""

from __future__ import annotations

from collections import defaultdict
from typing import Iterable

import torch
import torch.nn.functional as F
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
# Recording


def _tensor(output) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _hidden(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


class CalibrationRecorder:
    """Accumulates the statistics above while the model runs calibration batches.

    Set `token_mask` ((B, T) bool, True = a real token) before each forward to leave padding
    out; set `bucket` (e.g. a denoising-step bucket) to also keep statistics per bucket.
    """

    def __init__(self, model: nn.Module, adapter: Adapter, components: Iterable[str] = ("und", "gen")):
        self.model, self.adapter = model, adapter
        self.token_mask: torch.Tensor | None = None
        self.bucket: str | None = None
        self._sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), dtype=torch.float64))
        self._inputs: dict[int, torch.Tensor] = {}
        self._mids: dict[int, torch.Tensor] = {}
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
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)

    @property
    def require_data(self) -> bool:
        """Raise on leaving if a hooked module saw no data; turn off for a legitimately empty shard."""
        return self._hooks.require_data

    @require_data.setter
    def require_data(self, value: bool) -> None:
        self._hooks.require_data = value

    # -- accumulation
    def _add(self, key: str, value: torch.Tensor) -> None:
        value = value.detach().double().cpu()
        for prefix in ("",) if self.bucket is None else ("", f"bucket.{self.bucket}/"):
            self._sums[prefix + key] = self._sums[prefix + key] + value

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ·) → (N, ·) real tokens only; 2-D inputs (tokens already routed) pass as they are.

        Gathering copies the activations, so it is skipped when every token is real."""
        mask = self.token_mask
        if x.dim() == 3 and mask is not None and not (mask.shape == x.shape[:2] and bool(mask.all())):
            return x[mask.to(x.device)]
        return x.reshape(-1, x.shape[-1])

    def _cos_sum(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Σ over real tokens of cos(a, b): computed on every token, the padding masked out of the sum
        (cheaper than gathering two copies of the real rows)."""
        cos = F.cosine_similarity(a.float(), b.float(), dim=-1)  # (B, T) or (N,)
        if a.dim() == 3 and self.token_mask is not None:
            cos = torch.where(self.token_mask.to(cos.device), cos, 0.0)
        return cos.sum(dtype=torch.float64)

    def _layer_in(self, i: int, args, kwargs) -> None:
        self._inputs[i] = _hidden(args, kwargs).detach()

    def _attn_out(self, i: int, output) -> None:
        x = self._inputs[i]
        mid = x + _tensor(output).detach()
        self._mids[i] = mid
        self._add(f"layer.{i}.attn_cos", self._cos_sum(x, mid))

    def _layer_out(self, i: int, output) -> None:
        x, out = self._inputs.pop(i), _tensor(output).detach()
        if i in self._mids:
            mid = self._mids.pop(i)
        else:  # the attention sublayer was pruned away: it is the identity
            mid = x
            self._add(f"layer.{i}.attn_cos", self._cos_sum(x, x))
        self._add(f"layer.{i}.block_cos", self._cos_sum(x, out))
        self._add(f"layer.{i}.mlp_cos", self._cos_sum(mid, out))
        n = x.shape[0] if x.dim() == 2 else (int(self.token_mask.sum()) if self.token_mask is not None else x.shape[0] * x.shape[1])
        self._add(f"layer.{i}.tokens", torch.tensor(float(n)))

    def _mlp_in(self, name: str, h: torch.Tensor) -> None:  # h (B, T, ff) or (N, ff)
        rows = self._rows(h.detach())
        self._add(f"{name}.abs_sum", torch.linalg.vector_norm(rows, ord=1, dim=0, dtype=torch.float64))  # Σ|h|
        self._add(f"{name}.tokens", torch.tensor(float(rows.shape[0])))

    def _o_in(self, name: str, z: torch.Tensor) -> None:  # z (B, T, H·hd) or (N, H·hd)
        ref = self.attns[name]
        rows = self._rows(z.detach()).view(-1, ref.num_heads, ref.head_dim)
        self._add(f"{name}.head_norm_sum", torch.linalg.vector_norm(rows, dim=-1, dtype=torch.float64).sum(0))
        self._add(f"{name}.tokens", torch.tensor(float(rows.shape[0])))

    def stats(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self._sums.items()}


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
