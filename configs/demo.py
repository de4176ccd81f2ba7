"""A tiny end-to-end study on CPU: prepare the bundled corpus, sweep, fit, benchmark, search.

`python -m archscale.main --config=configs/demo.py --workdir=/tmp/demo` runs the whole pipeline
(`--mode=pipeline`) in a few minutes on two CPU cores and leaves report.md in the workdir.

Scale: byte-level models (vocab 256, 128-token windows) at three budgets of roughly 50k, 100k and
200k non-embedding parameters, 2 layers, head size 16. The sweep varies one factor at a time
through the middle of the grids (`sweep.design="cross"`): three widths d_model/sqrt(N) at the
middle r and three r at the middle width, about 15 runs of ~100k tokens each. That is far from
the paper's 100 tokens per parameter; the point is to exercise every stage on real training.

Fit: the multiplicative law with L_opt taken as the best loss of each budget ("empirical"): three
scales at one token budget are too few (N, D) points for a Chinchilla fit. Its losses are
therefore relative (L / L_opt), and so are the search's.

Search: the demo architecture's budget and shape (N ~ 123k) as the baseline and target; throughput
from the A100 40GB cost model (the CPU is not in the cost model's table, so the decode bench on
this machine is reported but cannot calibrate it).
"""

from archscale import config_lib


def get_config():
  c = config_lib.make_config("demo")
  c.mode = "pipeline"
  c.data.source = "kjv"
  c.data.tokenizer = "byte"
  c.data.seq_len = 128

  c.train.global_batch_size = 16
  c.train.lr = 3e-3
  c.train.warmup_steps = 5
  c.train.log_every = 10
  c.train.eval_every = 0        # evaluate once, at the end of each run
  c.train.eval_batches = 4
  c.train.checkpoint_every = 0  # the final checkpoint only: demo runs restart in seconds
  c.train.async_checkpoint = False

  c.sweep.scales = "50k:2:16,100k:2:16,200k:2:16"
  c.sweep.tokens = 100_000
  c.sweep.d_over_sqrt_n = (0.12, 0.2, 0.32)
  c.sweep.r = (0.6, 1.5, 4.0)
  c.sweep.gqa = (2,)
  c.sweep.design = "cross"
  c.sweep.d_model_multiple = 8
  c.sweep.d_ff_multiple = 16
  c.sweep.n_tolerance = 0.1
  c.sweep.r_tolerance = 0.3
  c.sweep.isolation = "process"

  c.fit.form = "multiplicative"
  c.fit.l_opt = "empirical"

  c.bench.archs = "demo"
  c.bench.batch_sizes = (1, 4, 16)
  c.bench.input_len = 64
  c.bench.output_len = 32
  c.bench.repeats = 3
  c.bench.dtype = "float32"

  c.search.target = "baseline:demo"
  c.search.throughput = "model:a100-40gb"
  c.search.tokens = 100_000
  c.search.batch_size = 16
  c.search.input_len = 384
  c.search.output_len = 128
  c.search.d_model_multiple = 8
  c.search.d_ff_multiple = 16
  c.search.gqa_max = 8
  return c
