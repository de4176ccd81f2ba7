"""What a model is and how it runs: `ArchSpec` (dimensions and the parameter, FLOP and KV-byte
accounting), the Flax decoder (`transformer`), its Pallas attention kernels, the device mesh and
sharding rules, and the Hugging Face LLaMA format of its weights. Imports only `core`.
"""
