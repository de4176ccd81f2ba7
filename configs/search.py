"""Algorithm 1 at LLaMA-3.2-1B's budget with the paper's published law.

`python -m archscale.main --config=configs/search.py --mode=search --workdir=DIR` enumerates the
architectures of N = 973M non-embedding parameters at 16 layers and head size 64, keeps those the
law predicts to be at least as good as LLaMA-3.2-1B, ranks them by the A100 40GB cost model at
batch 16 with 4096 prompt and 1024 generated tokens, walks GQA, and writes search.json,
pareto.png, panda.py and surefire.py to DIR.

The law (configs/paper_law_80m_297m.json) is the paper's multiplicative fit on its 80M-297M runs,
without Chinchilla parameters, so losses are relative: L / L_opt(N, D). Point search.law at your
own fit.json (--mode=fit) for absolute losses, or set search.results to fit one on the fly.
"""

import pathlib

from archscale.core import config_lib


def get_config():
  c = config_lib.make_config("llama3_2_1b")
  c.name = "search_1b"
  c.mode = "search"
  c.search.law = str(pathlib.Path(__file__).resolve().parent / "paper_law_80m_297m.json")
  c.search.n_nonembed = 0                 # 0: the baseline's N (973,146,112)
  c.search.tokens = 0                     # 0: 100 x N, the paper's budget
  c.search.n_layers = 16                  # fixed at 1B in the paper
  c.search.d_head = 64
  c.search.target = "baseline:llama3_2_1b"
  c.search.throughput = "model:a100-40gb"
  c.search.batch_size = 16
  c.search.input_len = 4096
  c.search.output_len = 1024
  # panda.py / surefire.py inherit the sweep's training recipe (configs/sweep.py): with it,
  # train.steps there is D / (256 x 2048) = 185,613 steps.
  recipe = config_lib.load_config_file(pathlib.Path(__file__).resolve().parent / "sweep.py")
  c.train, c.compute = recipe.train, recipe.compute
  c.data.seq_len = recipe.data.seq_len
  return c
