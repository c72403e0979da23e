"""`AcceleratedModel`: a reference model run with FlashU's training-free accelerations.

It offers the model's own inference API (`answer`, `generate_images`, `config`, `device`,
`num_active_parameters`), so `evaluate_reference` and `count_flops` measure it unchanged. The
sliced MLP copies of task pruning are submodules, so `parameters()` counts them too.

How each technique reaches the model:
- task pruning: sliced MLPs swapped in for the duration of a call (`ModuleSwap`); generation
  swaps back to the full MLPs for its last τ steps;
- layer skipping, CFG schedule, head cache: one `DenoiseStep` callback (`_DenoiseSchedule`) that
  sets `skip_layers`, `cfg_scale` or `velocity` per step;
- V-norm token pruning: the backbone's `token_filter` hook, with the value vectors of layer l
  taken by a forward hook on its `v_proj`.

`work` accumulates what the techniques claim to have saved (layers skipped, tokens dropped,
backbone and head calls, unconditional passes), so a test can check each claim by counting.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from unislim.modeling.adapters import adapter_for
from unislim.modeling.hooks import HookSet

from unislim.modeling.accelerate._math import cfg_scale_at, layers_left, mean_cosine, most_redundant, vnorm_keep
from unislim.modeling.accelerate._pruning import ModuleSwap, param_count, sliced_mlps
from unislim.modeling.accelerate.settings import Acceleration


class AcceleratedModel(nn.Module):
    """`model` (a `UniDigitsModel`) with `acceleration`; `scores` = {"und": ..., "gen": ...}, each a
    task's score dict (`{mlp}.neuron` tensors), needed only for task pruning."""

    def __init__(self, model: nn.Module, acceleration: Acceleration,
                 scores: dict[str, dict[str, torch.Tensor]] | None = None):
        super().__init__()
        if getattr(model.config, "model_type", None) != "unidigits":
            raise ValueError(f"acceleration runs the reference model family (unidigits), not "
                             f"{getattr(model.config, 'model_type', type(model).__name__)!r}")
        self.base = model
        self.acceleration = acceleration
        self.adapter = adapter_for(model)
        self.work: Counter[str] = Counter()
        self.und_mlps: dict[str, nn.Module] = {}
        self.gen_mlps: dict[str, nn.Module] = {}
        self._check()
        if (p := acceleration.task_pruning) is not None:
            missing = [t for t in ("und", "gen") if not scores or t not in scores]
            if missing:
                raise ValueError(f"task pruning needs each task's neuron scores; missing {missing}")
            self.und_mlps = sliced_mlps(model, self.adapter, "und", scores["und"], p.keep_und)
            self.gen_mlps = sliced_mlps(model, self.adapter, "gen", scores["gen"], p.keep_gen)
        self.sliced = nn.ModuleList([*self.und_mlps.values(), *self.gen_mlps.values()])  # counted in parameters()

    def _check(self) -> None:
        a, config = self.acceleration, self.base.config
        layers = self.adapter.decoder_layers(self.base)
        if (s := a.layer_skip) is not None:
            n = len(layers_left(len(layers), config.skip_layers_gen))
            if not 0 <= s.count < n:
                raise ValueError(f"layer_skip.count must be in 0..{n - 1} for this model's {n} generation layers")
        if (t := a.token_pruning) is not None:
            if not 0 <= t.layer < len(layers) - 1:
                raise ValueError(f"token_pruning.layer must be in 0..{len(layers) - 2} (a later layer must remain)")
            if not hasattr(layers[t.layer], self.adapter.attention):
                raise ValueError(f"token_pruning.layer {t.layer} has no attention (pruned away): no value vectors")

    # ------------------------------------------------------------ the model's surface
    @property
    def config(self):
        return self.base.config

    @property
    def device(self) -> torch.device:
        return self.base.device

    @property
    def dtype(self) -> torch.dtype:
        return self.base.dtype

    def active_parameters(self) -> dict[str, int]:
        """Parameters a token of each task passes through (generation: on its pruned steps)."""
        return {task: self.base.num_active_parameters(task=task) + param_count(mlps.values())
                - param_count(self.base.get_submodule(n) for n in mlps)
                for task, mlps in (("und", self.und_mlps), ("gen", self.gen_mlps))}

    def num_active_parameters(self, task: str = "und") -> int:
        """As `UniDigitsModel.num_active_parameters`: one token of `task`, with that task's MLP cut."""
        return self.active_parameters()[task]

    # ------------------------------------------------------------ understanding
    @torch.no_grad()
    def answer(self, images: torch.Tensor, question_ids: torch.Tensor, max_new_tokens: int = 3) -> torch.Tensor:
        """`UniDigitsModel.answer` with the understanding MLP cut and V-norm token pruning."""
        with ModuleSwap(self.base) as swap, HookSet(self.base, require_data=False) as hooks:
            swap.use(self.und_mlps)
            token_filter = None
            if (t := self.acceleration.token_pruning) is not None and t.keep < 1:
                token_filter = _VNormFilter(self.base, self.adapter, t.layer, t.keep, hooks)
            out = self.base.answer(images, question_ids, max_new_tokens, token_filter=token_filter)
        if token_filter is not None:
            self.work["tokens_dropped"] += token_filter.dropped
        return out

    # ------------------------------------------------------------ generation
    @torch.no_grad()
    def generate_images(self, prompt_ids: torch.Tensor, steps: int | None = None, cfg_scale: float | None = None,
                        generator: torch.Generator | None = None) -> torch.Tensor:
        """`UniDigitsModel.generate_images` with the generation-side techniques."""
        steps = steps or self.base.config.sample_steps
        with ModuleSwap(self.base) as swap:
            schedule = _DenoiseSchedule(self, prompt_ids.to(self.device), swap)
            try:
                return self.base.generate_images(prompt_ids, steps=steps, cfg_scale=cfg_scale, generator=generator,
                                                 step_callback=schedule)
            finally:
                schedule.close()
                self.work.update(schedule.work)


class _VNormFilter:
    """A backbone `token_filter`: after layer `layer`, keep the image tokens whose value vectors
    (that layer's v_proj output, captured by a hook in the same forward) have the largest norm."""

    def __init__(self, model: nn.Module, adapter, layer: int, keep: float, hooks: HookSet):
        self.n_image = model.config.num_image_tokens
        self.keep = max(1, round(keep * self.n_image))
        self.layer = layer
        self.dropped = 0  # image tokens removed, summed over forwards and samples
        self.v: torch.Tensor | None = None
        v_proj = f"{adapter.layers}.{layer}.{adapter.attention}.{adapter.attn_proj['v']}"
        hooks.post(v_proj, lambda n, m, a, k, out: setattr(self, "v", out))

    def __call__(self, i: int, hidden: torch.Tensor) -> torch.Tensor | None:  # hidden (B, T, d)
        if i != self.layer:
            return None
        assert self.v is not None and self.v.shape[:2] == hidden.shape[:2], "value vectors of this forward"
        self.dropped += hidden.shape[0] * (self.n_image - self.keep)
        return vnorm_keep(self.v, self.n_image, self.keep)  # (B, keep + text)


class _DenoiseSchedule:
    """The per-step decisions of one `generate_images` call (a `DenoiseStep` callback)."""

    def __init__(self, owner: AcceleratedModel, prompt_ids: torch.Tensor, swap: ModuleSwap):
        self.base, self.acc, self.adapter = owner.base, owner.acceleration, owner.adapter
        self.gen_mlps, self.swap = owner.gen_mlps, swap
        self.prompt_ids = prompt_ids  # (B, P)
        self.work: Counter[str] = Counter()
        self.pruned: bool | None = None  # whether the sliced generation MLPs are in place
        self.cached_at: int | None = None  # head cache: step of the last backbone run
        self.hidden: torch.Tensor | None = None  # head cache (backbone): (B or 2B, 32, d)
        self.skip: set[int] = set()  # layer skip: layers skipped until the next measurement
        self.measured_at: int | None = None
        self.hooks: HookSet | None = None
        self.cosine: dict[int, float] = {}

    def __call__(self, step) -> None:
        a, i = self.acc, step.index
        self._finish_measurement()
        if a.cfg_schedule is not None:
            step.cfg_scale = cfg_scale_at(a.cfg_schedule.segments, i, step.steps)
        if a.task_pruning is not None:
            pruned = i < step.steps - a.task_pruning.full_last_steps
            if pruned != self.pruned:
                self.swap.use(self.gen_mlps if pruned else {})
                self.pruned = pruned
            self.work["pruned_steps"] += pruned
        runs_backbone = self._refresh_due(step)
        if runs_backbone:
            self.cached_at = i
            if a.layer_skip is not None:
                if self.measured_at is None or i - self.measured_at >= a.layer_skip.every:
                    self._measure(i)  # this step runs every layer
                else:
                    step.skip_layers = set(self.skip)
            self.work["backbone_calls"] += 1
            self.work["layers_skipped"] += len(step.skip_layers)
            self.work["uncond_passes_skipped"] += step.cfg_scale == 1.0
        if a.head_cache is not None and a.head_cache.reuse == "backbone":
            step.velocity = self._head_on_cached(step, runs_backbone)
            self.work["head_calls"] += 1
        elif not runs_backbone:  # velocity cache: reuse the last step's guided velocity
            step.velocity = step.prev_velocity
        else:
            self.work["head_calls"] += 1  # the model runs backbone and head

    def _refresh_due(self, step) -> bool:
        h = self.acc.head_cache
        if h is None or self.cached_at is None or step.index - self.cached_at >= h.every:
            return True
        guided = step.cfg_scale != 1.0
        return h.reuse == "backbone" and guided and len(self.hidden) == len(self.prompt_ids)  # no uncond rows cached

    def _head_on_cached(self, step, refresh: bool) -> torch.Tensor:
        """v_u + s (v_c - v_u) from the diffusion head on (cached) backbone hidden states; (B, 32, 4)."""
        B, guided = len(self.prompt_ids), step.cfg_scale != 1.0
        if refresh:
            prompts, x = self.prompt_ids, step.x
            if guided:
                prompts, x = torch.cat([prompts, self.base.null_prompt_like(prompts)]), torch.cat([x, x])
            self.hidden, _ = self.base.gen_hidden(prompts, x, x.new_full((len(x),), step.t), step.skip_layers)
        hidden = self.hidden if guided else self.hidden[:B]  # (2B or B, 32, d)
        t_emb = self.base.time_embed(hidden.new_full((len(hidden),), step.t))[:, None]  # (n, 1, d)
        v = self.base.gen_head(hidden + t_emb)  # (n, 32, 4)
        if not guided:
            return v
        v_c, v_u = v[:B], v[B:]
        return v_u + step.cfg_scale * (v_c - v_u)

    # -- dynamic layer skipping
    def _measure(self, index: int) -> None:
        """Hook every generation layer for this step: cos(input, output) on the image tokens."""
        config = self.base.config
        n_image, layers = config.num_image_tokens, len(self.adapter.decoder_layers(self.base))
        self.hooks = HookSet(self.base, require_data=False)
        self.cosine = {}
        for li in layers_left(layers, config.skip_layers_gen):
            def record(n, m, args, kwargs, out, li=li):  # args[0], out: (rows, T, d)
                self.cosine[li] = mean_cosine(args[0][:, -n_image:], out[:, -n_image:])

            self.hooks.post(f"{self.adapter.layers}.{li}", record)
        self.measured_at = index
        self.work["measurements"] += 1

    def _finish_measurement(self) -> None:
        if self.hooks is None:
            return
        self.hooks.remove()
        self.hooks = None
        self.skip = most_redundant(self.cosine, self.acc.layer_skip.count)

    def close(self) -> None:
        self._finish_measurement()
