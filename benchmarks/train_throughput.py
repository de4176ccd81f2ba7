"""Training throughput: archscale's sharded train step, and HF transformers as a peer.

Times the exact step `--mode=train` runs (AdamW, clipping, the config's mesh and numerics) on a
fixed batch of random tokens, so it needs only jax, flax, optax, orbax and ml_collections (no
dataset). Prints one JSON object: tokens/s, MFU, compile time, peak device memory. Where torch
and transformers import and CUDA is present, the same step in HF `LlamaForCausalLM` (same
architecture and batch, random weights, float32 master weights with bfloat16 autocast, fused
AdamW, `torch.compile`) runs first in a child process on one GPU, and the JSON adds its figures
and the ratio of per-device tokens/s. Both MFUs use `ArchSpec.train_flops_per_token` against
`train.peak_flops`.

  python benchmarks/train_throughput.py --config=configs/llama3_2_1b.py \\
      --config.compute.dtype=bfloat16 --config.compute.attention=cudnn \\
      --config.compute.remat=dots_no_batch --config.data.seq_len=2048 \\
      --config.train.global_batch_size=8

(Without remat the 1B step at batch 8 peaks at ~73 GB on an H100 and runs slower; `dots_no_batch`
keeps the matmul outputs and recomputes norms, RoPE, SiLU and attention, peaking at ~40 GB.)

On CPU (smoke test): --config=configs/demo.py --config.train.global_batch_size=4 --steps=2
"""

from __future__ import annotations

import copy
import json
import os
import pathlib
import subprocess
import sys
import time
from typing import Any

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))  # archscale, hf_peer

# JAX reserves 75% of GPU memory by default; a 1B model's state and activations need more.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per repeat.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats; the median step time is reported.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
_PEER = flags.DEFINE_enum("peer", "auto", ["auto", "off", "only"],
                          "HF transformers peer: auto (when importable, on CUDA), off, or only "
                          "(run just the peer and print its JSON; used for the child process).")
_OUT = flags.DEFINE_string("out", "", "Also write the JSON here.")
_VARIANTS = flags.DEFINE_string(
    "variants", "",
    "Further settings to time in the same process against the base config, ';'-separated, each "
    "a ','-separated list of section.field=value, e.g. "
    "'train.loss_chunk=512;compute.remat=none,train.loss_chunk=512'.")
_COMPILE_ONLY = flags.DEFINE_bool(
    "compile_only", False, "Compile and report compiled memory without running steps (e.g. to "
    "size a large model's step on a CPU host).")


def _median(xs: list[float]) -> float:
  xs = sorted(xs)
  mid = len(xs) // 2
  return xs[mid] if len(xs) % 2 else 0.5 * (xs[mid - 1] + xs[mid])


def _shape(config: Any) -> dict[str, Any]:
  return {"global_batch_size": config.train.global_batch_size, "seq_len": config.data.seq_len}


def parse_variants(text: str, config: Any) -> list[tuple[str, Any]]:
  """(label, config copy) per ';'-separated variant; values take the type of the base field."""
  variants = []
  for label in filter(None, (v.strip() for v in text.split(";"))):
    variant = copy.deepcopy(config)
    for item in filter(None, (i.strip() for i in label.split(","))):
      key, sep, value = item.partition("=")
      section, _, field = key.strip().partition(".")
      if not sep or section not in variant or field not in variant[section]:
        raise app.UsageError(f"--variants: {item!r} is not section.field=value of a config field")
      old = variant[section][field]
      value = value.strip()
      if isinstance(old, bool):
        if value.lower() not in ("true", "false"):
          raise app.UsageError(f"--variants: {key} takes true or false, got {value!r}")
        variant[section][field] = value.lower() == "true"
      else:
        variant[section][field] = type(old)(value)
    variants.append((label, variant))
  return variants


def jax_step(config: Any) -> dict[str, Any]:
  """Compiles and times archscale's train step; returns its figures."""
  import jax
  import jax.numpy as jnp

  from archscale.train import trainer as train

  setup = train.build(config, with_data=False)
  b, t = config.train.global_batch_size, config.data.seq_len
  start = time.perf_counter()
  step = train.compile_step(setup, config.train)
  compile_s = time.perf_counter() - start
  analysis = step.memory_analysis()
  compiled = {"compile_s": compile_s,
              "compiled_temp_memory_gb": (analysis.temp_size_in_bytes / 1e9
                                          if analysis is not None else None)}
  if _COMPILE_ONLY.value:
    return {"framework": f"archscale (jax {jax.__version__})", **compiled}
  state = train.init_state(setup, config.seed)
  tokens = jax.jit(lambda: jax.random.randint(jax.random.key(1), (b, t + 1), 0,
                                              setup.spec.vocab_size, jnp.int32),
                   out_shardings=setup.batch_sharding)()
  for _ in range(_WARMUP.value):
    state, metrics = step(state, tokens)
  jax.block_until_ready(state)
  times = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    for _ in range(_STEPS.value):
      state, metrics = step(state, tokens)
    jax.block_until_ready((state, metrics))
    times.append((time.perf_counter() - start) / _STEPS.value)
  step_s = _median(times)
  device = jax.devices()[0]
  peak = train.peak_flops(device.device_kind)
  flops_per_token = setup.spec.train_flops_per_token(t)
  stats = [d.memory_stats() or {} for d in jax.local_devices()]
  peak_bytes = max((s.get("peak_bytes_in_use", 0) for s in stats), default=0) or None
  loss = float(metrics["loss"])
  del state, metrics
  return {
      "framework": f"archscale (jax {jax.__version__})",
      "device_kind": device.device_kind,
      "device_count": jax.device_count(),
      "mesh": dict(setup.mesh.shape),
      "step_s": step_s,
      "step_s_runs": times,
      "tokens_per_sec": b * t / step_s,
      "tokens_per_sec_per_device": b * t / step_s / jax.device_count(),
      "mfu": b * t / step_s * flops_per_token / (peak * jax.device_count()) if peak else None,
      **compiled,
      # The process-wide high-water mark: for a variant, the largest of all runs so far.
      "peak_memory_gb": peak_bytes / 1e9 if peak_bytes else None,
      "loss": loss,
  }


def hf_step(config: Any) -> dict[str, Any]:
  """Times the same training step in HF transformers + torch.compile (in this process)."""
  import hf_peer
  import torch
  import transformers

  from archscale.model.arch import ArchSpec
  from archscale.train import trainer as train

  spec = ArchSpec.from_config(config)
  b, t, tc = config.train.global_batch_size, config.data.seq_len, config.train
  hf_config = hf_peer.llama_config(spec, max(t, spec.max_seq_len), attn_implementation="sdpa")
  torch.manual_seed(0)
  with torch.device("cuda"):
    model = transformers.LlamaForCausalLM(hf_config)  # float32 master weights
  model.train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=(tc.b1, tc.b2), eps=tc.eps,
                                weight_decay=tc.weight_decay, fused=True)
  ids = torch.randint(0, spec.vocab_size, (b, t + 1), device="cuda")
  inputs, labels = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()

  @torch.compile
  def loss_of(inputs, labels):
    # The loss is compiled with the model, so the float32 cast of the logits fuses into it.
    with torch.autocast("cuda", dtype=torch.bfloat16):
      logits = model(input_ids=inputs, use_cache=False).logits
    return torch.nn.functional.cross_entropy(logits.float().view(-1, logits.shape[-1]),
                                             labels.view(-1))

  def step():
    loss = loss_of(inputs, labels)
    loss.backward()
    if tc.grad_clip > 0:
      torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip, foreach=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss

  start = time.perf_counter()
  step()
  torch.cuda.synchronize()
  compile_s = time.perf_counter() - start
  for _ in range(_WARMUP.value):
    loss = step()
  torch.cuda.synchronize()
  torch.cuda.reset_peak_memory_stats()
  times = []
  for _ in range(_REPEATS.value):
    start = time.perf_counter()
    for _ in range(_STEPS.value):
      loss = step()
    torch.cuda.synchronize()
    times.append((time.perf_counter() - start) / _STEPS.value)
  step_s = _median(times)
  name = torch.cuda.get_device_name()
  peak = train.peak_flops(name)
  flops_per_token = spec.train_flops_per_token(t)
  return {
      "framework": f"transformers {transformers.__version__} + torch {torch.__version__} "
                   "(torch.compile, bf16 autocast, fused AdamW)",
      "device_kind": name,
      "step_s": step_s,
      "step_s_runs": times,
      "tokens_per_sec": b * t / step_s,
      "mfu": b * t / step_s * flops_per_token / peak if peak else None,
      "compile_s": compile_s,
      "peak_memory_gb": torch.cuda.max_memory_allocated() / 1e9,
      "loss": float(loss.detach()),
  }


def _peer_unavailable() -> str | None:
  try:
    import torch
    import transformers  # noqa: F401
  except ImportError as e:
    return f"torch/transformers not importable ({e.name})"
  if not torch.cuda.is_available():
    return "no CUDA device for torch"
  return None


def _run_peer_child() -> dict[str, Any]:
  """The HF step in a child process, so that neither framework's allocator starves the other."""
  args = [a for a in sys.argv[1:] if not a.startswith("--peer")]
  cmd = [sys.executable, os.path.abspath(__file__), *args, "--peer=only"]
  out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
  lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
  if out.returncode or not lines:
    return {"error": f"HF peer failed (exit {out.returncode}): {out.stderr[-2000:]}"}
  return json.loads(lines[-1])


def main(argv):
  del argv
  config = _CONFIG.value
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/llama3_2_1b.py")
  from archscale.model.arch import ArchSpec

  spec = ArchSpec.from_config(config)
  if _PEER.value == "only":
    print(json.dumps(hf_step(config)))
    return

  result: dict[str, Any] = {
      "arch": config.name, "params_total": spec.params_total,
      "params_nonembed": spec.params_nonembed, **_shape(config),
      "dtype": config.compute.dtype, "param_dtype": config.compute.param_dtype,
      "attention": config.compute.attention, "remat": config.compute.remat,
      "flops_per_token": spec.train_flops_per_token(config.data.seq_len),
      "mfu_formula": "tokens/s x ArchSpec.train_flops_per_token (6 x matmul weights + causal "
                     "attention at half) / (dense bf16 peak x devices)",
  }
  variants = parse_variants(_VARIANTS.value, config)  # bad flags fail before any compile
  peer = None
  if _PEER.value == "auto" and not _COMPILE_ONLY.value:
    reason = _peer_unavailable()
    peer = {"skipped": reason} if reason else _run_peer_child()
  from archscale.model import sharding

  sharding.initialize_distributed(config.distributed)
  base = result["archscale"] = jax_step(config)
  if variants:
    result["variants"] = []
    for label, variant in variants:
      row = {"variant": label, **jax_step(variant)}
      if base.get("tokens_per_sec") and row.get("tokens_per_sec"):
        row["speedup_vs_base"] = row["tokens_per_sec"] / base["tokens_per_sec"]
      if base.get("compiled_temp_memory_gb") and row.get("compiled_temp_memory_gb"):
        row["temp_memory_vs_base"] = (row["compiled_temp_memory_gb"]
                                      / base["compiled_temp_memory_gb"])
      if peer and peer.get("tokens_per_sec") and row.get("tokens_per_sec"):
        row["speedup_vs_hf"] = row["tokens_per_sec_per_device"] / peer["tokens_per_sec"]
      result["variants"].append(row)
  if peer is not None:
    result["hf_peer"] = peer
    if peer.get("tokens_per_sec"):  # the peer runs on one GPU: compare per device
      result["speedup_vs_hf"] = (result["archscale"]["tokens_per_sec_per_device"]
                                 / peer["tokens_per_sec"])
  text = json.dumps(result, indent=2)
  print(text)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  app.run(main)
