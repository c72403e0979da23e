"""Generic surgery on any adapter-described model: pruning, dense → MoE, Mixture-of-Depths."""
