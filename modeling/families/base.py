"""`Family`: what every stage needs to know about one kind of checkpoint, and nothing more.

Stages hold a family and call it; they never import a concrete model. A family answers, for its
checkpoints:

| concern      | methods                                  | used by                              |
|--------------|------------------------------------------|--------------------------------------|
| load         | `load`, `adapter`                        | every stage                          |
| tasks, data  | `kinds`, `check_table`, `reference_rows` | shard (schemas, row checks)          |
| calibrate    | `calibrate`                              | score                                |
| train        | `collate`, `loss`                        | the one training loop                |
| evaluate     | `eval_batch`, `evaluate`                 | evaluate, search trials              |
| generate     | `generate` (with a per-step hook)        | accelerate, evaluate                 |
| cost         | `active_parameters`                      | evaluate, partition, accelerate      |

A family instance is small and picklable (it crosses into Ray actors and Train workers): it holds
the user's adapter override from `pipeline.yaml` (`model.adapter`) and nothing heavier.

Batches arrive as Ray Data hands them: `{column: numpy array}` per task. `collate` turns the rows
of several tasks into one training batch; `eval_batch` turns one task's rows into what held-out
metrics need: for a token task the logits at every predicted position and the targets there
(`TokenOutputs`), for a continuous task (the digits model's denoising) a prediction and a target.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
import torch
from torch import nn

from unislim.errors import DataError  # noqa: F401  (a data row or file is unusable: task, file, row)

Rows = dict[str, np.ndarray]  # one task's rows, column -> array (what Ray Data's iter_batches yields)


def step_bucket(index: int, steps: int, buckets: int) -> int:
    """Step `index` of `steps` (a denoising step, an image token's position) → bucket 0 … buckets − 1."""
    return min(buckets - 1, index * buckets // steps)


class RowProblems:
    """Bad rows of one table, by problem: `add(problem, row, detail)`, then `raise_if_any(where, n)`
    raises one `DataError` saying how many rows each problem rejected, with the first of each."""

    def __init__(self):
        self.rows: dict[str, list[tuple[int, str]]] = {}

    def add(self, problem: str, row: int, detail: str) -> None:
        self.rows.setdefault(problem, []).append((row, detail))

    def raise_if_any(self, where: str, n_rows: int) -> None:
        if not self.rows:
            return
        bad = len({r for rows in self.rows.values() for r, _ in rows})
        parts = [f"{len(rows)} {problem} (first: row {rows[0][0]}, {rows[0][1]})" for problem, rows in self.rows.items()]
        raise DataError(f"{where}: {bad} of {n_rows} rows rejected: " + "; ".join(parts))


@dataclass(frozen=True)
class TaskKind:
    """A kind of task a family runs: its Parquet columns (documented schema) and its loss."""

    name: str  # und | gen | text
    columns: dict[str, str]  # required column -> what it holds (README's schema table)
    optional: dict[str, str] = field(default_factory=dict)
    loss: str = "nll"  # the held-out metric: nll (token cross-entropy) or mse (continuous)
    description: str = ""


@dataclass
class TokenOutputs:
    """Logits at every predicted position of a batch and the token there. logits (N, V), targets (N,)."""

    logits: torch.Tensor
    targets: torch.Tensor


@dataclass
class ContinuousOutputs:
    """A continuous prediction and its target, e.g. a denoising velocity. Both (N, ...)."""

    prediction: torch.Tensor
    target: torch.Tensor


class Family:
    """Base class; subclasses set `name` and `kinds` and implement what their checkpoints need."""

    name: ClassVar[str] = ""
    kinds: ClassVar[dict[str, TaskKind]] = {}
    default_task: ClassVar[str | None] = None  # the task surgery assumes when no task scope is set
    primary_task: ClassVar[str | None] = None  # whose active parameters `params/active` reports
    causal_kinds: ClassVar[tuple[str, ...]] = ()  # kinds decoded token by token (MoD routes them causally)
    mod_keep_last: ClassVar[dict[str, int]] = {}  # kind -> last N tokens of a sample MoD never skips

    def __init__(self, adapter: dict[str, Any] | None = None, trust_remote_code: bool = False):
        self.adapter_override = adapter  # model.adapter from pipeline.yaml (None: the built-in table)
        self.trust_remote_code = trust_remote_code

    # ------------------------------------------------------------ recognising and loading
    @classmethod
    def matches(cls, config) -> bool:
        """Whether a checkpoint's config (`AutoConfig.from_pretrained`) belongs to this family."""
        raise NotImplementedError

    def auto_class(self, config) -> type:
        """The transformers Auto class that builds this family's checkpoints."""
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def load(self, path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
        """The checkpoint at `path` in eval mode, with any recorded surgery re-applied."""
        from unislim.modeling.loading import load_pretrained

        return load_pretrained(path, self, device=device, dtype=dtype)

    def adapter(self, model: nn.Module):
        """Where this model keeps its layers, MLPs and attention (`modeling.adapters`)."""
        from unislim.modeling.adapters import adapter_for

        return adapter_for(model, self.adapter_override)

    def stamp(self, model: nn.Module, adapter) -> None:
        """Record this family and `adapter` in the model's config before surgery is recorded."""
        from unislim.modeling.surgery.record import stamp

        stamp(model, family=self.name, adapter=adapter, default_task=self.default_task)

    def describe(self, model: nn.Module) -> str:
        """A short name for what was loaded (e.g. `qwen2-4L-d64`)."""
        config = model.config
        return f"{config.model_type}"

    # ------------------------------------------------------------ data
    def check_table(self, kind: str, table, where: str, model_config=None) -> None:
        """Raise `DataError` naming `where` (task and file) and the row if `table` cannot be used."""
        self.task_kind(kind, where)
        missing = [c for c in self.kinds[kind].columns if c not in table.column_names]
        if missing:
            raise DataError(f"{where}: a {kind!r} task needs columns {list(self.kinds[kind].columns)}; missing "
                            f"{missing} (found {sorted(table.column_names)})")

    def reference_rows(self, kind: str, n: int, seed: int, split: str = "train") -> list[dict[str, Any]]:
        """Rows this family can generate itself (the digits family draws scenes); others have none."""
        raise DataError(f"the {self.name} family has no built-in data: give shard.tasks / data.tasks a Parquet path")

    def task_kind(self, kind: str, where: str = "task") -> TaskKind:
        if kind not in self.kinds:
            raise DataError(f"{where}: the {self.name} family runs task kinds {sorted(self.kinds)}, not {kind!r}")
        return self.kinds[kind]

    def tokens_per_sample(self, kind: str, model_config=None) -> float:
        """Mean tokens of one sample of `kind` (weights a MoD schedule's token budget across tasks)."""
        return 1.0

    # ------------------------------------------------------------ calibration (score)
    def calibrate(self, model: nn.Module, kind: str, batch: Rows, recorder, **options) -> int:
        """Run one batch of calibration rows under `recorder` (setting its token mask, and its bucket
        where a task has steps); return the number of rows."""
        raise NotImplementedError

    # ------------------------------------------------------------ training
    def collate(self, rows: dict[str, Rows], generator: torch.Generator, model_config=None) -> dict[str, Any]:
        """Rows of each task (`{task kind: rows}`) → one training batch for `loss`. Random draws
        (noise, dropout of prompts) come from `generator`, so a step's batch is reproducible."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(total loss, per-task parts keyed `<kind>_loss`) of one training batch."""
        raise NotImplementedError

    # ------------------------------------------------------------ evaluation
    def eval_batch(self, model: nn.Module, kind: str, rows: Rows, generator: torch.Generator
                   ) -> TokenOutputs | ContinuousOutputs:
        """Teacher-forced outputs of one task's held-out rows (what NLL and agreement are computed on)."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module, *, out_dir: Path | None = None, progress: Callable[[str], None] = print,
                 **options) -> dict[str, Any]:
        """The family's own quality metrics beyond the generic ones (digits: MME, GenEval, FID)."""
        return {}

    def generate(self, model: nn.Module, kind: str, inputs: dict[str, Any], *,
                 step_hook: Callable[[Any], None] | None = None, **options):
        """Sample with the family's own decoding loop; `step_hook(step)` runs before every step
        (FlashU's layer skip, CFG schedule and head cache, step buckets)."""
        raise NotImplementedError

    # ------------------------------------------------------------ cost
    def active_parameters(self, model: nn.Module, task: str) -> int:
        """Parameters one token of `task` passes through (MoE: shared + top-k experts; MoT: one twin)."""
        from unislim.modeling.surgery.params import active_parameters

        return active_parameters(model, task)
