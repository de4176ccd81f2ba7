"""Pretraining: the optimizer and jitted step (`step`), the fused chunked loss, orbax checkpoints,
step timing, profiling, preemption and metric logs (`monitor`), what a run was trained as and
the checks that keep it so (`recipe`), and the resumable loop (`trainer`, the `--mode=train`
entry point). Imports `core`, `model` and `data`.
"""
