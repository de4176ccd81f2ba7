"""A tiny end-to-end demo on CPU: prepare the bundled corpus, sweep, fit, benchmark, search.

`python -m archscale.main --config=configs/demo.py` runs the whole pipeline in a few minutes.
"""

from archscale import config_lib


def get_config():
  c = config_lib.make_config("demo")
  c.mode = "pipeline"
  c.data.source = "kjv"
  c.data.tokenizer = "byte"
  c.data.seq_len = 128
  c.bench.archs = "demo"
  c.bench.batch_sizes = (1, 4, 16)
  c.bench.input_len = 64
  c.bench.output_len = 32
  c.bench.repeats = 3
  c.bench.dtype = "float32"
  return c
