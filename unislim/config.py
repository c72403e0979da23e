"""The typed, validated `pipeline.yaml`.

Every section is a pydantic v2 model with `extra="forbid"` and bounds on every number;
cross-field rules live in model validators. `load_config` collects *every* problem in one
`ConfigError` whose lines read `pretrain.warmup_steps: must be < pretrain.steps (got 500 >= 100)`,
so a user fixes a file in one pass. Nothing here starts Ray or touches MLflow.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from . import yamlio
from .errors import ConfigError  # noqa: F401  (unislim.config.ConfigError is public: code imports it from here)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


def _rule(ok: bool, field: str, message: str) -> None:
    """Raise a cross-field error that `load_config` reports under `<section>.<field>`."""
    if not ok:
        raise ValueError(f"@{field}: {message}")


def _path_iff_source(section: _Section, source: str) -> None:
    """`path` is given exactly when `source` is the one that reads it."""
    _rule((section.source == source) == (section.path is not None), "path",
          f"is required when source is {source!r} and not allowed otherwise "
          f"(source={section.source!r}, path={section.path!r})")


class ModelConfig(_Section):
    source: Literal["reference", "path"] = Field(
        "reference", description="`reference`: train the embedded digits model; `path`: load a checkpoint")
    path: str | None = Field(None, description="local Hugging Face checkpoint folder (source=path)")
    size: Literal["tiny", "small"] = Field("small", description="reference model size (tiny is for tests)")
    variant: Literal["shared", "mot"] = Field(
        "shared", description="shared weights for all tokens, or per-modality copies (mixture-of-transformers)")
    trust_remote_code: bool = Field(False, description="allow a checkpoint's own modeling code to run")
    family: Literal["auto", "digits", "janus", "emu3", "causal_lm"] = Field(
        "auto", description="model family (auto: from the checkpoint's config; the reference source is digits; "
        "janus: Janus / Janus-Pro, emu3: Emu3, both from transformers)")
    adapter: dict[str, Any] | None = Field(
        None, description="where the model keeps its layers, MLPs and attention, over the built-in entry for its "
        "model_type (keys: layers, mlp, mlp_proj, mlp_act, attention, attn_proj, proj_suffix, config, heads; "
        "see README 'Compress your own checkpoint')")

    @model_validator(mode="after")
    def _path_matches_source(self) -> ModelConfig:
        _path_iff_source(self, "path")
        _rule(not (self.source == "reference" and self.family not in ("auto", "digits")), "family",
              f"the reference source is the digits family (got {self.family!r})")
        if self.adapter is not None:
            from unislim.modeling.adapters import Adapter, AdapterError

            try:
                Adapter.from_dict(self.adapter, Adapter("default"))
            except (AdapterError, TypeError) as e:
                raise ValueError(f"@adapter: {str(e).removeprefix('model.adapter: ')}") from None
        return self


class TrackingConfig(_Section):
    log_checkpoints: Literal["none", "final", "all"] = Field(
        "none", description="copy checkpoint folders into the MLflow artifact store: none (a tag points at each "
        "folder in the runs dir), final (the last checkpoint of each stage), all")


class _RayTrainSection(_Section):
    """What every stage that trains on Ray Train sets: its workers and how failures are retried."""

    num_workers: int = Field(1, ge=1, le=1024, description="Ray Train data-parallel workers")
    cpus_per_worker: float = Field(1.0, gt=0, le=256, description="CPUs each Ray Train worker reserves")
    use_gpu: bool = Field(False, description="one GPU per worker (DeepSpeed stages train in bf16 there)")
    max_failures: int = Field(0, ge=-1, le=1000, description="worker-group restarts Ray Train allows (-1: unlimited)")


class PretrainConfig(_RayTrainSection):
    enabled: bool = Field(True, description="train the reference model (only with model.source=reference)")
    steps: int = Field(3000, ge=1, le=1_000_000, description="optimizer steps")
    batch_size: int = Field(64, ge=1, le=65_536, description="global batch (split evenly across workers)")
    lr: float = Field(1e-3, gt=0, le=1.0, description="peak learning rate (AdamW, warmup then cosine)")
    warmup_steps: int = Field(100, ge=0, le=1_000_000, description="linear warmup steps")
    mix: dict[str, float] | None = Field(None, description="share of each batch per task (null: data.tasks weights)")
    zero_stage: int = Field(0, ge=0, le=3, description="DeepSpeed ZeRO stage (0: plain data parallel)")
    checkpoint_every: int = Field(500, ge=1, le=1_000_000, description="report a resumable checkpoint every N steps")
    log_every: int = Field(50, ge=1, le=1_000_000, description="log training metrics every N steps")
    snapshots: list[float] = Field([0.1], max_length=20,
                                   description="also keep the weights at these fractions of training (snapshots/step-N)")

    @model_validator(mode="after")
    def _consistent(self) -> PretrainConfig:
        _rule(self.warmup_steps < self.steps, "warmup_steps",
              f"must be < pretrain.steps (got {self.warmup_steps} >= {self.steps})")
        _rule(all(0 < f < 1 for f in self.snapshots), "snapshots",
              f"fractions must be in (0, 1) (got {self.snapshots})")
        _rule(self.batch_size % self.num_workers == 0, "batch_size",
              f"must be divisible by pretrain.num_workers (got {self.batch_size} % {self.num_workers} != 0)")
        return self


class EvaluateConfig(_Section):
    enabled: bool = Field(True, description="evaluate every checkpoint the pipeline produces")
    n_und: int = Field(40, ge=1, le=100_000, description="held-out samples per understanding question type")
    n_gen: int = Field(24, ge=1, le=100_000, description="prompts per GenEval category")
    steps: int = Field(20, ge=1, le=1000, description="denoising steps")
    cfg_scale: float | None = Field(None, ge=1.0, le=50.0, description="CFG scale (null: the model's default)")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="seed for prompts, scenes and noise")


class TaskPruningConfig(_Section):
    enabled: bool = Field(True, description="separate MLP widths per task, cut by each task's own neuron scores")
    keep_und: float = Field(0.5, gt=0, le=1, description="fraction of each MLP's neurons understanding keeps")
    keep_gen: float = Field(0.5, gt=0, le=1, description="fraction of each MLP's neurons generation keeps")
    keep_text: float = Field(0.5, gt=0, le=1, description="fraction of each MLP's neurons a text task keeps "
                             "(causal LMs)")
    full_last_steps: int = Field(4, ge=0, le=1000, description="tau: the last denoising steps run the full network")


class LayerSkipConfig(_Section):
    enabled: bool = Field(True, description="generation skips its most redundant layers, re-measured every T steps")
    every: int = Field(5, ge=1, le=1000, description="T: steps between measurements of layer in/out cosine similarity")
    count: int = Field(1, ge=0, le=1000, description="r: most redundant layers skipped until the next measurement")


class CfgScheduleConfig(_Section):
    enabled: bool = Field(True, description="a piecewise CFG scale over the denoising steps")
    segments: list[tuple[float, float]] = Field(
        [(0.0, 1.0), (0.2, 3.0), (0.7, 1.0)], min_length=1, max_length=100,
        description="(start as a fraction of the steps, CFG scale) pairs; scale 1 runs no unconditional pass")

    @model_validator(mode="after")
    def _segments(self) -> CfgScheduleConfig:
        starts = [s for s, _ in self.segments]
        _rule(starts[0] == 0 and all(a < b for a, b in zip(starts, starts[1:])) and starts[-1] < 1, "segments",
              f"starts must begin at 0.0 and increase strictly below 1.0 (got {starts})")
        _rule(all(1.0 <= v <= 50.0 for _, v in self.segments), "segments",
              f"scales must be in [1, 50] (got {[v for _, v in self.segments]})")
        return self


class HeadCacheConfig(_Section):
    enabled: bool = Field(True, description="run the backbone every T_cache steps only, reuse it in between")
    every: int = Field(2, ge=1, le=1000, description="T_cache: steps between backbone runs")
    reuse: Literal["backbone", "velocity"] = Field(
        "backbone", description="backbone: reuse hidden states, recompute the diffusion head with the new timestep; "
                                "velocity: reuse the head's output")


class TokenPruningConfig(_Section):
    enabled: bool = Field(True, description="understanding drops low value-norm image tokens after one layer")
    layer: int = Field(0, ge=0, le=1000, description="l: the layer whose value vectors rank the image tokens")
    keep: float = Field(0.75, gt=0, le=1, description="fraction of image tokens the later layers keep")


class AccelerateConfig(_Section):
    enabled: bool = Field(False, description="FlashU-style training-free acceleration, measured against the "
                          "unaccelerated model (each technique alone and combined)")
    task_pruning: TaskPruningConfig = Field(default_factory=TaskPruningConfig, description="task-specific pruning")
    layer_skip: LayerSkipConfig = Field(default_factory=LayerSkipConfig, description="dynamic layer skipping (gen)")
    cfg_schedule: CfgScheduleConfig = Field(default_factory=CfgScheduleConfig, description="time-varying guidance")
    head_cache: HeadCacheConfig = Field(default_factory=HeadCacheConfig, description="diffusion-head cache (gen)")
    token_pruning: TokenPruningConfig = Field(default_factory=TokenPruningConfig,
                                              description="V-norm visual-token pruning (und)")
    combined: list[Literal["task_pruning", "layer_skip", "cfg_schedule", "head_cache", "token_pruning"]] | None = Field(
        ["task_pruning", "head_cache", "token_pruning"], max_length=5,
        description="the techniques of the combined variant metrics.json reports (null: every enabled one); every "
                    "enabled technique is also reported alone, and all of them together")
    latency_repeats: int = Field(7, ge=1, le=1000, description="timed rounds (interleaved; the median is reported)")
    latency_und_samples: int = Field(48, ge=1, le=100_000, description="understanding samples per timed call")
    latency_gen_samples: int = Field(6, ge=1, le=100_000, description="generation prompts per timed call")

    @model_validator(mode="after")
    def _something_on(self) -> AccelerateConfig:
        on = [n for n in ("task_pruning", "layer_skip", "cfg_schedule", "head_cache", "token_pruning")
              if getattr(self, n).enabled]
        _rule(not self.enabled or bool(on), "enabled", "needs at least one technique enabled")
        off = [n for n in self.combined or [] if n not in on]
        _rule(not (self.enabled and (off or self.combined == [])), "combined",
              f"must name enabled techniques, at least one (got {self.combined}; not enabled: {off})")
        return self


class CalibrationTask(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="task name (file and score names)")
    kind: Literal["und", "gen", "text"] = Field(description="how a row runs: understanding, generation, causal LM")
    source: Literal["reference", "parquet"] = Field("reference", description="reference task or user Parquet")
    path: str | None = Field(None, description="Parquet file or folder (source=parquet)")

    @model_validator(mode="after")
    def _path_matches_source(self) -> CalibrationTask:
        _path_iff_source(self, "parquet")
        _rule(not (self.source == "reference" and self.kind == "text"), "kind",
              "the reference tasks are 'und' and 'gen' (use source=parquet for text)")
        return self


def _reference_tasks() -> list[CalibrationTask]:
    return [CalibrationTask(name="und", kind="und"), CalibrationTask(name="gen", kind="gen")]


class ShardConfig(_Section):
    enabled: bool = Field(True, description="draw calibration samples (needed by score)")
    n: int = Field(128, ge=1, le=10_000_000, description="calibration samples per task")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="sampling seed")
    rows_per_file: int = Field(32, ge=1, le=10_000_000, description="rows per Parquet shard")
    tasks: list[CalibrationTask] = Field(default_factory=_reference_tasks, min_length=1,
                                         description="the calibration tasks")

    @model_validator(mode="after")
    def _unique(self) -> ShardConfig:
        names = [t.name for t in self.tasks]
        _rule(len(set(names)) == len(names), "tasks", f"task names must be unique (got {names})")
        return self


class DataTask(CalibrationTask):
    weight: float = Field(1.0, gt=0, le=1_000_000, description="mixing weight: share of each training batch "
                          "(normalised over the tasks)")


class DataConfig(_Section):
    """Training and held-out data: `shard` writes `train/<task>/` and `heldout/<task>/` beside `calib/`."""

    tasks: list[DataTask] | None = Field(
        None, max_length=64, description="the training tasks (null: the calibration tasks of shard.tasks, "
        "equal weights)")
    rows: int | Literal["auto"] = Field(
        "auto", description="training rows per task: generated rows of a reference task (auto: as many as the "
        "longest training stage reads, 1 epoch), at most this many rows of a Parquet task (auto: all)")
    heldout: int = Field(64, ge=1, le=10_000_000, description="rows per task kept out of training, for "
                         "evaluate's held-out NLL and agreement with the source")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="sampling and shuffling seed")
    rows_per_file: int = Field(4096, ge=1, le=10_000_000, description="rows per Parquet shard")

    @field_validator("rows")
    @classmethod
    def _rows(cls, v: int | str) -> int | str:
        if v != "auto" and not 1 <= v <= 100_000_000:
            raise ValueError(f"must be 'auto' or 1..100000000 (got {v})")
        return v

    @model_validator(mode="after")
    def _unique(self) -> DataConfig:
        names = [t.name for t in self.tasks or []]
        _rule(len(set(names)) == len(names), "tasks", f"task names must be unique (got {names})")
        return self


class ScoreConfig(_Section):
    enabled: bool = Field(True, description="score layers, neurons and heads per calibration task")
    num_workers: int = Field(2, ge=1, le=1024, description="Ray actors scoring shards in parallel")
    cpus_per_worker: float = Field(1.0, gt=0, le=256, description="CPUs each scoring actor reserves")
    use_gpu: bool = Field(False, description="one GPU per scoring actor")
    batch_size: int = Field(16, ge=1, le=65_536, description="rows per forward")
    gen_steps: int = Field(20, ge=1, le=1000, description="denoising steps per generation row")
    step_buckets: int = Field(4, ge=1, le=1000, description="generation statistics per bucket of steps")
    cfg_scale: float | None = Field(None, ge=1.0, le=50.0, description="CFG scale (null: the model's default)")
    cfg: Literal["cond", "uncond", "both"] = Field(
        "cond", description="autoregressive image generation (janus, emu3): which classifier-free-guidance pass "
        "the gen statistics record: the conditional, the unconditional, or both")
    overlap_frac: float = Field(0.5, gt=0, le=1, description="top fraction of neurons in the overlap plot")

    @model_validator(mode="after")
    def _buckets(self) -> ScoreConfig:
        _rule(self.step_buckets <= self.gen_steps, "step_buckets",
              f"must be <= score.gen_steps (got {self.step_buckets} > {self.gen_steps})")
        return self


class PruneConfig(_Section):
    enabled: bool = Field(True, description="training-free pruning from the scores")
    method: Literal["neurons", "blocks", "attention", "mlp", "kv_groups"] = Field(
        "neurons", description="what to remove: MLP neurons, whole blocks, attention or MLP sublayers, KV groups")
    component: Literal["und", "gen", "both"] = Field("gen", description="which weights: understanding, generation, both")
    calibration: str = Field("auto", min_length=1, max_length=64,
                             description="scores of this task, 'all' (summed over tasks) or 'auto' (the component's own)")
    sparsity: float = Field(0.5, ge=0.0, lt=1.0,
                            description="fraction removed: of each MLP's neurons, of the blocks/sublayers, of KV groups")
    keep_first_last: bool = Field(True, description="never drop the first and last block or sublayer")
    allocation: Literal["uniform", "global"] = Field(
        "uniform", description="neurons: the same fraction of every MLP, or one threshold over all MLPs (each layer's "
        "scores normalised by their mean) giving per-layer widths")

    @model_validator(mode="after")
    def _supported(self) -> PruneConfig:
        _rule(not (self.method in ("attention", "mlp") and self.component != "both"), "component",
              f"method {self.method!r} removes the sublayer for every token: use component 'both' "
              f"(got {self.component!r})")
        return self


class PartitionConfig(_Section):
    enabled: bool = Field(False, description="convert dense MLPs into shared + routed experts (Slim & Sparse §4.2)")
    component: Literal["gen"] = Field(
        "gen", description="MLPs whose generation path becomes sparse (understanding stays dense)")
    layers: list[int] | None = Field(None, max_length=1024,
                                     description="layers to convert (null: every layer but the first and last)")
    calibration: str = Field("all", min_length=1, max_length=64,
                             description="neuron scores to rank by: 'all' (summed over tasks, Eq. 8) or a task name")
    num_experts: int = Field(64, ge=2, le=4096, description="experts per MLP (each holds ff / num_experts neurons)")
    num_shared: int = Field(8, ge=0, le=4096, description="shared experts: the top cumulative-score neurons")
    active_fraction: float = Field(0.5, gt=0, le=1, description="fraction of each MLP's neurons active per token")
    aux_loss_coef: float = Field(0.01, ge=0, le=10, description="weight of the load-balancing loss in training")
    und_frozen: bool = Field(False, description="shared variant: understanding forwards (dense) send no gradient "
                             "into the experts, so adaptation trains them for generation only (paper §5.4)")
    impl: Literal["auto", "loop", "grouped"] = Field(
        "auto", description="MoE kernel: per-expert loop (CPU reference), grouped GEMM (GPU), auto")

    @property
    def top_k(self) -> int:
        """Routed experts per token: the active budget minus the shared experts."""
        return round(self.active_fraction * self.num_experts) - self.num_shared

    @model_validator(mode="after")
    def _consistent(self) -> PartitionConfig:
        _rule(self.num_shared < self.num_experts, "num_shared",
              f"must be < partition.num_experts (got {self.num_shared} >= {self.num_experts})")
        _rule(1 <= self.top_k <= self.num_experts - self.num_shared, "active_fraction",
              f"active_fraction * num_experts - num_shared must leave 1..{self.num_experts - self.num_shared} routed "
              f"experts per token (got top_k={self.top_k})")
        return self


class AdaptConfig(_RayTrainSection):
    enabled: bool = Field(False, description="train the partitioned MoE model: Expert-Frozen Tuning, then all of it")
    eft_steps: int = Field(200, ge=0, le=1_000_000, description="phase 1: experts frozen, router and the rest train")
    moe_steps: int = Field(200, ge=0, le=1_000_000, description="phase 2: everything trains")
    lr: float = Field(3e-4, gt=0, le=1.0, description="peak learning rate of each phase (AdamW, warmup, cosine)")
    warmup_steps: int = Field(20, ge=0, le=1_000_000, description="linear warmup steps of each phase")
    batch_size: int = Field(32, ge=2, le=65_536, description="global batch (split evenly across workers)")
    mix: dict[str, float] | None = Field(None, description="share of each batch per task (null: data.tasks weights)")
    zero_stage: int = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage")
    checkpoint_every: int = Field(100, ge=1, le=1_000_000, description="report a resumable checkpoint every N steps")
    log_every: int = Field(20, ge=1, le=1_000_000, description="log training metrics every N steps")
    dense_baseline: bool = Field(False, description="also fine-tune the prune stage's dense model for eft_steps + "
                                 "moe_steps (the same active-parameter budget when prune matches the partition)")
    fail_at_step: int | None = Field(None, ge=1, le=1_000_000, description="testing: in the last phase the last rank "
                                     "dies once at this step, to exercise recovery (needs max_failures >= 1)")

    @model_validator(mode="after")
    def _consistent(self) -> AdaptConfig:
        _rule(self.eft_steps + self.moe_steps > 0, "moe_steps", "eft_steps + moe_steps must be > 0")
        _rule(self.batch_size % self.num_workers == 0, "batch_size",
              f"must be divisible by adapt.num_workers (got {self.batch_size} % {self.num_workers} != 0)")
        _rule(self.fail_at_step is None or self.checkpoint_every < self.fail_at_step, "fail_at_step",
              f"must come after the first checkpoint (adapt.checkpoint_every={self.checkpoint_every}), so the "
              f"restarted run resumes past it (got {self.fail_at_step})")
        phases = [n for n in (self.eft_steps, self.moe_steps) if n]
        _rule(not phases or self.warmup_steps < min(phases), "warmup_steps",
              f"must be < the steps of each phase (got {self.warmup_steps}; phases {phases})")
        return self


class ModConfig(_RayTrainSection):
    enabled: bool = Field(False, description="train task-aware Mixture-of-Depths routers into the checkpoint (UniMoD)")
    routing: Literal["task", "shared", "none"] = Field(
        "task", description="task: a router per task (UniMoD); shared: one router and capacity for all tasks "
        "(the task-agnostic baseline); none: the dense control, same recipe without routers")
    schedule: Literal["auto", "table"] = Field(
        "auto", description="auto: capacities from the score stage's layer importance; table: mod.table")
    budget: float = Field(0.8, gt=0, le=1, description="auto: token-weighted mean capacity over tasks and layers")
    min_capacity: float = Field(0.25, gt=0, le=1, description="auto: no routed layer keeps fewer tokens than this")
    sharpness: float = Field(1.0, ge=0, le=4, description="auto: skipped share ∝ 1 / importance^sharpness "
                             "(0: every routed task and layer alike)")
    max_importance: float = Field(0.3, ge=0, le=2, description="auto: a layer whose importance (1 - block cosine) "
                                  "for a task exceeds this stays dense for that task")
    table: dict[str, list[float]] | None = Field(
        None, description="schedule=table: per task, one capacity in (0, 1] per layer (missing task: dense)")
    keep_last: dict[str, int] | None = Field(
        None, description="per task, never skip the last N tokens of a sample (null: the family's default; digits: "
        "und 4, the question's last word and the answer)")
    causal_tasks: list[str] | None = Field(
        None, description="tasks routed per token by an auxiliary predictor at inference (causal), not by top-k "
        "over the sequence (null: the family's tasks that decode token by token)")
    aux_weight: float = Field(1.0, ge=0, le=100, description="weight of the predictor's BCE loss")
    steps: int = Field(300, ge=1, le=1_000_000, description="fine-tuning steps")
    lr: float = Field(3e-4, gt=0, le=1.0, description="peak learning rate of the model (AdamW, warmup, cosine)")
    router_lr: float = Field(3e-3, gt=0, le=1.0, description="peak learning rate of routers and predictors")
    router_init: Literal["fit", "zero"] = Field(
        "fit", description="fit: each router starts at a least-squares fit of how much its layer changes each token "
        "(tiny logits, router weight ~1); zero: zero weights (weight exactly 1, ties broken arbitrarily)")
    warmup_steps: int = Field(20, ge=0, le=1_000_000, description="linear warmup steps")
    batch_size: int = Field(64, ge=2, le=65_536, description="global batch (split evenly across workers)")
    mix: dict[str, float] | None = Field(None, description="share of each batch per task (null: data.tasks weights)")
    zero_stage: int = Field(2, ge=0, le=3, description="DeepSpeed ZeRO stage")
    checkpoint_every: int = Field(100, ge=1, le=1_000_000, description="report a resumable checkpoint every N steps")
    log_every: int = Field(25, ge=1, le=1_000_000, description="log training metrics every N steps")

    @model_validator(mode="after")
    def _consistent(self) -> ModConfig:
        _rule(self.warmup_steps < self.steps, "warmup_steps",
              f"must be < mod.steps (got {self.warmup_steps} >= {self.steps})")
        _rule(self.batch_size % self.num_workers == 0, "batch_size",
              f"must be divisible by mod.num_workers (got {self.batch_size} % {self.num_workers} != 0)")
        _rule(self.min_capacity <= self.budget, "min_capacity",
              f"must be <= mod.budget (got {self.min_capacity} > {self.budget})")
        _rule((self.schedule == "table") == (self.table is not None), "table",
              f"is required when schedule is 'table' and not allowed otherwise (schedule={self.schedule!r})")
        caps = [c for v in (self.table or {}).values() for c in v]
        _rule(all(0 < c <= 1 for c in caps), "table", f"capacities must lie in (0, 1] (got {self.table})")
        _rule(not (self.routing == "shared" and self.table and len({tuple(v) for v in self.table.values()}) > 1),
              "table", f"routing 'shared' uses one capacity for every task: give und and gen the same list "
              f"(got {self.table})")
        return self


SPACE_KINDS = ("grid", "choice", "uniform", "loguniform")
# A trial runs partition → adapt, so only their fields can vary. MoD capacity (mod.*) is not
# searchable: the MoD model wraps the dense reference model and the MoE model is its own class;
# one model with both does not exist yet.
SEARCHABLE = {"partition": PartitionConfig, "adapt": AdaptConfig}
_NOT_SEARCHABLE = ("enabled", "fail_at_step", "dense_baseline", "layers")


class SpaceSpec(_Section):
    """How one config key varies across the search's trials: exactly one of the four."""

    grid: list[Any] | None = Field(None, min_length=1, max_length=1000,
                                   description="every value in turn (trials = num_samples x grid combinations)")
    choice: list[Any] | None = Field(None, min_length=1, max_length=1000, description="one value drawn per trial")
    uniform: tuple[float, float] | None = Field(None, description="[lo, hi] drawn uniformly (integers for int fields)")
    loguniform: tuple[float, float] | None = Field(None, description="[lo, hi] drawn log-uniformly, lo > 0")

    @property
    def kind(self) -> str:
        return next(k for k in SPACE_KINDS if getattr(self, k) is not None)

    @model_validator(mode="after")
    def _one(self) -> SpaceSpec:
        given = [k for k in SPACE_KINDS if getattr(self, k) is not None]
        _rule(len(given) == 1, given[-1] if given else "choice",
              f"give exactly one of {list(SPACE_KINDS)} (got {given or 'none'})")
        for k in ("uniform", "loguniform"):
            lo, hi = getattr(self, k) or (1.0, 2.0)
            _rule(lo < hi, k, f"needs lo < hi (got [{lo}, {hi}])")
            _rule(k == "uniform" or lo > 0, k, f"needs lo > 0 (got {lo})")
        return self


def _space_key(key: str) -> str:
    """A searchable dotted key: `section.field` of a section the trials run."""
    section, _, name = key.partition(".")
    model = SEARCHABLE.get(section)
    if model is None:
        raise ValueError(f"only partition.* and adapt.* fields can vary (trials run partition → adapt; mod.* "
                         f"cannot: MoD and MoE do not compose into one model yet) (got {key!r})")
    if name not in model.model_fields or name in _NOT_SEARCHABLE:
        searchable = sorted(n for n in model.model_fields if n not in _NOT_SEARCHABLE)
        raise ValueError(f"{section} has no searchable field {name!r} (have {searchable})")
    return key


def _space_problems(key: str, spec: SpaceSpec) -> list[str]:
    """What is wrong with `key: spec` against the field it names (type, bounds), if anything."""
    from pydantic import TypeAdapter

    section, _, name = key.partition(".")
    model = SEARCHABLE[section]
    field = model.model_fields[name]
    adapter = TypeAdapter(Annotated[field.annotation, *field.metadata] if field.metadata else field.annotation)
    values = list(spec.grid or spec.choice or spec.uniform or spec.loguniform)
    problems = []
    if spec.kind in ("uniform", "loguniform") and field.annotation not in (int, float):
        return [f"{key}: {spec.kind} needs a numeric field ({name} is {field.annotation}); use choice"]
    for v in values:
        try:
            adapter.validate_python(v)
        except ValidationError as e:
            problems.append(f"{key}: {v!r} is not a valid {section}.{name} ({e.errors()[0]['msg']})")
    return problems


class SearchObjective(_Section):
    quality: Literal["auto", "mean", "mme", "geneval", "agreement", "nll"] = Field(
        "auto", description="mean of digits-MME and digits-GenEval overall, or one of them (digits family); held-out "
        "agreement with the source (mean over tasks); minus the mean held-out NLL; auto: mean for digits, else "
        "agreement")
    cost: Literal["active_params", "latency"] = Field(
        "active_params", description="active parameters per generation token, or measured latency "
        "(und + gen milliseconds per sample)")
    kind: Literal["budget", "tradeoff"] = Field(
        "budget", description="budget: maximise quality with cost <= budget x the dense model's; "
        "tradeoff: maximise quality - weight x cost / dense cost")
    budget: float = Field(0.8, gt=0, le=10, description="kind=budget: allowed cost as a fraction of the dense model's")
    weight: float = Field(0.5, ge=0, le=100, description="kind=tradeoff: quality given up per unit of relative cost")


class SearchConfig(_Section):
    enabled: bool = Field(False, description="Ray Tune search over partition / adapt settings (trials run "
                          "partition → short adapt → evaluate; writes the Pareto front and the best pipeline)")
    space: dict[Annotated[str, AfterValidator(_space_key)], SpaceSpec] = Field(
        default_factory=dict, max_length=64,
        description="dotted key (partition.num_experts, adapt.lr, ...) → {grid|choice: [...]} or "
        "{uniform|loguniform: [lo, hi]}; other keys keep the partition / adapt sections' values")
    num_samples: int = Field(8, ge=1, le=100_000, description="trials (times the grid size when a key uses grid)")
    max_concurrent_trials: int | Literal["auto"] = Field(
        "auto", description="trials at once; auto: the cluster's CPUs (GPUs) / each trial's trainer's, so no trial "
        "waits for resources")
    search_alg: Literal["random", "optuna"] = Field(
        "random", description="random (and grid) search, or Optuna's TPE (needs the optuna package)")
    asha: bool = Field(True, description="ASHA early stopping: a trial whose score after Expert-Frozen Tuning is "
                       "in the bottom of its rung skips MoE adaptation")
    reduction_factor: int = Field(2, ge=2, le=16, description="ASHA: keep the top 1/reduction_factor at a rung")
    objective: SearchObjective = Field(default_factory=SearchObjective, description="what the best trial maximises")
    n_und: int = Field(10, ge=1, le=100_000, description="trial evaluation: samples per understanding question type")
    n_gen: int = Field(6, ge=1, le=100_000, description="trial evaluation: prompts per GenEval category")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="search algorithm seed")

    @field_validator("max_concurrent_trials")
    @classmethod
    def _concurrency(cls, v: int | str) -> int | str:
        if v != "auto" and not 1 <= v <= 4096:
            raise ValueError(f"must be 'auto' or 1..4096 (got {v})")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> SearchConfig:
        _rule(not self.enabled or bool(self.space), "space", "an enabled search needs at least one key to vary")
        problems = [p for key, spec in self.space.items() for p in _space_problems(key, spec)]
        grids = [k for k, s in self.space.items() if s.grid is not None]
        if self.search_alg == "optuna" and grids:
            problems.append(f"{grids}: optuna samples its own points; use choice instead of grid")
        _rule(not problems, "space", "; ".join(problems))
        return self


class PipelineConfig(_Section):
    name: str = Field("default", min_length=1, max_length=100, description="MLflow run name prefix")
    experiment: str = Field("unislim", min_length=1, max_length=200, description="MLflow experiment")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="global seed")
    model: ModelConfig = Field(default_factory=ModelConfig, description="what to compress")
    data: DataConfig = Field(default_factory=DataConfig, description="training and held-out data")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="what MLflow receives")
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig, description="reference model training")
    shard: ShardConfig = Field(default_factory=ShardConfig, description="calibration data")
    score: ScoreConfig = Field(default_factory=ScoreConfig, description="importance scoring")
    prune: PruneConfig = Field(default_factory=PruneConfig, description="training-free pruning")
    partition: PartitionConfig = Field(default_factory=PartitionConfig, description="dense MLP → MoE conversion")
    adapt: AdaptConfig = Field(default_factory=AdaptConfig, description="Expert-Frozen Tuning + MoE adaptation")
    mod: ModConfig = Field(default_factory=ModConfig, description="task-aware Mixture-of-Depths (UniMoD)")
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig, description="evaluation")
    accelerate: AccelerateConfig = Field(default_factory=AccelerateConfig, description="FlashU acceleration")
    search: SearchConfig = Field(default_factory=SearchConfig, description="Ray Tune search over partition / adapt")

    @model_validator(mode="after")
    def _pretrain_needs_reference(self) -> PipelineConfig:
        _rule(not (self.pretrain.enabled and self.model.source != "reference"), "pretrain.enabled",
              f"pretraining only applies to model.source='reference' (got source={self.model.source!r})")
        _rule(not (self.score.enabled and not self.shard.enabled), "score.enabled",
              "scoring needs calibration data: set shard.enabled=true (or score.enabled=false)")
        _rule(not (self.prune.enabled and not self.score.enabled), "prune.enabled",
              "pruning needs the scores: set score.enabled=true (or prune.enabled=false)")
        names = [t.name for t in self.shard.tasks]
        _rule(self.prune.calibration in ("auto", "all", *names), "prune.calibration",
              f"must be 'auto', 'all' or a task of shard.tasks {names} (got {self.prune.calibration!r})")
        _rule(not (self.partition.enabled and not self.score.enabled), "partition.enabled",
              "partitioning ranks neurons by their scores: set score.enabled=true (or partition.enabled=false)")
        _rule(self.partition.calibration in ("all", *names), "partition.calibration",
              f"must be 'all' or a task of shard.tasks {names} (got {self.partition.calibration!r})")
        _rule(not (self.adapt.enabled and not self.partition.enabled), "adapt.enabled",
              "adaptation trains the partitioned model: set partition.enabled=true (or adapt.enabled=false)")
        _rule(not (self.adapt.dense_baseline and not (self.prune.enabled and self.prune.method == "neurons")),
              "adapt.dense_baseline", "fine-tunes the prune stage's model: needs prune.enabled=true and "
              f"prune.method='neurons' (got enabled={self.prune.enabled}, method={self.prune.method!r})")
        _rule(not (self.adapt.fail_at_step is not None and self.adapt.max_failures == 0), "adapt.fail_at_step",
              "an injected failure needs adapt.max_failures >= 1 to recover")
        _rule(not (self.mod.enabled and self.mod.schedule == "auto" and not self.score.enabled), "mod.schedule",
              "auto derives capacities from the scores: set score.enabled=true (or mod.schedule=table)")
        _rule(not (self.search.enabled and not self.score.enabled), "search.enabled",
              "trials partition by the neuron scores: set score.enabled=true (or search.enabled=false)")
        kinds = sorted({t.kind for t in self.shard.tasks})
        _rule(not (self.shard.enabled and self.model.source == "reference" and "text" in kinds), "shard.tasks",
              "the reference model runs 'und' and 'gen' tasks, not 'text'")
        trains = [s for s in ("pretrain", "adapt", "mod", "search") if getattr(self, s).enabled]
        _rule(not (trains and not self.shard.enabled), "shard.enabled",
              f"{trains} read their training data from the shard stage's train/ shards: set shard.enabled=true")
        data = [t.name for t in self.training_tasks()]
        for section in ("pretrain", "adapt", "mod"):
            mix = getattr(self, section).mix
            if mix is not None:
                _rule(set(mix) <= set(data) and bool(mix) and all(v > 0 for v in mix.values()), f"{section}.mix",
                      f"must give positive shares of the training tasks {data} (got {mix})")
        for section, keys in (("mod.table", (self.mod.table or {})), ("mod.keep_last", (self.mod.keep_last or {})),
                              ("mod.causal_tasks", (self.mod.causal_tasks or []))):
            unknown = sorted(set(keys) - set(data))
            _rule(not (self.mod.enabled and unknown), section, f"names tasks {unknown} that are not training tasks "
                  f"{data}")
        return self

    def training_tasks(self) -> list[DataTask]:
        """data.tasks, or the calibration tasks of shard.tasks with equal weights."""
        if self.data.tasks is not None:
            return list(self.data.tasks)
        return [DataTask(**t.model_dump()) for t in self.shard.tasks]

    def mix(self, section: str | None = None) -> dict[str, float]:
        """Task → share of each training batch for `section` (its `mix`, else data weights), summing to 1."""
        weights = getattr(getattr(self, section), "mix", None) if section else None
        weights = weights or {t.name: t.weight for t in self.training_tasks()}
        total = sum(weights.values())
        return {k: v / total for k, v in weights.items()}

    @model_validator(mode="after")
    def _accelerate_inputs(self) -> PipelineConfig:
        a = self.accelerate
        _rule(not (a.enabled and a.task_pruning.enabled and not self.score.enabled), "accelerate.task_pruning",
              "cuts each task's MLPs by its neuron scores: set score.enabled=true (or task_pruning.enabled=false)")
        _rule(not (a.enabled and a.task_pruning.enabled and a.task_pruning.full_last_steps > self.evaluate.steps),
              "accelerate.task_pruning.full_last_steps", f"must be <= evaluate.steps "
              f"(got {a.task_pruning.full_last_steps} > {self.evaluate.steps})")
        return self

    def digest(self) -> str:
        """Short hash of the resolved config (an MLflow tag)."""
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# Loading


def _format(err: dict[str, Any]) -> str:
    loc = [str(p) for p in err["loc"] if p != "[key]"]  # a dict key's own error names the key
    msg = err["msg"]
    if msg.startswith("Value error, @"):  # a `_rule`: "@field: message"
        field, _, msg = msg[len("Value error, @"):].partition(": ")
        loc = loc + field.split(".")  # the field is relative to the section that raised
    elif msg.startswith("Value error, "):  # a validator's plain ValueError
        msg = msg[len("Value error, "):]
    elif err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif "input" in err and err["type"] not in ("missing",) and not isinstance(err["input"], dict):
        msg = f"{msg} (got {err['input']!r})"
    return f"{'.'.join(loc) or '<root>'}: {msg}"


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> list[str]:
    """Apply `a.b.c=value` overrides in place (values parsed as YAML; a number indexes a list, as in
    `shard.tasks.0.path=...`); return errors."""
    errors = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.split(".")
        if not sep or not key or not all(p.strip() for p in parts):
            errors.append(f"{item}: override must look like key=value (e.g. pretrain.lr=3e-4)")
            continue
        try:
            value = yamlio.load(raw) if raw != "" else None
        except yaml.YAMLError as e:
            errors.append(f"{key}: the value {raw!r} is not valid YAML ({yamlio.describe(e)}); "
                          "quote it to pass a string")
            continue
        node = data
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):  # `shard.tasks.0.path`: an index into a list
                if not part.isdigit() or int(part) >= len(node):
                    errors.append(f"{'.'.join(parts[:i])}: has {len(node)} item(s); {part!r} is not an index of "
                                  f"one, cannot set {key}")
                    break
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
                continue
            if not isinstance(node, dict):
                errors.append(f"{'.'.join(parts[:i])}: is not a section, cannot set {key}")
                break
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
    return errors


def _read_yaml(path: Path, source: str) -> Any:
    """The one YAML document at `path`; `ConfigError` naming the file for anything unreadable."""
    def fail(problem: str):
        return ConfigError(source, [problem])

    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise fail("file not found") from None
    except IsADirectoryError:
        raise fail("is a folder; expected a pipeline YAML file") from None
    except PermissionError:
        raise fail("not readable (permission denied)") from None
    except OSError as e:
        raise fail(f"cannot be read ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise fail(f"is not UTF-8 text (byte 0x{raw[e.start]:02x} at line {line}, offset {e.start}); "
                   "save it as UTF-8") from None
    try:
        data = yamlio.load(text)
    except yaml.YAMLError as e:
        raise fail(f"not valid YAML ({yamlio.describe(e)})") from None
    if data is None:  # empty, or only comments: not "the default pipeline" by accident
        raise fail("has no settings (empty or only comments); write `{}` to run the default pipeline")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                data: dict[str, Any] | None = None) -> PipelineConfig:
    """Read, override and validate a pipeline file; raise `ConfigError` listing every problem."""
    source = str(path) if path is not None else "<config>"
    if data is None:
        data = _read_yaml(Path(path), source)
    if not isinstance(data, dict):
        raise ConfigError(source, [f"<root>: must be a mapping of sections (got {type(data).__name__})"])
    errors = apply_overrides(data, overrides or [])
    try:
        cfg = PipelineConfig.model_validate(data)
    except ValidationError as e:
        errors += [_format(err) for err in e.errors()]
        cfg = None
    except RecursionError:  # a value nested thousands deep
        errors.append("<root>: nested too deeply to validate")
        cfg = None
    if errors:
        raise ConfigError(source, errors)
    return cfg


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": 1}}` → `{"a.b": 1}` (MLflow params)."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    out: dict[str, Any] = {}
    for k, v in obj.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
