"""Inference cost: KV-cache generation on device (`generate`), the decode-latency harness
(`decode_bench`), the roofline cost model and the throughput sources the search ranks by.
Imports `core`, `model` and `data`; not `train`.
"""
