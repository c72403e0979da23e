"""Mixture-of-Depths token routing (UniMoD): routing math and capacity schedules."""

from .routing import capacity_tokens, layer_flops

__all__ = ["capacity_tokens", "layer_flops"]
