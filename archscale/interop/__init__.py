"""Trained runs leaving archscale: Hugging Face LLaMA directories (`hf`: export with the run's
tokenizer; import is the model's format, re-exported) and zero-shot downstream evaluation through
lm-evaluation-harness (`evaluate`). Imports every stage below `study`.
"""
