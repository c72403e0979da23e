"""Which stages a config asks for, what each reads, and what feeds it.

The graph is data: a `StageSpec` names the config sections that form its cache key and, for each
input, the upstream stage output that provides it. `plan` returns the specs in dependency order.
Stages that later issues add (shard, score, prune, partition, adapt, mod, search, accelerate)
become entries here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType, SimpleNamespace
from typing import Any

from unislim.config import PipelineConfig

SOURCE = "source"  # pseudo-stage: a user checkpoint given by model.path


@dataclass(frozen=True)
class StageSpec:
    name: str
    sections: tuple[str, ...]  # config sections the stage reads; they form its cache key
    inputs: dict[str, tuple[str, str]] = field(default_factory=dict)  # input -> (stage, output)
    label: str = ""  # instance name when a stage runs more than once (e.g. evaluate-prune)
    num_cpus: float = 0  # 0 for stages that hand their work to Ray Train / Data / actors

    @property
    def id(self) -> str:
        return self.label or self.name

    @property
    def module(self) -> ModuleType:
        return importlib.import_module(f"unislim.stages.{self.name}")

    def config(self, cfg: PipelineConfig) -> SimpleNamespace:
        """The slice of the config this stage may read, as `cfg.pretrain.steps`, `cfg.seed`."""
        return SimpleNamespace(**{s: getattr(cfg, s) for s in self.sections})

    def config_slice(self, cfg: PipelineConfig) -> dict[str, Any]:
        dumped = cfg.model_dump(mode="json")
        return {s: dumped[s] for s in self.sections}


def plan(cfg: PipelineConfig) -> list[StageSpec]:
    """The stages `cfg` enables, upstream first."""
    specs: list[StageSpec] = []
    if cfg.model.source == "reference":
        if not cfg.pretrain.enabled:
            raise ValueError("model.source='reference' needs pretrain.enabled=true (or use model.source=path)")
        specs.append(StageSpec("pretrain", ("seed", "model", "pretrain")))
        checkpoint = ("pretrain", "checkpoint")
    else:
        checkpoint = (SOURCE, "checkpoint")
    if cfg.shard.enabled:
        specs.append(StageSpec("shard", ("shard",)))
    if cfg.score.enabled:
        specs.append(StageSpec("score", ("model", "score"), {
            "calib": ("shard", "calib"), "tasks": ("shard", "tasks"), "checkpoint": checkpoint}))
    if cfg.prune.enabled:
        specs.append(StageSpec("prune", ("model", "prune"), {"scores": ("score", "scores"), "checkpoint": checkpoint}))
    if cfg.partition.enabled:
        specs.append(StageSpec("partition", ("model", "partition"),
                               {"scores": ("score", "scores"), "checkpoint": checkpoint}))
    if cfg.adapt.enabled:
        specs.append(StageSpec("adapt", ("seed", "adapt"), {"checkpoint": ("partition", "checkpoint")}))
        if cfg.adapt.dense_baseline:  # the dense model of the same active size, trained as long
            specs.append(StageSpec("adapt", ("seed", "adapt"), {"checkpoint": ("prune", "checkpoint")},
                                   label="adapt-dense"))
    if cfg.search.enabled:  # trials run partition → adapt → evaluate: those sections (and the upstream ones,
        # for the exported best pipeline) are part of its key; the Tune trials reserve the CPUs
        specs.append(StageSpec("search", ("experiment", "seed", "model", "pretrain", "shard", "score",
                                          "partition", "adapt", "evaluate", "search"),
                               {"scores": ("score", "scores"), "checkpoint": checkpoint}))
    if cfg.mod.enabled:  # scores only for the auto schedule
        inputs = {"checkpoint": checkpoint, **({"scores": ("score", "scores")} if cfg.mod.schedule == "auto" else {})}
        specs.append(StageSpec("mod", ("seed", "mod"), inputs))
    if cfg.evaluate.enabled:
        specs.append(StageSpec("evaluate", ("evaluate",), {"checkpoint": checkpoint}, num_cpus=1))
        evaluated = [("prune", "checkpoint", cfg.prune.enabled), ("partition", "checkpoint", cfg.partition.enabled),
                     ("adapt", "checkpoint_eft", cfg.adapt.enabled and cfg.adapt.eft_steps > 0),
                     ("adapt", "checkpoint", cfg.adapt.enabled),
                     ("adapt-dense", "checkpoint", cfg.adapt.enabled and cfg.adapt.dense_baseline),
                     ("mod", "checkpoint", cfg.mod.enabled)]
        for stage, output, enabled in evaluated:
            if enabled:
                label = f"evaluate-{stage}" + ("-eft" if output == "checkpoint_eft" else "")
                specs.append(StageSpec("evaluate", ("evaluate",), {"checkpoint": (stage, output)},
                                       label=label, num_cpus=1))
    if cfg.accelerate.enabled:  # measures latency: holds a CPU like evaluate
        inputs = {"checkpoint": checkpoint, **({"scores": ("score", "scores")} if cfg.score.enabled else {})}
        specs.append(StageSpec("accelerate", ("model", "evaluate", "accelerate"), inputs, num_cpus=1))
    return specs


def select(specs: list[StageSpec], only: list[str]) -> list[StageSpec]:
    """`--only S`: S and everything upstream of it (reused from the cache where complete)."""
    by_id = {s.id: s for s in specs}
    unknown = [o for o in only if o not in by_id]
    if unknown:
        raise ValueError(f"--only: unknown stage(s) {unknown}; this config has {list(by_id)}")
    keep: set[str] = set()

    def visit(sid: str) -> None:
        if sid in keep or sid not in by_id:
            return
        keep.add(sid)
        for upstream, _ in by_id[sid].inputs.values():
            visit(upstream)

    for o in only:
        visit(o)
    return [s for s in specs if s.id in keep]
