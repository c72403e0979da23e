"""Stages: one file each, `run(cfg, inputs, ctx) -> outputs`."""
