"""Pretraining: the optimizer and jitted step (`step`), the fused chunked loss, orbax checkpoints,
step timing, preemption and metric logs (`monitor`), and the resumable loop (`trainer`, the
`--mode=train` entry point). Imports `core`, `model` and `data`.
"""
