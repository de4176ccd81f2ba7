"""Fit the conditional scaling law to the demo sweep's results (`--mode=fit`).

`python -m archscale.main --config=configs/fit.py --config.fit.results=PATH` writes fit.json and
plots to the workdir. A small sweep has too few (N, D) budgets to fit Chinchilla's five
parameters, so L_opt is the best loss of each budget here.
"""

from archscale.core import config_lib


def get_config():
  c = config_lib.make_config("demo")
  c.mode = "fit"
  c.fit.results = "runs/demo/results.jsonl"
  c.fit.form = "multiplicative"
  c.fit.l_opt = "empirical"
  c.fit.r_range = (0.5, 5.0)
  return c
