"""Configuration of the reference model with Mixture-of-Depths routers (UniMoD, arXiv 2502.06474).

A subclass of `UniDigitsConfig` with its own `model_type`, so a MoD checkpoint rebuilds its
routers on `from_pretrained` and still passes wherever a reference-family config is expected.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict

from unislim.modeling.families.digits.configuration_unidigits import UniDigitsConfig

TASKS = ("und", "gen")
ROUTINGS = ("task", "shared")


@strict
class UniDigitsModConfig(UniDigitsConfig):
    r"""UniDigitsConfig + where and how much each task's tokens are routed.

    mod_capacity: per task (`und`, `gen`), one capacity per layer in (0, 1]: the fraction of a
        sample's tokens that layer processes. 1.0 = the layer runs dense for that task.
    mod_routing: `task` = one router per task in each routed layer (UniMoD); `shared` = one router
        for every task (the task-agnostic MoD baseline).
    mod_causal_tasks: tasks whose tokens are generated one at a time; at inference their routing
        uses the auxiliary predictor (per token, causal) instead of top-k over the sequence.
    mod_keep_last: per task, the last N tokens of a sample are never skipped (`und`: the question's
        last word and the answer, whose logits are the output).
    mod_aux_weight: weight of the predictor's BCE loss in the training loss.
    """

    model_type = "unidigits_mod"

    mod_capacity: dict[str, list[float]] | None = None
    mod_routing: str = "task"
    mod_causal_tasks: list[str] | None = None
    mod_keep_last: dict[str, int] | None = None
    mod_aux_weight: float | int = 1.0

    def __post_init__(self, **kwargs):
        layers = self.num_hidden_layers
        self.mod_capacity = {t: [float(c) for c in (self.mod_capacity or {}).get(t, [1.0] * layers)] for t in TASKS}
        if self.mod_causal_tasks is None:
            self.mod_causal_tasks = ["und"]
        self.mod_keep_last = {t: int((self.mod_keep_last or {}).get(t, 0)) for t in TASKS}
        super().__post_init__(**kwargs)

    def validate_mod(self):
        """Part of `@strict` validation."""
        if self.mod_routing not in ROUTINGS:
            raise ValueError(f"mod_routing must be one of {ROUTINGS}, got {self.mod_routing!r}")
        for task, caps in self.mod_capacity.items():
            if len(caps) != self.num_hidden_layers:
                raise ValueError(f"mod_capacity[{task!r}] has {len(caps)} entries for {self.num_hidden_layers} layers")
            if not all(0 < c <= 1 for c in caps):
                raise ValueError(f"mod_capacity[{task!r}] must lie in (0, 1], got {caps}")
        if self.mod_routing == "shared" and len({tuple(c) for c in self.mod_capacity.values()}) > 1:
            raise ValueError(f"mod_routing='shared' uses one capacity for every task, got {self.mod_capacity}")
        bad = [t for t in self.mod_causal_tasks if t not in TASKS]
        if bad:
            raise ValueError(f"mod_causal_tasks holds unknown tasks {bad} (known: {TASKS})")

    def router_name(self, task: str) -> str:
        """Which router of a layer serves `task`."""
        return task if self.mod_routing == "task" else "shared"

    def routed(self, layer: int) -> dict[str, list[str]]:
        """Routers of one layer → the tasks they serve (only tasks with capacity < 1 there)."""
        out: dict[str, list[str]] = {}
        for task in TASKS:
            if self.mod_capacity[task][layer] < 1.0:
                out.setdefault(self.router_name(task), []).append(task)
        return out
