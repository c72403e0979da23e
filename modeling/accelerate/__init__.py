"""FlashU-style training-free, task-aware inference acceleration (runtime; no Ray, no MLflow).

    from unislim.modeling.accelerate import Acceleration, AcceleratedModel, LayerSkip, TokenPruning
    fast = AcceleratedModel(model, Acceleration(layer_skip=LayerSkip(every=5, count=1),
                                                token_pruning=TokenPruning(layer=1, keep=0.25)))
    fast.answer(images, question_ids)              # same API as UniDigitsModel
    fast.generate_images(prompt_ids, steps=20)
    evaluate_reference(fast)                       # quality, FLOPs and params of the accelerated model
"""

from .compare import latency_ms, timing_batches, variants
from .latency import interleaved_latency
from .runtime import AcceleratedModel
from .settings import Acceleration, CfgSchedule, HeadCache, LayerSkip, TaskPruning, TokenPruning

__all__ = [
    "AcceleratedModel",
    "Acceleration",
    "CfgSchedule",
    "HeadCache",
    "LayerSkip",
    "TaskPruning",
    "TokenPruning",
    "interleaved_latency",
    "latency_ms",
    "timing_batches",
    "variants",
]
