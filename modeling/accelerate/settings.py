"""What to accelerate and how: one frozen dataclass per FlashU technique, none with defaults.

Every value comes from the caller (the `accelerate` section of pipeline.yaml through
`stages/accelerate.py`, or a notebook), so no setting is hidden here. A technique set to None in
`Acceleration` is off; with every technique off the model runs exactly as it would unwrapped.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

@dataclass(frozen=True)
class TaskPruning:
    """Task-specific network pruning: each task runs MLPs cut to its own top neurons (Eq. 7 scores
    of that task's calibration), so understanding and generation keep different neurons.

    keep_und / keep_gen: fraction of each MLP's neurons kept for understanding / generation.
    full_last_steps: the last τ denoising steps run the full network (fine detail is decided late).
    """

    keep_und: float
    keep_gen: float
    full_last_steps: int
    keep_text: float = 0.5  # a causal LM's one task


@dataclass(frozen=True)
class LayerSkip:
    """Dynamic layer skipping for generation: every `every` steps, measure each layer's
    input/output cosine similarity on the image tokens of that step (run in full), then skip the
    `count` most similar (most redundant) layers until the next measurement."""

    every: int
    count: int


@dataclass(frozen=True)
class CfgSchedule:
    """Time-varying guidance: `segments` = ((start, scale), ...), start = fraction of the steps done
    (the first is 0.0). A step at scale 1 runs the conditional pass only (no unconditional pass)."""

    segments: tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class HeadCache:
    """Diffusion-head cache: run the backbone on every `every`-th step only, reuse in between.

    reuse="backbone": keep the backbone's image hidden states and recompute the (cheap) diffusion
    head on them with the current timestep's embedding; reuse="velocity": keep the head's output
    (the guided velocity) and skip the model entirely on the steps in between.
    """

    every: int
    reuse: Literal["backbone", "velocity"]


@dataclass(frozen=True)
class TokenPruning:
    """V-norm visual-token pruning for understanding: after layer `layer`, keep the `keep`
    fraction of image tokens whose value vectors (that layer's v_proj output) have the largest
    L2 norm; the text tokens are always kept."""

    layer: int
    keep: float


@dataclass(frozen=True)
class Acceleration:
    """Which techniques are on (None = off) and their settings."""

    task_pruning: TaskPruning | None = None
    layer_skip: LayerSkip | None = None
    cfg_schedule: CfgSchedule | None = None
    head_cache: HeadCache | None = None
    token_pruning: TokenPruning | None = None

    @property
    def enabled(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def only(self, technique: str) -> Acceleration:
        """This acceleration with every other technique switched off."""
        return Acceleration(**{technique: getattr(self, technique)})

    def subset(self, techniques: list[str]) -> Acceleration:
        """This acceleration with only `techniques` on."""
        return Acceleration(**{t: getattr(self, t) for t in techniques})

    def describe(self) -> str:
        """A short label, e.g. `accelerate:prune=0.5/0.5,tau=4+skip=1/5`; `accelerate:none` when all are off."""
        parts = []
        if (p := self.task_pruning) is not None:
            parts.append(f"prune={p.keep_und:g}/{p.keep_gen:g},tau={p.full_last_steps}")
        if (s := self.layer_skip) is not None:
            parts.append(f"skip={s.count}/{s.every}")
        if (c := self.cfg_schedule) is not None:
            parts.append("cfg=" + ",".join(f"{a:g}:{b:g}" for a, b in c.segments))
        if (h := self.head_cache) is not None:
            parts.append(f"cache={h.reuse}/{h.every}")
        if (t := self.token_pruning) is not None:
            parts.append(f"vnorm={t.keep:g}@{t.layer}")
        return "accelerate:" + ("+".join(parts) or "none")
