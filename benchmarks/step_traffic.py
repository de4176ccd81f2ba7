"""Memory traffic and FLOPs of compiled steps against what they must touch: CPU proxies of the GPU
figures (decode near the bandwidth roofline, training near peak FLOPs).

XLA's cost analysis of the compiled program counts the bytes every operation reads and writes and
the FLOPs it does; no step is run, so a CPU shows what a GPU program of the same shapes would
move. float32 is the clean proxy (bfloat16 on CPU is emulated through float32 copies, which
inflates bytes; it is printed too).

  decode   one decode step (unrolled layers, as generation runs): bytes accessed over the bytes it
           must read, every weight once plus the filled part of the KV cache, for several batch
           sizes and allocated cache lengths with the same filled length. 1.0 is the floor; a
           step that reads the whole allocated cache shows it as a ratio that grows with the
           allocation.
  train    one training step per remat policy: compiled FLOPs over the model's FLOPs (6 N T plus
           attention, ArchSpec.train_flops_per_token) and bytes accessed over a floor: parameters
           read twice and written once, gradients written and read once, the two Adam moments
           read and written, and each layer's residual stream written and read once (attention
           scores are not in the floor: the `xla` path materialises them, a fused kernel would
           not).

  python benchmarks/step_traffic.py             # prints one JSON document

The numbers are ratios of one compiled program to its own floor, so they compare designs and
changes on one machine; they are not timings.
"""

from __future__ import annotations

import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from archscale.core import settings  # noqa: E402
from archscale.model import transformer as model_lib  # noqa: E402
from archscale.model.arch import ArchSpec  # noqa: E402
from archscale.serve import costmodel  # noqa: E402
from archscale.serve import generate as generate_lib  # noqa: E402
from archscale.train import step as step_lib  # noqa: E402

# The measuring shape: 8 layers, d_model 512, 8 heads over 2 KV heads of 64.
SPEC = ArchSpec(d_model=512, n_layers=8, n_heads=8, n_kv_heads=2, d_head=64, d_ff=1536,
                vocab_size=32000, tie_embeddings=True, max_seq_len=4096)
FILLED = 1100


def _cost(lowered: jax.stages.Lowered) -> dict[str, float]:
  cost = lowered.compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return {"bytes": float(cost.get("bytes accessed", 0.0)), "flops": float(cost.get("flops", 0.0))}


def decode_traffic(spec: ArchSpec, batch: int, allocated: int, dtype: str) -> dict[str, float]:
  options = generate_lib.decode_model_options(
      model_lib.ModelOptions(dtype=dtype, param_dtype=dtype, attention="xla"))
  model = model_lib.Transformer(spec, options)
  params = jax.eval_shape(lambda: model_lib.init_params(model, jax.random.key(0)))
  cache = jax.eval_shape(lambda: model_lib.init_cache(spec, batch, allocated, options.jnp_dtype))
  tokens = jax.ShapeDtypeStruct((batch,), jnp.int32)
  cost = _cost(jax.jit(lambda p, c, t: model_lib.decode_step(model, p, c, t)).lower(
      params, cache, tokens))
  size = jnp.dtype(options.jnp_dtype).itemsize
  floor = (costmodel.weight_bytes_per_step(spec, size)
           + costmodel.kv_cache_bytes(spec, batch, FILLED, size))
  return {"batch": batch, "allocated": allocated, "filled": FILLED, "dtype": dtype,
          "bytes": cost["bytes"], "floor_bytes": floor, "bytes_over_floor": cost["bytes"] / floor}


def train_traffic(spec: ArchSpec, remat: str, batch: int, seq_len: int) -> dict[str, float]:
  # Unrolled layers: the cost analysis counts a loop's body once, whatever its trip count.
  options = model_lib.ModelOptions(dtype="float32", param_dtype="float32", remat=remat,
                                   attention="xla", scan_layers=False)
  model = model_lib.Transformer(spec, options)
  t = settings.TrainConfig()
  tx = step_lib.make_optimizer(t)
  state = jax.eval_shape(lambda: {
      "step": jnp.zeros((), jnp.int32),
      "params": (p := model_lib.init_params(model, jax.random.key(0))), "opt_state": tx.init(p)})
  tokens = jax.ShapeDtypeStruct((batch, seq_len + 1), jnp.int32)
  cost = _cost(jax.jit(step_lib.make_train_step(model, tx, t)).lower(state, tokens))
  n_params = model_lib.count_params(state["params"])
  tokens_per_step = batch * seq_len
  model_flops = spec.train_flops_per_token(seq_len) * tokens_per_step
  floor = 4 * (9 * n_params + 2 * spec.n_layers * tokens_per_step * spec.d_model)
  return {"remat": remat, "batch": batch, "seq_len": seq_len, "flops": cost["flops"],
          "model_flops": model_flops, "flops_over_model": cost["flops"] / model_flops,
          "bytes": cost["bytes"], "floor_bytes": floor, "bytes_over_floor": cost["bytes"] / floor}


def main() -> None:
  decode = [decode_traffic(SPEC, batch, allocated, dtype)
            for dtype in ("float32", "bfloat16") for batch in (1, 16, 64)
            for allocated in (1280, 2560)]
  small = ArchSpec(d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, d_head=64, d_ff=768,
                   vocab_size=8192, tie_embeddings=True, max_seq_len=512)
  train = [train_traffic(small, remat, batch=8, seq_len=512) for remat in settings.REMATS]
  print(json.dumps({"backend": jax.default_backend(), "spec": SPEC.to_dict(), "decode": decode,
                    "train_spec": small.to_dict(), "train": train}, indent=1))


if __name__ == "__main__":
  main()
