"""The pieces of an autoregressive decoding loop that FlashU's techniques act on.

- `DecodeStep`: what a step hook sees before each step (`index`, 0 = the prefill) and may change:
  `cfg_scale` (a time-varying guidance schedule; HF's logits processors hold one constant scale)
  and `skip_layers` (decoder layers that skip this step).
- `LayerSkip`: skips decoder layers KV-cache safely. A layer skipped for a token leaves that
  token's hidden state unchanged (output = input) but still writes the token's keys and values
  into that layer's cache (k_proj / v_proj of the normed input, rotary on the keys): later tokens
  attend to it exactly as they would without a cache. Not writing them leaves a hole:
  transformers 5.24's `DynamicLayer` grows by concatenation, so that layer's cache comes out one
  entry short and every later key sits at the wrong slot; a `StaticLayer` keeps its own write
  counter, with the same effect plus a zero slot at the end that the mask still admits.
  Without a cache (every step reruns the whole sequence) the same skip is a per-token mask: the
  layer runs on all tokens and the skipped tokens keep their input, so cached and uncached decoding
  agree.
- `vnorm_keep`: FlashU's V-norm visual-token pruning rule.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from unislim.modeling.surgery.kv import write_kv, writes_kv_alone

CfgSchedule = Callable[[int, int], float] | Sequence[float] | None


@dataclass
class DecodeStep:
    """One decoding step as a step hook sees it; the hook may set `cfg_scale` and `skip_layers`."""

    index: int  # 0 = the prefill (its last position predicts the first new token)
    total: int  # steps in this loop
    task: str  # und | gen
    cfg_scale: float | None = None  # guidance of this step (gen); None where the task has no CFG
    skip_layers: set[int] = field(default_factory=set)  # decoder layers skipped for this step's tokens


@dataclass
class Generation:
    """What a family's decoding loop returns."""

    tokens: torch.Tensor  # (B, N) generated ids: image tokens (gen) or answer ids (und)
    texts: list[str] | None = None  # und: the decoded answers
    images: list[Any] | None = None  # gen with decode=True: PIL images
    cfg_scales: list[float] = field(default_factory=list)  # the scale each step used (gen)
    skipped: list[set[int]] = field(default_factory=list)  # the layers each step skipped
    uncond_passes: int = 0  # gen: forwards (Janus: steps) that ran the unconditional prompt


def cfg_scale_at(schedule: CfgSchedule, index: int, total: int, default: float) -> float:
    """A schedule is a function (step, steps) → scale or one scale per step; None keeps `default`."""
    if schedule is None:
        return default
    if callable(schedule):
        return float(schedule(index, total))
    if len(schedule) != total:
        raise ValueError(f"cfg_schedule has {len(schedule)} scales for {total} decoding steps")
    return float(schedule[index])


def unguided_from(planned: list[float] | None, index: int) -> bool:
    """Whether a planned schedule holds scale 1 from step `index` to the end (no unconditional pass
    is needed any more, so its rows can leave the batch and the cache)."""
    return planned is not None and all(float(x) == 1.0 for x in planned[index:])


def check_guidance(step: DecodeStep, passes: int) -> None:
    if passes == 1 and step.cfg_scale is not None and float(step.cfg_scale) != 1.0:
        raise ValueError(f"step {step.index}: a step hook set cfg_scale {step.cfg_scale} after the schedule had "
                         "ended guidance (its unconditional pass is gone); change the schedule instead")


def run_step_hook(step_hook: Callable[[DecodeStep], Any] | None, step: DecodeStep,
                  n_layers: int) -> DecodeStep:
    if step_hook is not None:
        step_hook(step)
    bad = sorted(i for i in step.skip_layers if not 0 <= i < n_layers)
    if bad:
        raise ValueError(f"step {step.index}: skip_layers {bad} out of range (the model has {n_layers} layers)")
    return step


class LayerSkip:
    """Patches each decoder layer's `forward` (on the instance, so hooks and state-dict names are
    untouched) for the duration of a `with` block. Before each forward set `masks`:
    {layer index: (B, T) bool, True = this token skips the layer}; layers without an entry run as usual.
    """

    def __init__(self, layers: nn.ModuleList):
        self.layers = layers
        self.masks: dict[int, torch.Tensor] = {}
        self._saved: list[Any] = []

    def __enter__(self) -> LayerSkip:
        for i, layer in enumerate(self.layers):
            self._saved.append(layer.__dict__.get("forward"))
            original = layer.forward
            layer.forward = lambda *a, _i=i, _layer=layer, _orig=original, **k: self._forward(_i, _layer, _orig, a, k)
        return self

    def __exit__(self, *exc) -> None:
        for layer, saved in zip(self.layers, self._saved):
            del layer.forward
            if saved is not None:
                layer.forward = saved
        self._saved.clear()

    def set_step(self, skip_layers: set[int], shape: tuple[int, int], device) -> None:
        """Cached decoding: every token of this forward skips `skip_layers`."""
        self.masks = {i: torch.ones(shape, dtype=torch.bool, device=device) for i in skip_layers}

    def set_history(self, history: list[set[int]], lengths: list[int], batch: int, device) -> None:
        """Uncached decoding: the tokens fed at step s (lengths[s] of them) skip history[s]."""
        layers = set().union(*history) if history else set()
        self.masks = {}
        for i in layers:
            per_token = torch.cat([torch.full((n,), i in skipped, dtype=torch.bool)
                                   for skipped, n in zip(history, lengths)])
            self.masks[i] = per_token.to(device).expand(batch, -1)

    def _forward(self, i: int, layer: nn.Module, original, args, kwargs):
        mask = self.masks.get(i)
        hidden = args[0] if args else kwargs["hidden_states"]
        if mask is None or not bool(mask.any()):
            return original(*args, **kwargs)
        if bool(mask.all()) and writes_kv_alone(layer):
            write_kv(layer, hidden, kwargs)
            return hidden
        out = original(*args, **kwargs)  # the layer runs (its cache is written); skipped tokens keep their input
        out_h = out[0] if isinstance(out, tuple) else out
        mixed = torch.where(mask[..., None].to(out_h.device), hidden, out_h)
        return (mixed, *out[1:]) if isinstance(out, tuple) else mixed


# --------------------------------------------------------------------------- V-norm token pruning


def vnorm_keep(values: torch.Tensor, image_mask: torch.Tensor, keep: float) -> torch.Tensor:
    """FlashU's V-norm rule: among each row's image tokens keep the `keep` fraction whose value
    vectors have the largest L2 norm; every other token is kept.

    values (B, T, KV·hd) — a layer's `v_proj` output — or (B, KV, T, hd); image_mask (B, T) bool.
    Returns keep (B, T) bool. A row keeps ceil(keep · n_image) of its n_image image tokens.
    """
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    if values.dim() == 4:
        values = values.transpose(1, 2).flatten(2)  # (B, T, KV·hd)
    norm = values.float().norm(dim=-1).masked_fill(~image_mask, float("-inf"))  # (B, T)
    out = ~image_mask.clone()
    for b in range(values.shape[0]):
        n = int(image_mask[b].sum())
        k = math.ceil(keep * n)
        if k:
            out[b, norm[b].topk(k).indices] = True
    return out


class VisualTokenPruner:
    """Drops the image tokens `vnorm_keep` rejects at layer `layer` from every later layer.

    Semantics of removal, realised as attention masking: from layer `layer` + 1 on, no token
    attends to a dropped token, so every kept token's hidden state (the answer logits included)
    is what a decoder run on the kept tokens alone would give. The dropped tokens are still
    computed here; turning the saving into time is a gather of the kept tokens before the later
    layers (the same gathered-position machinery as Mixture-of-Depths routing).
    Use around a prefill: `with VisualTokenPruner(layers, l, image_mask, keep): model(...)`.
    """

    def __init__(self, layers: nn.ModuleList, layer: int, image_mask: torch.Tensor, keep: float):
        self.layers, self.layer, self.image_mask, self.keep = layers, layer, image_mask, keep
        self.kept: torch.Tensor | None = None  # (B, T) bool once layer `layer` ran
        self._handles: list[Any] = []

    def __enter__(self) -> VisualTokenPruner:
        v_proj = self.layers[self.layer].self_attn.v_proj
        self._handles.append(v_proj.register_forward_hook(self._values))
        for later in self.layers[self.layer + 1:]:
            self._handles.append(later.register_forward_pre_hook(self._mask, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _values(self, module, args, output) -> None:
        if output.shape[1] == self.image_mask.shape[1]:  # the prefill, not a later decoding step
            self.kept = vnorm_keep(output.detach(), self.image_mask.to(output.device), self.keep)

    def _mask(self, module, args, kwargs):
        if self.kept is None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        b, t = hidden.shape[:2]
        keys = kwargs.get("attention_mask")
        if keys is None:  # SDPA without padding passes no mask: build the causal one
            k_len = int(kwargs["position_ids"].max()) + 1  # cached tokens + these
            keys = torch.ones(t, k_len, dtype=torch.bool, device=hidden.device).tril(k_len - t)[None, None]
        k_len = keys.shape[-1]
        visible = torch.ones(b, k_len, dtype=torch.bool, device=hidden.device)
        visible[:, : self.kept.shape[1]] = self.kept.to(hidden.device)
        if keys.dtype == torch.bool:
            keys = keys & visible[:, None, None, :]
        else:  # an additive float mask
            keys = keys.masked_fill(~visible[:, None, None, :], torch.finfo(keys.dtype).min)
        kwargs["attention_mask"] = keys
        return args, kwargs
