"""Tokens for training: text sources (files, JSONL, the bundled KJV), tokenizers, `prepare` (a
corpus into token shards with a manifest) and `batches` (a batch as a pure function of seed and
step, so resume is exact). Imports only `core`.
"""
