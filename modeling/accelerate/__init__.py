"""FlashU-style training-free, task-aware inference acceleration: the techniques' settings and math
(no Ray, no MLflow). A family applies them through its own decoding loop's per-step hook
(`Family.accelerate`); the digits family's runtime is `modeling/families/digits/accelerate_runtime.py`.
"""

from .latency import interleaved_latency
from .settings import Acceleration, CfgSchedule, HeadCache, LayerSkip, TaskPruning, TokenPruning

TECHNIQUES = ("task_pruning", "layer_skip", "cfg_schedule", "head_cache", "token_pruning")

__all__ = [
    "Acceleration",
    "CfgSchedule",
    "HeadCache",
    "LayerSkip",
    "TECHNIQUES",
    "TaskPruning",
    "TokenPruning",
    "interleaved_latency",
]
