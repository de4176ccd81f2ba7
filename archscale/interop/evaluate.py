"""Zero-shot downstream evaluation through lm-evaluation-harness, on an exported HF directory.

`python -m archscale.main --config=configs/X.py --mode=evaluate --workdir=DIR` evaluates
`eval.model` (default DIR/hf, exported from the run's latest checkpoint when missing) on
`eval.tasks` (default: the paper's nine) and writes DIR/eval.json:

  tasks       {task: {metric: value}} (lm-eval's metric names without the ",none" filter suffix)
  average     mean over tasks of each task's headline metric (`average_of` says which one)
  step        the checkpoint step evaluated (null for an `eval.model` directory)
  recipe      what the numbers depend on besides the weights (`eval_recipe`)
  model, num_fewshot, limit, lm_eval_version

A run's own model is its checkpoint (`export.step`, 0 = latest), exported to DIR/hf first; an
eval.json of the same step and recipe is reused, so evaluating again costs nothing. In a sweep's
run directory (`runs/<run_id>/`) the sweep's results.jsonl is rebuilt afterwards: its rows carry
each run's eval.json (`attach`), wherever the file came from.

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

from archscale.core import io, settings
from archscale.core.settings import PAPER_TASKS

# A task's headline metric for the average: the first of these it reports.
HEADLINE = ("acc_norm", "acc", "f1", "exact_match", "em")
EVAL_FILE = "eval.json"


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

  from archscale.interop import hf

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

  from archscale.model import transformer as model_lib

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


def eval_recipe(config: Any) -> dict[str, Any]:
  """What an eval.json's numbers depend on besides the weights: a change means evaluating again."""
  e = settings.EvalConfig.from_config(config)
  return {"tasks": e.task_names, "num_fewshot": e.num_fewshot, "limit": e.limit,
          "dtype": e.dtype, "export_dtype": settings.ExportConfig.from_config(config).dtype}


def read_eval(workdir: str | pathlib.Path) -> dict[str, Any] | None:
  """WORKDIR/eval.json, or None when there is none (or it is unreadable)."""
  try:
    out = json.loads((io.as_path(workdir, "run folder") / EVAL_FILE).read_text(encoding="utf-8"))
  except (OSError, json.JSONDecodeError):
    return None
  return out if isinstance(out, dict) else None


def check_for_sweep(config: Any) -> None:
  """With `sweep.evaluate`: fails unless every `eval.tasks` task and its data can be loaded here,
  so a sweep never trains its runs to fail at evaluating them."""
  if not settings.SweepConfig.from_config(config).evaluate:
    return
  e = settings.EvalConfig.from_config(config)
  if str(e.model).strip():
    raise ValueError(f"sweep.evaluate evaluates each run's own checkpoint, but eval.model="
                     f"{str(e.model)!r} names another model: leave eval.model empty")
  try:
    import lm_eval  # noqa: F401
  except ImportError:
    raise ValueError("sweep.evaluate needs lm-evaluation-harness: pip install -e '.[hf]'") from None
  load_tasks(e.task_names, e.include_path)


def attach(row: dict[str, Any], run_dir: pathlib.Path) -> dict[str, Any]:
  """A finished results row with its run's eval.json as `eval` (tasks, average, average_of,
  step) and `eval_average`, when that file evaluated the row's final checkpoint."""
  found = read_eval(run_dir) if row.get("status") == "finished" else None
  if not found or found.get("step") is None or found.get("step") != row.get("steps"):
    return row
  if found.get("trained") and row.get("trained") and found["trained"] != row["trained"]:
    return row  # evaluated from another training of this folder (an eval.json without the
    # fingerprint predates it and attaches by step, as before)
  keep = ("tasks", "average", "average_of", "step", "recipe")
  return {**row, "eval": {k: found.get(k) for k in keep}, "eval_average": found.get("average")}


def _latest_step(config: Any, workdir: pathlib.Path) -> int | None:
  from archscale.train import checkpoint

  if not (workdir / "checkpoints").is_dir():
    return None
  ckpt = checkpoint.Checkpoints(workdir / "checkpoints", config.train)
  try:
    return ckpt.latest_step()
  finally:
    ckpt.close()


def run_evaluate(config: Any, workdir: pathlib.Path) -> dict[str, Any]:
  """`--mode=evaluate`: WORKDIR/eval.json for `eval.model` (default: the run's checkpoint) on
  `eval.tasks`; returns its contents."""
  import lm_eval

  from archscale.interop import hf

  workdir = io.as_path(workdir, "--workdir")
  e = settings.EvalConfig.from_config(config)
  recipe = eval_recipe(config)
  # A run in a bucket is exported into this user's private local folder: lm-eval reads files.
  local = workdir if io.is_local(workdir) else io.local_mirror(workdir)
  model_dir = pathlib.Path(e.model) if str(e.model).strip() else local / "hf"
  step = None if str(e.model).strip() else (
      settings.ExportConfig.from_config(config).step or _latest_step(config, workdir))
  if str(e.model).strip() and not (model_dir / hf.CONFIG_FILE).exists():
    raise ValueError(f"eval.model={str(e.model)!r} is not a Hugging Face model directory")
  if step is None and not (model_dir / hf.CONFIG_FILE).exists():
    raise ValueError(f"{workdir} has neither hf/ nor checkpoints/: train the run first, or "
                     "set eval.model to an exported directory")
  prior = read_eval(workdir)
  trained = None
  if step is not None:  # which training the numbers belong to, so rows attach by it
    from archscale.train import recipe as recipe_lib

    trained = io.digest(recipe_lib.trained_recipe(workdir, config, step))
  if (step is not None and prior and prior.get("step") == step and prior.get("recipe") == recipe
      and prior.get("trained") == trained):
    print(json.dumps({"reused": str(workdir / EVAL_FILE), "step": step}))
    return prior
  if step is not None:
    hf.run_export(config, workdir, out=model_dir)
  results = evaluate_dir(model_dir, e.task_names, include_path=e.include_path,
                         batch_size=e.batch_size, limit=e.limit, num_fewshot=e.num_fewshot,
                         device=e.device, dtype=e.dtype, bootstrap_iters=e.bootstrap_iters)
  summary = {**summarize(results), "step": step, "recipe": recipe, "trained": trained,
             "model": str(model_dir),
             "num_fewshot": e.num_fewshot, "limit": e.limit,
             "lm_eval_version": lm_eval.__version__}
  io.write_json_atomic(workdir / EVAL_FILE, summary)
  print(json.dumps({"average": summary["average"], "average_of": summary["average_of"]}))
  return summary
