"""Zero-shot downstream evaluation through lm-evaluation-harness, on an exported HF directory.

`python -m archscale.main --config=configs/X.py --mode=evaluate --workdir=DIR` evaluates
`eval.model` (default DIR/hf, exported from the run's latest checkpoint when missing) on
`eval.tasks` (default: the paper's nine) and writes DIR/eval.json:

  tasks       {task: {metric: value}} (lm-eval's metric names without the ",none" filter suffix)
  average     mean over tasks of each task's headline metric (`average_of` says which one)
  model, num_fewshot, limit, lm_eval_version

Tasks whose data is neither cached nor reachable (offline machines) fail before any model runs,
naming each such task and how to provide its data. `loglikelihoods` scores (context,
continuation) pairs with archscale's own model, the same quantity the harness asks of the HF one.
"""

from __future__ import annotations

import functools
import json
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from archscale import settings
from archscale.settings import PAPER_TASKS

# A task's headline metric for the average: the first of these it reports.
HEADLINE = ("acc_norm", "acc", "f1", "exact_match", "em")


@functools.lru_cache(maxsize=4)
def _task_manager(include_path: str) -> Any:
  """lm-eval's index of task YAMLs (slow to build: thousands of files), one per include path."""
  from lm_eval.tasks import TaskManager

  return TaskManager(include_path=include_path or None)


def load_tasks(names: Sequence[str], include_path: str = "") -> tuple[list[Any], Any]:
  """lm-eval Task objects for `names` (data loaded), and the TaskManager that found them.

  Unknown names and tasks whose data cannot be loaded raise one ValueError naming all of them.
  """
  manager = _task_manager(str(include_path))
  known = set(manager.all_tasks)
  unknown = [n for n in names if n not in known]
  if unknown:
    raise ValueError(f"eval.tasks: {unknown} are not lm-evaluation-harness tasks (nor in "
                     f"eval.include_path={include_path!r}); e.g. {','.join(PAPER_TASKS)}")
  tasks, failed = [], {}
  for name in names:
    try:
      tasks.extend(manager.load([name])["tasks"].values())
    except Exception as e:  # datasets raises many types (connection, not found, offline)
      failed[name] = f"{type(e).__name__}: {str(e)[:300]}"
  if failed:
    lines = "\n".join(f"  {n}: {why}" for n, why in failed.items())
    raise ValueError(
        f"eval.tasks: the data of {sorted(failed)} could not be loaded (offline, or not in the "
        f"datasets cache):\n{lines}\nProvide it by (a) running once with network access, or "
        "copying a datasets cache that holds it and pointing HF_DATASETS_CACHE / HF_HOME at it "
        "(with HF_DATASETS_OFFLINE=1 offline), or (b) writing a task YAML whose dataset_path is "
        "json (or csv/parquet) with dataset_kwargs.data_files naming local files, in a folder "
        "given as eval.include_path")
  return tasks, manager


def summarize(results: dict[str, Any]) -> dict[str, Any]:
  """{tasks: {task: {metric: value}}, average, average_of} from lm-eval's results dict."""
  tasks: dict[str, dict[str, float]] = {}
  for task, row in results["results"].items():
    metrics = {k.split(",")[0]: float(v) for k, v in row.items()
               if "," in k and isinstance(v, (int, float)) and not isinstance(v, bool)}
    tasks[task] = metrics
  average_of = {t: next(m for m in HEADLINE if m in ms) for t, ms in tasks.items()
                if any(m in ms for m in HEADLINE)}
  values = [tasks[t][m] for t, m in average_of.items()]
  return {"tasks": tasks, "average": float(np.mean(values)) if values else None,
          "average_of": average_of}


def evaluate_dir(model_dir: str | pathlib.Path, tasks: Sequence[str], *, include_path: str = "",
                 batch_size: int = 8, limit: int = 0, num_fewshot: int = 0, device: str = "auto",
                 dtype: str = "auto", bootstrap_iters: int = 1000,
                 log_samples: bool = False) -> dict[str, Any]:
  """Runs lm-evaluation-harness on an HF directory; returns lm-eval's full results dict."""
  import lm_eval
  import torch
  from lm_eval.models.huggingface import HFLM

  from archscale import hf

  hf.check_transformers(hf.spec_from_hf(model_dir))
  task_objs, manager = load_tasks(tasks, include_path)
  if device == "auto":
    device = "cuda" if torch.cuda.is_available() else "cpu"
  lm = HFLM(pretrained=str(model_dir), batch_size=batch_size, device=device, dtype=dtype)
  return lm_eval.simple_evaluate(
      model=lm, tasks=task_objs, task_manager=manager, num_fewshot=num_fewshot or None,
      limit=limit or None, bootstrap_iters=bootstrap_iters, log_samples=log_samples)


def loglikelihoods(spec: Any, params: dict, tokenizer: Any,
                   pairs: Sequence[tuple[str, str]]) -> list[float]:
  """log p(continuation | context) under archscale's model, one float per pair.

  Trailing whitespace of a context belongs to its continuation (lm-evaluation-harness's
  convention, which keeps a word's leading space with the word). Runs one unpadded sequence at
  a time: meant for checks and small sets, not for whole benchmarks.
  """
  import jax
  import jax.numpy as jnp

  from archscale import model as model_lib

  model = model_lib.Transformer(spec)
  forward = jax.jit(lambda p, t: jax.nn.log_softmax(model_lib.forward(model, p, t), axis=-1))
  out = []
  for context, continuation in pairs:
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
      context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    ctx, cont = tokenizer.encode(context), tokenizer.encode(continuation)
    tokens = np.asarray([ctx + cont], np.int32)
    logp_TV = np.asarray(forward(params, jnp.asarray(tokens[:, :-1])))[0]
    targets = tokens[0, len(ctx):]
    out.append(float(logp_TV[np.arange(len(ctx) - 1, tokens.shape[1] - 1), targets].sum()))
  return out


def run_evaluate(config: Any, workdir: pathlib.Path) -> None:
  """`--mode=evaluate`: WORKDIR/eval.json for `eval.model` (default WORKDIR/hf) on `eval.tasks`."""
  import lm_eval

  from archscale import hf

  workdir = pathlib.Path(workdir)
  e = settings.EvalConfig.from_config(config)
  model_dir = pathlib.Path(e.model) if str(e.model).strip() else workdir / "hf"
  if not (model_dir / hf.CONFIG_FILE).exists():
    if str(e.model).strip():
      raise ValueError(f"eval.model={str(e.model)!r} is not a Hugging Face model directory")
    if not (workdir / "checkpoints").is_dir():
      raise ValueError(f"{workdir} has neither hf/ nor checkpoints/: train the run first, or "
                       "set eval.model to an exported directory")
    hf.run_export(config, workdir)
  results = evaluate_dir(model_dir, e.task_names, include_path=e.include_path,
                         batch_size=e.batch_size, limit=e.limit, num_fewshot=e.num_fewshot,
                         device=e.device, dtype=e.dtype, bootstrap_iters=e.bootstrap_iters)
  summary = {**summarize(results), "model": str(model_dir), "num_fewshot": e.num_fewshot,
             "limit": e.limit, "lm_eval_version": lm_eval.__version__}
  (workdir / "eval.json").write_text(json.dumps(summary, indent=2) + "\n")
  print(json.dumps({"average": summary["average"], "average_of": summary["average_of"]}))
