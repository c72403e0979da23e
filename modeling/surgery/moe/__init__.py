"""Dense → Mixture-of-Experts: the expert partition (Eq. 8) and the MoE MLP (Eq. 9)."""

from .mlp import MoEMLP, grouped_mm_supported
from .partition import cumulative_scores, partition_neurons

__all__ = ["MoEMLP", "cumulative_scores", "grouped_mm_supported", "partition_neurons"]
