"""Seed noise against tokens: what a CPU study can tell apart.

Trains one shape (configs/demo.py's model on its bundled corpus) with several seeds at increasing
token budgets, in this process, and prints the seed-to-seed standard deviation of the final eval
loss against tokens and against wall time. With `--shapes`, two shapes far apart from the demo
shape (`d_model/sqrt(N)` and r at the ends of the demo's grid) are trained at the largest budget
with the same seeds, and their mean loss differences are set against that noise: a study needs
effects several times the noise at the budgets it trains.

  python benchmarks/seed_noise.py                       # 250k, 500k, 1M tokens x 3 seeds
  python benchmarks/seed_noise.py --tokens=1e6,4e6 --seeds=4 --shapes

Prints one JSON document (and writes it to --out): per budget the tokens, the losses, their mean
and standard deviation (ddof 1), the mean wall time of a run; the log-log slope of the standard
deviation against tokens; and, with --shapes, each far shape's mean loss minus the demo shape's
over the pooled standard deviation.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from archscale.core import config_lib  # noqa: E402
from archscale.data import prepare  # noqa: E402
from archscale.model.arch import ArchSpec, steps_for_tokens  # noqa: E402
from archscale.train import trainer as train_lib  # noqa: E402

# Far from the demo shape on both axes (its grid spans x 0.1-0.4 and r 0.5-6).
FAR_SHAPES = {"narrow_attention_heavy": (0.1, 0.5), "wide_mlp_heavy": (0.4, 6.0)}


def _config(data: pathlib.Path, tokens: float, seed: int, spec: ArchSpec | None) -> Any:
  c = config_lib.load_config_file(ROOT / "configs" / "demo.py")
  c.data.path = str(data)
  c.seed = seed
  if spec is not None:
    c.model.update(spec.to_dict())
  c.train.steps = steps_for_tokens(tokens, c.train.global_batch_size * c.data.seq_len)
  c.train.update(checkpoint_every=0, tensorboard=False, compilation_cache="", log_every=10**6)
  c.train.eval_every = c.train.steps  # one evaluation, at the end
  return c


def _runs(data: pathlib.Path, tokens: float, seeds: int, work: pathlib.Path,
          spec: ArchSpec | None = None, tag: str = "demo") -> tuple[list[float], list[float]]:
  losses, walls = [], []
  for seed in range(seeds):
    start = time.time()
    summary = train_lib.train(_config(data, tokens, seed, spec), work / f"{tag}-{tokens:g}-{seed}")
    losses.append(float(summary["eval_loss"]))
    walls.append(time.time() - start)
  return losses, walls


def _far_spec(x: float, r: float) -> ArchSpec:
  demo = ArchSpec.from_dict(config_lib.arch_config("demo"))
  same = {k: getattr(demo, k) for k in ("vocab_size", "max_seq_len", "rope_theta",
                                        "rope_scaling", "norm_eps", "tie_embeddings")}
  spec, _ = ArchSpec.from_budget(demo.params_nonembed, x, r, demo.gqa, demo.n_layers,
                                 demo.d_head, d_model_multiple=8, d_ff_multiple=16, **same)
  return spec


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tokens", default="2.5e5,5e5,1e6", help="comma-separated token budgets")
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--shapes", action="store_true", help="also train the far shapes")
  parser.add_argument("--out", default="", help="also write the JSON here")
  args = parser.parse_args()
  budgets = sorted(float(t) for t in args.tokens.split(","))
  with tempfile.TemporaryDirectory(prefix="seed-noise-") as tmp:
    work = pathlib.Path(tmp)
    data = work / "data"
    prepare.prepare("kjv", data, "byte", eval_fraction=0.01)
    rows = []
    for tokens in budgets:
      losses, walls = _runs(data, tokens, args.seeds, work)
      rows.append({"tokens": tokens, "losses": losses, "mean": float(np.mean(losses)),
                   "std": float(np.std(losses, ddof=1)), "wall_s": float(np.mean(walls))})
      print(json.dumps(rows[-1]), file=sys.stderr)
    stds = np.array([r["std"] for r in rows])
    slope = (float(np.polyfit(np.log(budgets), np.log(stds), 1)[0])
             if len(rows) > 1 and np.all(stds > 0) else None)
    out: dict[str, Any] = {"shape": "demo", "seeds": args.seeds, "budgets": rows,
                           "std_vs_tokens_loglog_slope": slope}
    if args.shapes:
      base, far = rows[-1], {}
      for name, (x, r) in FAR_SHAPES.items():
        spec = _far_spec(x, r)
        losses, _ = _runs(data, budgets[-1], args.seeds, work, spec, name)
        pooled = float(np.sqrt((np.var(losses, ddof=1) + base["std"] ** 2) / 2))
        far[name] = {"spec": spec.to_dict(), "losses": losses,
                     "difference": float(np.mean(losses)) - base["mean"],
                     "difference_over_noise": (float(np.mean(losses)) - base["mean"]) / pooled}
      out["far_shapes"] = far
  text = json.dumps(out, indent=1)
  print(text)
  if args.out:
    pathlib.Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
  main()
