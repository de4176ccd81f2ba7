"""The configuration tree every mode reads, and the named architectures of the paper.

Config files in `configs/` call `make_config(arch)` and override what they need; every field can be
overridden from the command line as `--config.section.field=value`. Sections:

  model    ArchSpec fields (archscale.arch.ArchSpec)
  compute  how the model runs: dtype, param_dtype, scan_layers, remat, attention
  data     corpus, tokenizer and windows          train    optimiser, schedule, checkpoints
  mesh     device mesh axis sizes (-1 = the rest) bench    decode-latency harness
  fit      scaling-law fitter                     search   Algorithm 1
  sweep    grid of architectures per scale        distributed  multi-host initialisation
"""

from __future__ import annotations

import pathlib

import ml_collections

# Table 1 of the paper (arXiv 2510.18245) plus a tiny CPU demo. Values are ArchSpec fields.
_LLAMA = dict(vocab_size=128256, tie_embeddings=True, rope_theta=500000.0, rope_scaling="llama3",
              norm_eps=1e-5, max_seq_len=131072)
ARCHS: dict[str, dict] = {
    "llama3_2_1b": dict(_LLAMA, d_model=2048, d_ff=8192, n_layers=16, n_heads=32, n_kv_heads=8,
                        d_head=64),
    "panda_1b": dict(_LLAMA, d_model=2560, d_ff=4096, n_layers=16, n_heads=72, n_kv_heads=18,
                     d_head=64),
    "surefire_1b": dict(_LLAMA, d_model=2560, d_ff=6144, n_layers=16, n_heads=36, n_kv_heads=4,
                        d_head=64),
    "llama3_2_3b": dict(_LLAMA, d_model=3072, d_ff=8192, n_layers=28, n_heads=24, n_kv_heads=8,
                        d_head=128),
    "panda_3b": dict(_LLAMA, d_model=4096, d_ff=4096, n_layers=28, n_heads=36, n_kv_heads=12,
                     d_head=128),
    "surefire_3b": dict(_LLAMA, d_model=4096, d_ff=4096, n_layers=28, n_heads=42, n_kv_heads=6,
                        d_head=128),
    "demo": dict(d_model=64, d_ff=256, n_layers=2, n_heads=4, n_kv_heads=2, d_head=16,
                 vocab_size=256, tie_embeddings=True, rope_theta=10000.0, rope_scaling="none",
                 norm_eps=1e-5, max_seq_len=512),
}

CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"


def make_config(arch: str = "demo") -> ml_collections.ConfigDict:
  """The full default configuration for one named architecture."""
  if arch not in ARCHS:
    raise ValueError(f"arch={arch!r} is not a known architecture; choose one of {sorted(ARCHS)}")
  c = ml_collections.ConfigDict()
  c.name = arch
  c.mode = "describe"
  c.seed = 0

  c.model = ml_collections.ConfigDict(dict(ARCHS[arch]))

  c.compute = ml_collections.ConfigDict(dict(
      dtype="float32",          # activations / matmul inputs: float32 | bfloat16
      param_dtype="float32",    # stored parameters and optimiser state
      scan_layers=True,         # nn.scan over layers: compile time flat in depth
      remat="none",             # none | full | dots | dots_no_batch (model.REMAT_POLICIES)
      attention="xla",          # xla | dpa | cudnn (archscale.model.ATTENTION_IMPLS)
      attention_chunk=0,        # xla: queries per attention block (bounds its memory); 0 = all
  ))

  c.data = ml_collections.ConfigDict(dict(
      source="",                # raw text: files, folders, .jsonl[.gz]; "kjv" = bundled demo corpus
      text_field="text",        # JSONL field holding the document text
      text_docs="file",         # documents of plain text files: file | paragraph | line
      path="",                  # prepared token shards (output of --mode=prepare_data)
      tokenizer="byte",         # byte | bpe (trained on the corpus) | path to a tokenizer.json
      eos_token="",             # tokenizer.json: token ending a document ("" = usual names)
      bpe_vocab_size=1024,
      eval_fraction=0.01,       # held-out share of documents
      workers=1,                # prepare_data: tokenizing processes on this machine
      partition="0/1",          # prepare_data: "i/n" = this job's share of n jobs
      seq_len=128,
  ))

  c.train = ml_collections.ConfigDict(dict(
      steps=200,
      global_batch_size=16,
      grad_accum=1,
      lr=3e-3,
      min_lr_ratio=0.1,
      warmup_steps=20,
      schedule="cosine",        # cosine | wsd | constant
      decay_fraction=0.2,       # wsd: share of steps spent decaying
      weight_decay=0.1,
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      grad_clip=1.0,
      z_loss=0.0,
      loss_chunk=0,             # >0: LM head fused into the loss, this many positions at a time
      log_every=10,
      eval_every=100,
      eval_batches=4,
      checkpoint_every=100,
      keep_checkpoints=2,
      async_checkpoint=True,    # write checkpoints in the background
      tensorboard=False,
  ))

  # Mesh axis sizes (-1 = the rest); rules: overrides of archscale.sharding.LOGICAL_RULES as
  # "logical=axis[+axis],...", e.g. "embed=,mlp=fsdp+tensor" (empty right side: replicated).
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, rules=""))

  # initialize: auto (when a launcher or coordinator_address says so) | always | never
  c.distributed = ml_collections.ConfigDict(dict(
      coordinator_address="", num_processes=0, process_id=-1, initialize="auto"))

  c.bench = ml_collections.ConfigDict(dict(
      archs=arch,               # comma-separated architecture names (archscale.config_lib.ARCHS)
      batch_sizes=(1, 16, 64),
      input_len=4096,
      output_len=1024,
      repeats=5,
      dtype="bfloat16",
      attention="auto",         # prefill kernel: auto (cudnn on GPU in 16-bit) | xla | dpa | cudnn
      decode_attention="auto",  # decode-step kernel, same choices
      accelerator="auto",       # costmodel.ACCELERATORS key; auto = from the device kind
  ))

  c.fit = ml_collections.ConfigDict(dict(
      results="",               # results table, JSONL or CSV
      form="multiplicative",    # multiplicative | additive | joint | chinchilla
      l_opt="empirical",        # empirical (best loss per (N, D)) | chinchilla | a fit.json path
      r_range=(0.5, 5.0),       # keep rows with lo <= mlp_attn_ratio <= hi; () keeps all
      loss="huber",             # huber | squared, summed over rows
      delta=1e-3,               # Huber threshold, in the units of the residuals
      space="log",              # residuals of log loss | linear loss
      solver="lm",              # lm (Levenberg-Marquardt) | lbfgs (optax)
      starts="grid",            # grid (Hoffmann's for Chinchilla, around an anchor else) | random
      n_starts=256,             # random starts (the joint form always draws them)
      max_iter=200,             # per start
      bootstrap=200,            # row resamples for percentile intervals; 0 = none
      level=0.95,               # interval coverage
  ))

  c.search = ml_collections.ConfigDict(dict(
      law="",                   # fit.json (hand-written coefficients accepted); "" = fit one
      results="",               # results table to fit when `law` is empty ("" = fit.results)
      n_nonembed=0.0,           # 0: the baseline's N (target "baseline:..."), else the model's
      tokens=0.0,               # 0: 100 x N
      n_layers=0,               # 0: the baseline's (else the model's) depth
      d_head=0,                 # 0: the baseline's (else the model's) head size
      target="baseline:llama3_2_1b",  # a loss, or "baseline:<arch or config>" (its prediction)
      throughput="model:a100-40gb",   # model:<accelerator> (costmodel.ACCELERATORS) | measure
      calibration="",           # costmodel calibration JSON ("" = WORKDIR/calibration.json if any)
      batch_size=16,
      input_len=4096,
      output_len=1024,
      dtype_bytes=2,            # bytes per weight / KV element in the cost model
      d_model_multiple=128,     # d_model candidates are multiples of this (MXU / tensor-core tile)
      d_ff_multiple=256,        # d_ff is rounded to a multiple of this
      width_range=(0.5, 2.0),   # d_model/sqrt(N) from 0.5 x the lower to 2 x the upper of the
                                # law's optimum and the baseline
      r_range=(0.5, 5.0),       # r outside the law's fitted range is not extrapolated to
      n_tolerance=0.05,         # a candidate's N may differ from the budget by this fraction
      gqa=0,                    # GQA of the enumeration (0: the baseline's, else the model's)
      patience=2,               # GQA walk: stop after this many steps without a throughput gain
      gqa_max=16,               # GQA walk ceiling (0 = none): the law has no GQA term, so far
                                # beyond trained practice (4-9) it would be extrapolating
      top_k=0,                  # GQA walks around the k fastest candidates only (0 = all)
      max_measure=64,           # throughput=measure: refuse to time more candidates than this
  ))

  # scales: "N:n_layers:d_head" comma-separated (N as 80e6, 80M, 1.2B, 50k); "" = the model's
  # N, depth and head size. Each (scale, d_over_sqrt_n, r, gqa) point is built by
  # ArchSpec.from_budget; points off the budget by more than the tolerances are dropped.
  c.sweep = ml_collections.ConfigDict(dict(
      scales="",
      tokens=0.0,               # tokens per run (e.g. 2e9); 0 = tokens_per_param x N
      tokens_per_param=100.0,   # the paper trains every run on 100 x N tokens
      d_over_sqrt_n=(0.04, 0.06, 0.08, 0.1, 0.12),
      r=(0.5, 1.0, 2.0, 3.0, 5.0),
      gqa=(4,),
      design="grid",            # grid: every combination | cross: vary one factor at a time
                                # through the middle value of the other grids
      d_model_multiple=64,
      d_ff_multiple=256,
      n_tolerance=0.05,         # largest relative error of the realised N
      r_tolerance=0.25,         # largest relative error of the realised r
      launch="local",           # local: train here, one after another | emit: launch_commands.sh
      isolation="process",      # process: each run in its own Python process | none: in-process
      loss="eval",              # a row's `loss`: eval (held-out) | train (final train loss)
      only="",                  # comma-separated run ids: run just these (emitted commands do)
      retry_failed=True,        # rerun runs whose last attempt failed
  ))
  return c


def arch_config(name: str) -> dict:
  """ArchSpec fields for `name`: a known architecture or a path to a config file."""
  if name in ARCHS:
    return dict(ARCHS[name])
  path = pathlib.Path(name)
  if not path.suffix:
    path = CONFIG_DIR / f"{name}.py"
  if not path.exists():
    raise ValueError(
        f"architecture {name!r} is neither a known name ({sorted(ARCHS)}) nor a config file")
  return load_config_file(path).model.to_dict()


def load_config_file(path: str | pathlib.Path) -> ml_collections.ConfigDict:
  """Runs a config file's `get_config()`, as `--config=path` does."""
  import importlib.util

  path = pathlib.Path(path)
  spec = importlib.util.spec_from_file_location(f"archscale_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()
