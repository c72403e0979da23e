"""Which stages a config asks for, what each reads, and what feeds it.

The graph is data: a `StageSpec` names the config sections that form its cache key (plus values
derived from the config, such as each training stage's task mix) and, for each input, the upstream
stage output that provides it. `plan` returns the specs in dependency order: shard first (it writes
the calibration, training and held-out rows), then pretrain (reference source) or the user's
checkpoint, and everything that reads a checkpoint.
"""

from __future__ import annotations

import importlib
import math
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
    extra: tuple[tuple[str, Any], ...] = ()  # values derived from the config (part of the key), e.g. mix

    @property
    def id(self) -> str:
        return self.label or self.name

    @property
    def module(self) -> ModuleType:
        return importlib.import_module(f"unislim.stages.{self.name}")

    def config(self, cfg: PipelineConfig) -> SimpleNamespace:
        """The slice of the config this stage may read, as `cfg.pretrain.steps`, `cfg.seed`, `cfg.mix`."""
        return SimpleNamespace(**{s: getattr(cfg, s) for s in self.sections}, **dict(self.extra))

    def config_slice(self, cfg: PipelineConfig) -> dict[str, Any]:
        dumped = cfg.model_dump(mode="json")
        return {**{s: dumped[s] for s in self.sections}, **_jsonable(dict(self.extra))}


def _jsonable(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def train_rows(cfg: PipelineConfig) -> dict[str, int | None]:
    """Training rows per task the shard stage writes: `data.rows`, or (auto) for a reference task as
    many as the longest enabled training stage reads (one epoch), for a Parquet task all of them."""
    reads = []
    if cfg.model.source == "reference" and cfg.pretrain.enabled:
        reads.append(("pretrain", cfg.pretrain.steps * cfg.pretrain.batch_size))
    if cfg.adapt.enabled or cfg.search.enabled:
        reads.append(("adapt", (cfg.adapt.eft_steps + cfg.adapt.moe_steps) * cfg.adapt.batch_size))
    if cfg.mod.enabled:
        reads.append(("mod", cfg.mod.steps * cfg.mod.batch_size))
    out: dict[str, int | None] = {}
    for task in cfg.training_tasks():
        if cfg.data.rows != "auto":
            out[task.name] = cfg.data.rows
        elif task.source == "reference":
            out[task.name] = max([math.ceil(n * cfg.mix(s).get(task.name, 0)) for s, n in reads] + [64])
        else:
            out[task.name] = None
    return out


def plan(cfg: PipelineConfig) -> list[StageSpec]:
    """The stages `cfg` enables, upstream first."""
    specs: list[StageSpec] = []
    data = {"train": ("shard", "train"), "tasks": ("shard", "tasks")}
    heldout = {"heldout": ("shard", "heldout"), "tasks": ("shard", "tasks")}
    if cfg.shard.enabled:
        extra = (("training_tasks", cfg.training_tasks()), ("train_rows", train_rows(cfg)),
                 ("family", "digits" if cfg.model.source == "reference" else cfg.model.family),
                 ("trust_remote_code", cfg.model.trust_remote_code))
        specs.append(StageSpec("shard", ("shard", "data"), {} if cfg.model.source == "reference" else
                               {"checkpoint": (SOURCE, "checkpoint")}, extra=extra))
    if cfg.model.source == "reference":
        if not cfg.pretrain.enabled:
            raise ValueError("model.source='reference' needs pretrain.enabled=true (or use model.source=path)")
        if not cfg.shard.enabled:
            raise ValueError("model.source='reference' trains on the shard stage's rows: needs shard.enabled=true")
        specs.append(StageSpec("pretrain", ("seed", "model", "pretrain"), data,
                               extra=(("mix", cfg.mix("pretrain")),)))
        checkpoint = ("pretrain", "checkpoint")
    else:
        checkpoint = (SOURCE, "checkpoint")
    source = {"source": checkpoint}
    if cfg.score.enabled:
        specs.append(StageSpec("score", ("model", "score"), {
            "calib": ("shard", "calib"), "tasks": ("shard", "tasks"), "checkpoint": checkpoint}))
    if cfg.prune.enabled:
        specs.append(StageSpec("prune", ("model", "prune"), {"scores": ("score", "scores"), "checkpoint": checkpoint}))
    if cfg.partition.enabled:
        specs.append(StageSpec("partition", ("model", "partition"),
                               {"scores": ("score", "scores"), "checkpoint": checkpoint}))
    mix = lambda s: (("mix", cfg.mix(s)),)  # noqa: E731
    if cfg.adapt.enabled:
        specs.append(StageSpec("adapt", ("seed", "model", "adapt"), {"checkpoint": ("partition", "checkpoint"), **data},
                               extra=mix("adapt")))
        if cfg.adapt.dense_baseline:  # the dense model of the same active size, trained as long
            specs.append(StageSpec("adapt", ("seed", "model", "adapt"), {"checkpoint": ("prune", "checkpoint"), **data},
                                   label="adapt-dense", extra=mix("adapt")))
    if cfg.search.enabled:  # trials run partition → adapt → evaluate: those sections (and the upstream ones,
        # for the exported best pipeline) are part of its key; the Tune trials reserve the CPUs
        specs.append(StageSpec("search", ("experiment", "seed", "model", "data", "pretrain", "shard", "score",
                                          "partition", "adapt", "evaluate", "search"),
                               {"scores": ("score", "scores"), "checkpoint": checkpoint, **data, **heldout},
                               extra=mix("adapt")))
    if cfg.mod.enabled:  # scores only for the auto schedule
        inputs = {"checkpoint": checkpoint, **data, **({"scores": ("score", "scores")} if cfg.mod.schedule == "auto" else {})}
        specs.append(StageSpec("mod", ("seed", "model", "mod"), inputs, extra=mix("mod")))
    if cfg.evaluate.enabled:
        specs.append(StageSpec("evaluate", ("model", "evaluate"), {"checkpoint": checkpoint, **source, **heldout},
                               num_cpus=1))
        evaluated = [("prune", "checkpoint", cfg.prune.enabled), ("partition", "checkpoint", cfg.partition.enabled),
                     ("adapt", "checkpoint_eft", cfg.adapt.enabled and cfg.adapt.eft_steps > 0),
                     ("adapt", "checkpoint", cfg.adapt.enabled),
                     ("adapt-dense", "checkpoint", cfg.adapt.enabled and cfg.adapt.dense_baseline),
                     ("mod", "checkpoint", cfg.mod.enabled), ("search", "best", cfg.search.enabled)]
        for stage, output, enabled in evaluated:
            if enabled:
                label = f"evaluate-{stage}" + ("-eft" if output == "checkpoint_eft" else "")
                specs.append(StageSpec("evaluate", ("model", "evaluate"),
                                       {"checkpoint": (stage, output), **source, **heldout}, label=label, num_cpus=1))
    if cfg.accelerate.enabled:  # measures latency: holds a CPU like evaluate
        inputs = {"checkpoint": checkpoint, **heldout, **({"scores": ("score", "scores")} if cfg.score.enabled else {})}
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
