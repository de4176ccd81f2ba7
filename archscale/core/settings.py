"""Typed config sections: each mode reads its section of the config through one of these.

Config files (`configs/*.py`) and `--config.section.field=value` overrides stay ml_collections;
code never reads a section as an untyped dict. `TrainConfig.from_config(config)` builds the frozen
dataclass, refusing unknown fields, and `__post_init__` checks every value, naming the field and
the fix. The defaults here are the only ones: `config_lib.make_config` builds its sections from
them.

Run identity: every field of a section that defines training (`IDENTITY_SECTIONS`) enters a run's
id unless it is marked `bookkeeping(...)` (logging cadence, checkpoint layout, where data sits),
so a new training field can never drop out of the hash unnoticed.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, ClassVar

from archscale.core.schema import Section, bookkeeping, check, is_int, is_number, items

# ---------------------------------------------------------------------------------- training

SCHEDULES = ("cosine", "wsd", "constant")


@dataclasses.dataclass(frozen=True)
class TrainConfig(Section):
  """`train.*`: optimiser, schedule, evaluation and checkpoints of one run."""

  SECTION: ClassVar[str] = "train"

  steps: int = bookkeeping(200)  # the run's length enters its id as tokens
  global_batch_size: int = 16
  grad_accum: int = 1
  lr: float = 3e-3
  min_lr_ratio: float = 0.1
  warmup_steps: int = 20
  schedule: str = "cosine"        # cosine | wsd | constant
  decay_fraction: float = 0.2     # wsd: share of steps spent decaying
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  grad_clip: float = 1.0          # 0 = off
  z_loss: float = 0.0             # 0 = off
  loss_chunk: int = bookkeeping(0)  # >0: LM head fused into the loss, this many positions a chunk
  log_every: int = bookkeeping(10)
  eval_every: int = bookkeeping(100)
  eval_batches: int = bookkeeping(4)
  checkpoint_every: int = bookkeeping(100)
  keep_checkpoints: int = bookkeeping(2)
  async_checkpoint: bool = bookkeeping(True)  # write checkpoints in the background
  tensorboard: bool = bookkeeping(False)
  # A local HF LLaMA directory to start from (weights and model section; fresh optimiser state).
  # Part of a run's identity through `train.recipe.run_recipe`, which records it only when set, so
  # runs from scratch keep their ids.
  init_from: str = bookkeeping("")
  # A directory for JAX's persistent compilation cache ("" = off): reruns, resumed runs and other
  # runs of the same shape (a sweep's seeds) load their compiled steps instead of compiling.
  compilation_cache: str = bookkeeping("")
  # "a:b": a jax.profiler trace of steps a..b-1 (numbered as logged) in WORKDIR/profile/; a >= 2,
  # so the first step (which compiles) stays out. "" = off.
  profile_steps: str = bookkeeping("")

  def __post_init__(self):
    self._positive_ints("steps", "global_batch_size", "grad_accum", "log_every",
                        "keep_checkpoints")
    self._non_negative_ints("warmup_steps", "eval_every", "checkpoint_every", "eval_batches")
    self._positive_numbers("lr", "eps")
    self._in_range("min_lr_ratio", 0, 1)
    self._one_of("schedule", SCHEDULES)
    self._in_range("decay_fraction", 0, 1, low_open=True)
    self._non_negative_numbers("weight_decay", "grad_clip", "z_loss")
    self._in_range("b1", 0, 1, high_open=True)
    self._in_range("b2", 0, 1, high_open=True)
    self._non_negative_ints(
        "loss_chunk", meaning="positions per chunk of the fused head + loss; 0 = full logits")
    parse_step_range(self.profile_steps, "train.profile_steps")
    check(self.global_batch_size % self.grad_accum == 0,
          f"train.global_batch_size={self.global_batch_size} must be divisible by "
          f"train.grad_accum={self.grad_accum}")
    if self.tensorboard:
      try:
        import tensorboard  # noqa: F401
      except ImportError as e:
        raise ValueError("train.tensorboard=True needs the tensorboard package; install it or "
                         "set train.tensorboard=False") from e


def parse_step_range(value: str, field: str) -> tuple[int, int] | None:
  """(a, b) of "a:b" with 2 <= a < b (the first step compiles), or None for ""."""
  if not str(value).strip():
    return None
  try:
    a, b = (int(p) for p in str(value).split(":"))
  except ValueError:
    a, b = 0, 0
  check(2 <= a < b, f"{field}={value!r} must be 'a:b' with 2 <= a < b, e.g. '10:13' for steps "
        "10, 11 and 12 (the first step compiles and is never traced)")
  return a, b


# ---------------------------------------------------------------------------------- tracking

WANDB_MODES = ("online", "offline", "disabled")


@dataclasses.dataclass(frozen=True)
class MetricsConfig(Section):
  """`metrics.*`: experiment tracking in Weights & Biases (the `wandb` extra); off without a
  project. A sweep's runs, fit and search share one group (default: the sweep's name)."""

  SECTION: ClassVar[str] = "metrics"

  wandb_project: str = ""
  wandb_entity: str = ""
  wandb_group: str = ""
  wandb_mode: str = "online"   # online | offline (files only, `wandb sync` later) | disabled

  def __post_init__(self):
    self._one_of("wandb_mode", WANDB_MODES)
    if self.wandb_project:
      try:
        import wandb  # noqa: F401
      except ImportError as e:
        raise ValueError("metrics.wandb_project is set but wandb is not installed: pip install "
                         "-e '.[wandb]', or leave metrics.wandb_project empty") from e


# -------------------------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True)
class DataConfig(Section):
  """`data.*`: the corpus, its tokenizer and held-out split, and the training windows."""

  SECTION: ClassVar[str] = "data"

  source: str = ""            # raw text: files, folders, .jsonl[.gz]; "kjv" = bundled corpus
  text_field: str = "text"    # JSONL field holding the document text
  text_docs: str = "file"     # documents of plain text files: file | paragraph | line
  path: str = bookkeeping("")  # prepared token shards (output of --mode=prepare_data)
  tokenizer: str = "byte"     # byte | bpe (trained on the corpus) | path to a tokenizer.json
  eos_token: str = ""         # tokenizer.json: token ending a document ("" = usual names)
  bpe_vocab_size: int = 1024
  eval_fraction: float = 0.01  # held-out share of documents
  seq_len: int = 128
  workers: int = bookkeeping(1)        # prepare_data: tokenizing processes on this machine
  partition: str = bookkeeping("0/1")  # prepare_data: "i/n" = job i of n filling one data.path
  wait_s: float = bookkeeping(3600.0)  # prepare_data: partitions' wait for partition 0's BPE

  def __post_init__(self):
    self._positive_ints("seq_len", "workers")
    self._positive_numbers("wait_s")
    parse_partition(self.partition)

  @property
  def prepare_fields(self) -> dict[str, Any]:
    """The fields preparation reads: they decide the tokens and the held-out split."""
    return {k: v for k, v in self.identity().items() if k != "seq_len"}


def parse_partition(partition: str) -> tuple[int, int]:
  """(i, n) from `data.partition="i/n"`: job i of n prepares units i, i + n, i + 2n, ..."""
  try:
    i, n = (int(p) for p in str(partition).split("/"))
  except ValueError:
    i, n = -1, 0
  check(n >= 1 and 0 <= i < n,
        f"data.partition={partition!r} must be 'i/n' with 0 <= i < n, e.g. '0/1' for one job or "
        "'3/8' for the fourth of eight jobs")
  return i, n


# ------------------------------------------------------------------------------------- sweep

LAUNCHES = ("local", "emit", "slurm")
_SBATCH_KEY = re.compile(r"[a-z][a-z0-9-]*")
_SBATCH_VALUE = re.compile(r"[\w.,:=@%/+*&|!-]*")
ISOLATIONS = ("process", "none")
LOSS_SOURCES = ("eval", "train")
DESIGNS = ("grid", "cross")


@dataclasses.dataclass(frozen=True)
class SlurmConfig(Section):
  """`sweep.slurm.*`: the resources of each run's SLURM job (`sweep.launch="slurm"`).

  One task runs one JAX process: `tasks_per_node` 1 drives all of a node's GPUs from one process,
  `gpus_per_node` drives one GPU per process; a run with nodes x tasks_per_node > 1 is one
  multi-process `jax.distributed` job. `extra` holds further sbatch options ({"mem": "64G"}, or
  "mem=64G,constraint=h100" on the command line). Empty strings and 0 leave SLURM's default.
  """

  SECTION: ClassVar[str] = "sweep.slurm"

  partition: str = ""
  account: str = ""
  qos: str = ""
  time_min: int = 60           # the job's time limit in minutes
  nodes: int = 1
  gpus_per_node: int = 0
  tasks_per_node: int = 1
  cpus_per_task: int = 1
  signal_s: int = 120          # SIGUSR2 this long before the time limit: checkpoint and requeue
  extra: Any = ()              # further sbatch options: a dict or "key=value,key=value"

  @classmethod
  def from_config(cls, config: Any) -> Any:
    section = config["sweep"]["slurm"]
    values = section.to_dict() if hasattr(section, "to_dict") else dict(section)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(known))
    check(not unknown, f"sweep.slurm: unknown field(s) {unknown}; the fields are {known}")
    return cls(**values)

  def __post_init__(self):
    self._positive_ints("time_min", "nodes", "tasks_per_node", "cpus_per_task")
    for name in ("gpus_per_node", "signal_s"):
      value = getattr(self, name)
      check(is_int(value) and value >= 0,
            f"{self._field(name)} must be a non-negative integer, got {value!r}")
    check(self.signal_s < 60 * self.time_min,
          f"sweep.slurm.signal_s={self.signal_s} must be shorter than sweep.slurm.time_min="
          f"{self.time_min} minutes")
    for name in ("partition", "account", "qos"):
      value = getattr(self, name)
      check(isinstance(value, str) and _SBATCH_VALUE.fullmatch(value) is not None,
            f"{self._field(name)}={value!r} may hold only letters, digits and "
            "'_.,:=@%/+*&|!-' (it becomes an #SBATCH line)")
    object.__setattr__(self, "extra", self.sbatch_extra())

  def sbatch_extra(self) -> dict[str, Any]:
    """`extra` as a dict of sbatch options (without leading dashes), each key and value checked:
    they become `#SBATCH --key=value` lines."""
    extra = self.extra
    if isinstance(extra, str):
      pairs = [p.split("=", 1) for p in extra.split(",") if p.strip()]
      check(all(len(i) == 2 and i[0].strip() for i in pairs),
            f"sweep.slurm.extra={extra!r} must be 'key=value,key=value' or a dict")
      extra = {k.strip(): v.strip() for k, v in pairs}
    elif hasattr(extra, "to_dict"):
      extra = extra.to_dict()
    elif isinstance(extra, (list, tuple)):
      check(not extra, f"sweep.slurm.extra={extra!r} must be a dict of sbatch options")
      extra = {}
    check(isinstance(extra, dict), f"sweep.slurm.extra={extra!r} must be a dict of sbatch options")
    for key, value in extra.items():
      check(isinstance(key, str) and _SBATCH_KEY.fullmatch(key) is not None,
            f"sweep.slurm.extra: {key!r} is not an sbatch option name (lower-case letters, digits "
            "and '-', without the leading dashes, e.g. mem or gres)")
      check(isinstance(value, (bool, int)) or (
          isinstance(value, str) and _SBATCH_VALUE.fullmatch(value) is not None),
            f"sweep.slurm.extra.{key}={value!r} must be a number, a bool or text of letters, "
            "digits and '_.,:=@%/+*&|!-' (it becomes an #SBATCH line)")
    return dict(extra)


@dataclasses.dataclass(frozen=True)
class SweepConfig(Section):
  """`sweep.*`: the grid of architectures per scale and how its runs are launched.

  scales: "N:n_layers:d_head" comma-separated (N as 80e6, 80M, 1.2B, 50k); "" = the model's N,
  depth and head size. Each (scale, d_over_sqrt_n, r, gqa) point is built by
  `ArchSpec.from_budget`; points off the budget by more than the tolerances are dropped.
  """

  SECTION: ClassVar[str] = "sweep"
  # Bookkeeping fields here change how runs are launched, not what the sweep measures.

  scales: Any = ""
  tokens: Any = 0.0            # tokens per run (e.g. 2e9); 0 = tokens_per_param x N
  tokens_per_param: float = 100.0  # the paper trains every run on 100 x N tokens
  d_over_sqrt_n: Any = (0.04, 0.06, 0.08, 0.1, 0.12)
  r: Any = (0.5, 1.0, 2.0, 3.0, 5.0)
  gqa: Any = (4,)
  design: str = "grid"         # grid: every combination | cross: one factor at a time through
                               # the middle value of the other grids
  seeds: Any = ()              # train every point once per seed, so the fit can measure seed
                               # noise; () = the config's `seed` alone
  d_model_multiple: int = 64
  d_ff_multiple: int = 256
  n_tolerance: float = 0.05    # largest relative error of the realised N
  r_tolerance: float = 0.25    # largest relative error of the realised r
  launch: str = bookkeeping("local")  # local: train here, one after another | emit: commands
  isolation: str = bookkeeping("process")  # process: each run in its own Python process | none
  loss: str = "eval"           # a row's `loss`: eval (held-out) | train (final train loss)
  only: str = bookkeeping("")  # comma-separated run ids: run just these (emitted commands do)
  retry_failed: bool = bookkeeping(True)  # rerun runs whose last attempt failed
  evaluate: bool = bookkeeping(False)  # evaluate each trained run on eval.tasks (eval.json)
  max_attempts: int = bookkeeping(3)  # slurm: submissions per run before it counts as failed
  wait: bool = bookkeeping(False)  # slurm: wait for the jobs (resubmitting failures) or return
  poll_s: float = bookkeeping(10.0)  # slurm: seconds between scheduler polls while waiting
  wait_s: float = bookkeeping(86400.0)  # slurm: stop waiting after this long with no run changing
  stall_s: float = bookkeeping(3600.0)  # process isolation: stop a run silent this long (0 = never)
  slurm: Any = bookkeeping(SlurmConfig())  # slurm: the jobs' resources (a dict in the config)

  def __post_init__(self):
    self._one_of("launch", LAUNCHES)
    self._one_of("isolation", ISOLATIONS)
    self._positive_ints("max_attempts")
    self._positive_numbers("poll_s", "wait_s")
    self._non_negative_numbers("stall_s")
    slurm = self.slurm
    if not isinstance(slurm, SlurmConfig):
      slurm = SlurmConfig.from_config({"sweep": {"slurm": slurm}})
      object.__setattr__(self, "slurm", slurm)
    self._one_of("design", DESIGNS)
    self._one_of("loss", LOSS_SOURCES)
    self._positive_numbers("n_tolerance", "r_tolerance")
    self._positive_ints("d_model_multiple", "d_ff_multiple")


# --------------------------------------------------------------------------------------- fit

FIT_FORMS = ("multiplicative", "additive", "joint", "chinchilla")
FIT_TERMS = ("both", "width", "ratio")
FIT_L_OPTS = ("chinchilla", "empirical")
FIT_LOSSES = ("auto", "huber", "squared")
FIT_SPACES = ("auto", "log", "linear")
FIT_SOLVERS = ("lm", "lbfgs")
FIT_STARTS = ("grid", "random")


@dataclasses.dataclass(frozen=True)
class FitConfig(Section):
  """`fit.*`: the scaling-law fitter (archscale.study.fitting)."""

  SECTION: ClassVar[str] = "fit"

  results: str = ""            # results table, JSONL or CSV
  form: str = "multiplicative"  # multiplicative | additive | joint | chinchilla
  terms: str = "both"          # both | width | ratio: which architecture terms to fit
  l_opt: str = "empirical"     # empirical (best loss per (N, D)) | chinchilla | a fit.json path
  r_range: Any = (0.5, 5.0)    # keep rows with lo <= mlp_attn_ratio <= hi; () keeps all
  loss: str = "auto"           # auto (squared; huber for chinchilla) | huber | squared
  delta: float = 1e-3          # Huber threshold, in the units of the residuals
  space: str = "auto"          # auto (linear; log for chinchilla) | log | linear loss residuals
  solver: str = "lm"           # lm (Levenberg-Marquardt) | lbfgs (optax)
  starts: str = "grid"         # grid (Hoffmann's for Chinchilla, around an anchor else) | random
  n_starts: int = 256          # random starts (the joint form always draws them)
  max_iter: int = 200          # per start (a best start that stops there is iterated further)
  tol: float = 1e-12           # a start converges when its step or objective drop is this small
  bootstrap: int = 200         # row resamples for percentile intervals; 0 = none
  level: float = 0.95          # interval coverage

  def __post_init__(self):
    for name, choices in (("form", FIT_FORMS), ("terms", FIT_TERMS), ("loss", FIT_LOSSES),
                          ("space", FIT_SPACES), ("solver", FIT_SOLVERS),
                          ("starts", FIT_STARTS)):
      value = getattr(self, name)
      check(value in choices, f"fit.{name} must be one of {list(choices)}; {name}={value!r} is "
            "not allowed")
    check(self.form != "chinchilla" or self.terms == "both",
          f"fit.terms={self.terms!r} selects architecture terms, which the chinchilla form does "
          "not have; leave fit.terms='both'")
    check(isinstance(self.l_opt, str) and bool(self.l_opt.strip()),
          f"fit.l_opt must be one of {list(FIT_L_OPTS)} or the path of a fit.json with "
          f"Chinchilla params, got {self.l_opt!r}")
    for name, ok in (("delta", is_number(self.delta) and self.delta > 0),
                     ("tol", is_number(self.tol) and self.tol > 0),
                     ("n_starts", is_int(self.n_starts) and self.n_starts >= 1),
                     ("max_iter", is_int(self.max_iter) and self.max_iter >= 1),
                     ("bootstrap", is_int(self.bootstrap) and self.bootstrap >= 0),
                     ("level", is_number(self.level) and 0 < self.level < 1)):
      check(ok, f"fit.{name}={getattr(self, name)!r} is out of range (delta, tol > 0; "
            "n_starts, max_iter >= 1; bootstrap >= 0; 0 < level < 1)")
    _ = self.r_bounds  # checks r_range

  def objective(self) -> FitConfig:
    """These settings with `auto` resolved: the paper's least squares on the loss for the
    conditional forms, Hoffmann's Huber on log loss for Chinchilla."""
    chinchilla = self.form == "chinchilla"
    return dataclasses.replace(
        self, loss=self.loss if self.loss != "auto" else ("huber" if chinchilla else "squared"),
        space=self.space if self.space != "auto" else ("log" if chinchilla else "linear"))

  @property
  def r_bounds(self) -> tuple[float, float] | None:
    """r_range as (lo, hi), or None when empty (keep every row)."""
    if self.r_range is None or len(self.r_range) == 0:
      return None
    lo, hi = _pair(self.r_range, "fit.r_range")
    check(0 < lo < hi, f"fit.r_range=({lo}, {hi}) needs 0 < lo < hi; the paper keeps "
          "0.5 <= r <= 5")
    return lo, hi


# ------------------------------------------------------------------------------------ search


@dataclasses.dataclass(frozen=True)
class SearchConfig(Section):
  """`search.*`: Algorithm 1 (budget, loss target, throughput source, candidate space)."""

  SECTION: ClassVar[str] = "search"

  law: str = ""                # fit.json (hand-written coefficients accepted); "" = fit one
  results: str = ""            # results table to fit when `law` is empty ("" = fit.results)
  n_nonembed: float = 0.0      # 0: the baseline's N (target "baseline:..."), else the model's
  tokens: float = 0.0          # 0: 100 x N
  n_layers: int = 0            # 0: the baseline's (else the model's) depth
  d_head: int = 0              # 0: the baseline's (else the model's) head size
  target: Any = "baseline:llama3_2_1b"  # a loss, or "baseline:<arch or config>" (its prediction)
  throughput: str = "model:a100-40gb"   # model:<accelerator> (costmodel.ACCELERATORS) | measure
  calibration: str = ""        # costmodel calibration JSON ("" = WORKDIR/calibration.json if any)
  batch_size: int = 16
  input_len: int = 4096
  output_len: int = 1024
  dtype_bytes: int = 2         # bytes per weight / KV element in the cost model
  d_model_multiple: int = 128  # d_model candidates are multiples of this (MXU / tensor-core tile)
  d_ff_multiple: int = 256     # d_ff is rounded to a multiple of this
  width_range: Any = (0.5, 2.0)  # d_model/sqrt(N) from 0.5 x the lower to 2 x the upper of the
                                 # law's optimum and the baseline
  r_range: Any = (0.5, 5.0)    # r outside the law's fitted range is not extrapolated to
  support_margin: float = 0.1  # candidates stay within the fit rows' x and r ranges, each
                               # widened by this fraction of its width in log space
  extrapolate: bool = False    # true: keep candidates outside that support, marked extrapolated
  n_tolerance: float = 0.05    # a candidate's N may differ from the budget by this fraction
  gqa: int = 0                 # GQA of the enumeration (0: the baseline's, else the model's)
  patience: int = 2            # GQA walk: stop after this many steps without a throughput gain
  gqa_max: int = 16            # GQA walk ceiling (0 = none): the law has no GQA term, so far
                               # beyond trained practice (4-9) it would be extrapolating
  top_k: int = 0               # GQA walks around the k fastest candidates only (0 = all)
  max_measure: int = 64        # throughput=measure: refuse to time more candidates than this

  def __post_init__(self):
    self._non_negative_numbers("n_nonembed", "tokens")
    self._non_negative_ints("n_layers", "d_head", "gqa", "top_k", "gqa_max",
                            meaning="0 = default")
    self._positive_ints("batch_size", "input_len", "output_len", "dtype_bytes",
                        "d_model_multiple", "d_ff_multiple", "patience", "max_measure")
    self._positive_numbers("n_tolerance")
    self._non_negative_numbers("support_margin")
    check(isinstance(self.extrapolate, bool), f"search.extrapolate must be true or false, got "
          f"{self.extrapolate!r}")
    check(self.d_head % 2 == 0, f"search.d_head must be even (rotary embeddings), got "
          f"{self.d_head}")
    r_lo, r_hi = _pair(self.r_range, "search.r_range")
    check(0 < r_lo < r_hi, f"search.r_range must be (low, high) with 0 < low < high, got "
          f"{self.r_range}")
    w_lo, w_hi = _pair(self.width_range, "search.width_range")
    check(0 < w_lo <= 1 <= w_hi, f"search.width_range must be (low <= 1, high >= 1), got "
          f"{self.width_range}")


def _pair(value: Any, field: str) -> tuple[float, float]:
  try:
    low, high = (float(v) for v in value)
  except (TypeError, ValueError):
    raise ValueError(f"{field} must be two numbers (low, high), got {value!r}") from None
  return low, high


# ----------------------------------------------------------------------------------- compute

ATTENTION_IMPLS = ("xla", "dpa", "cudnn", "pallas", "splash")
REMATS = ("none", "full", "dots", "dots_no_batch")  # archscale.model.transformer.REMAT_POLICIES
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ModelOptions(Section):
  """How the model runs (not what it is): numerics, layer stacking, remat and attention kernel.

  attention: "auto" is "splash" on TPU and "xla" elsewhere; "xla" is the reference einsum path;
  "dpa" calls `jax.nn.dot_product_attention` and lets JAX choose the kernel; "cudnn" forces
  cuDNN flash attention (GPU only); "pallas" runs decode steps with the Pallas decode kernel
  (GPU; `archscale.model.kernels`) and everything else with "xla"; "splash" runs causal training and
  prefill attention with TPU splash attention where the length is a multiple of 128 (else
  "xla"), and decode steps with "xla".
  attention_chunk: "xla" attention over blocks of this many queries, each block rematerialised
  in the backward pass, so its scores take B N C S instead of B N T S floats (0: one block).
  Exact; it is what keeps long prefills and training sequences in memory where no fused kernel
  exists (CPU, TPU).
  """

  SECTION: ClassVar[str] = "compute"

  dtype: str = "float32"          # activations / matmul inputs: float32 | bfloat16
  param_dtype: str = "float32"    # stored parameters and optimiser state
  scan_layers: bool = bookkeeping(True)  # nn.scan over layers: compile time flat in depth
  remat: str = bookkeeping("none")       # none | full | dots | dots_no_batch
  attention: str = bookkeeping("auto")   # auto | xla | dpa | cudnn | pallas | splash
  attention_chunk: int = bookkeeping(0)  # xla: queries per attention block; 0 = all

  def __post_init__(self):
    for name in ("dtype", "param_dtype"):
      value = getattr(self, name)
      if value not in DTYPES:
        raise ValueError(f"compute.{name} must be one of {sorted(DTYPES)}, got {value!r}")
    if self.remat not in REMATS:
      raise ValueError(f"compute.remat must be one of {sorted(REMATS)}, got {self.remat!r}")
    if self.attention not in ("auto",) + ATTENTION_IMPLS:
      raise ValueError(f"compute.attention must be one of {('auto',) + ATTENTION_IMPLS}, got "
                       f"{self.attention!r}")
    if not (isinstance(self.attention_chunk, int) and not isinstance(self.attention_chunk, bool)
            and self.attention_chunk >= 0):
      raise ValueError("compute.attention_chunk must be a non-negative integer (queries per "
                       f"block of XLA attention; 0 = one block), got {self.attention_chunk!r}")

  @property
  def attention_impl(self) -> str:
    """The attention kernel in use: "auto" resolved for the default backend."""
    if self.attention != "auto":
      return self.attention
    import jax

    return "splash" if jax.default_backend() == "tpu" else "xla"

  @property
  def jnp_dtype(self):
    import jax.numpy as jnp

    return jnp.dtype(self.dtype)

  @property
  def jnp_param_dtype(self):
    import jax.numpy as jnp

    return jnp.dtype(self.param_dtype)



# ------------------------------------------------------------------------------------- bench


@dataclasses.dataclass(frozen=True)
class BenchConfig(Section):
  """`bench.*`: the decode-latency harness."""

  SECTION: ClassVar[str] = "bench"

  archs: str = ""              # comma-separated architecture names ("" = the config's name)
  batch_sizes: Any = (1, 16, 64)  # a sequence or "1,16,64"; kept sorted and unique
  input_len: int = 4096
  output_len: int = 1024
  repeats: int = 5
  dtype: str = "bfloat16"
  attention: str = "auto"      # prefill kernel: auto (cudnn on GPU in 16-bit, splash on TPU) |
                               # xla | dpa | cudnn | splash
  decode_attention: str = "auto"  # decode-step kernel: auto (xla) | xla | dpa | cudnn | pallas
  accelerator: str = "auto"    # costmodel.ACCELERATORS key; auto = from the device kind; "" = none
  profile: bool = False        # a jax.profiler trace of each point's first timed decode bursts
                               # (compiled and warmed up before) in WORKDIR/profile/<arch>-b<batch>

  def __post_init__(self):
    object.__setattr__(self, "batch_sizes", _batch_sizes(self.batch_sizes))
    self._positive_ints("input_len", "output_len", "repeats")
    check(self.output_len >= 2, f"bench.output_len must be >= 2 (per-step timing needs a decode "
                                f"step), got {self.output_len}")
    self._one_of("dtype", sorted(DTYPES))
    self._one_of("attention", ("auto",) + ATTENTION_IMPLS)
    self._one_of("decode_attention", ("auto",) + ATTENTION_IMPLS)

  @property
  def arch_names(self) -> list[str]:
    return [str(n) for n in items(self.archs)]


def _batch_sizes(value: Any) -> tuple[int, ...]:
  """bench.batch_sizes as a sorted tuple of positive ints (from a sequence or "1,16,64")."""
  try:
    sizes = [int(v) for v in items(value)]
  except (TypeError, ValueError):
    raise ValueError(f"bench.batch_sizes must be positive integers, got {value!r}") from None
  check(bool(sizes) and all(b > 0 for b in sizes),
        f"bench.batch_sizes must be a non-empty list of positive integers, got {value!r}")
  return tuple(sorted(set(sizes)))


# ------------------------------------------------------------------ models leaving archscale

EXPORT_DTYPES = ("float32", "bfloat16", "float16")
# The paper's zero-shot suite (lm-evaluation-harness task names).
PAPER_TASKS = ("arc_easy", "arc_challenge", "lambada_openai", "hellaswag", "openbookqa", "piqa",
               "sciq", "winogrande", "coqa")


@dataclasses.dataclass(frozen=True)
class ExportConfig(Section):
  """`export.*`: the Hugging Face directory `--mode=export` writes (archscale.interop.hf)."""

  SECTION: ClassVar[str] = "export"

  step: int = 0                # checkpoint step to export (0 = latest)
  dtype: str = "float32"       # float32 | bfloat16 | float16
  max_shard_mb: float = 5000.0  # larger weights are split into shards with an index

  def __post_init__(self):
    self._non_negative_ints("step", meaning="0 = latest")
    self._one_of("dtype", EXPORT_DTYPES)
    self._positive_numbers("max_shard_mb")


@dataclasses.dataclass(frozen=True)
class EvalConfig(Section):
  """`eval.*`: zero-shot downstream tasks through lm-evaluation-harness (interop.evaluate)."""

  SECTION: ClassVar[str] = "eval"

  model: str = ""              # HF directory ("" = WORKDIR/hf, exported first when missing)
  tasks: str = ",".join(PAPER_TASKS)  # comma-separated lm-evaluation-harness task names
  include_path: str = ""       # folder of extra task YAMLs (e.g. tasks over local data files)
  num_fewshot: int = 0
  limit: int = 0               # documents per task (0 = all)
  batch_size: int = 8
  device: str = "auto"         # auto (cuda when available) | cpu | cuda
  dtype: str = "auto"          # auto (config.json's) | float32 | bfloat16 | float16
  bootstrap_iters: int = 1000  # resamples for the metrics' standard errors (0 = none)

  def __post_init__(self):
    check(bool(self.task_names),
          f"eval.tasks is empty: name lm-evaluation-harness tasks, e.g. {','.join(PAPER_TASKS)}")
    self._non_negative_ints("num_fewshot", "limit", "bootstrap_iters")
    self._positive_ints("batch_size")
    self._one_of("dtype", ("auto", *EXPORT_DTYPES))

  @property
  def task_names(self) -> list[str]:
    return [str(t) for t in items(self.tasks)]


def training_recipe(config: Any) -> dict[str, Any]:
  """What a trained run's result depends on besides its spec, length and seed.

  Every field of the data, train and compute sections not marked `bookkeeping`: a new training
  field enters run ids and the resume check without any edit here.
  """
  return {"data": DataConfig.from_config(config).identity(),
          "train": TrainConfig.from_config(config).identity(),
          "compute": ModelOptions.from_config(config).identity()}


SECTIONS: tuple[type[Section], ...] = (TrainConfig, DataConfig, SweepConfig, FitConfig,
                                       SearchConfig, BenchConfig, ExportConfig, EvalConfig)


@dataclasses.dataclass(frozen=True)
class PipelineConfig(Section):
  """`pipeline.*`: how `--mode=pipeline` treats what its steps leave undone (study.pipeline)."""

  SECTION: ClassVar[str] = "pipeline"

  allow_failed_runs: bool = False  # fit on the finished runs when some of the sweep's failed
  verify: bool = False             # train the search's picks and baseline (--mode=verify)

  def __post_init__(self):
    for name in ("allow_failed_runs", "verify"):
      check(isinstance(getattr(self, name), bool), f"pipeline.{name} must be true or false, got "
            f"{getattr(self, name)!r}")
