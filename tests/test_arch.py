"""ArchSpec accounting against the paper's Table 1, from_budget, and every validation rule."""

import json
import math
import subprocess
import sys

import pytest

from archscale.core import config_lib
from archscale.model.arch import ArchSpec

# name: (printed d/sqrt(N), printed r, GQA) from the paper's Table 1 (LLaMA-3.2-3B r per its own
# accounting: 3.00).
TABLE1 = {
    "llama3_2_1b": (0.066, 4.80, 4),
    "panda_1b": (0.082, 1.07, 4),
    "surefire_1b": (0.082, 3.6, 9),
    "llama3_2_3b": (0.058, 3.00, 3),
    "panda_3b": (0.077, 1.0, 3),
    "surefire_3b": (0.077, 1.0, 7),
}


def spec_of(name):
  return ArchSpec.from_dict(config_lib.ARCHS[name])


@pytest.mark.parametrize("name", sorted(TABLE1))
def test_table1_rows_reproduce_printed_ratios(name):
  x, r, gqa = TABLE1[name]
  spec = spec_of(name)
  assert round(spec.d_over_sqrt_n, 3) == x
  decimals = len(str(r).split(".")[1])
  assert round(spec.mlp_attn_ratio, decimals) == r
  assert spec.gqa == gqa


def test_llama_total_parameters_match_the_released_models():
  assert spec_of("llama3_2_1b").params_total == 1_235_814_400
  assert spec_of("llama3_2_3b").params_total == 3_212_749_824


def test_parameter_breakdown_is_consistent():
  spec = spec_of("llama3_2_1b")
  assert spec.params_attention == 16 * 2048 * 64 * (2 * 32 + 2 * 8)
  assert spec.params_mlp == 16 * 3 * 2048 * 8192
  assert spec.params_norms == 33 * 2048
  assert spec.params_nonembed == spec.params_attention + spec.params_mlp + spec.params_norms
  untied = spec.replace(tie_embeddings=False)
  assert untied.params_total - spec.params_total == 128256 * 2048
  assert untied.params_nonembed == spec.params_nonembed


def test_flop_and_byte_accounting_llama_1b():
  spec = spec_of("llama3_2_1b")
  assert spec.kv_bytes_per_token(2) == 32768
  assert spec.kv_bytes_per_token(4) == 65536
  matmul = spec.params_attention + spec.params_mlp + 128256 * 2048
  assert spec.matmul_params_per_token == matmul
  assert spec.decode_flops_per_token(0) == 2 * matmul
  assert spec.decode_flops_per_token(1000) == 2 * matmul + 4 * 16 * 1000 * 32 * 64
  # Training: 3 x forward, causal attention at half of the full square.
  assert spec.train_flops_per_token(2048) == 3 * (2 * matmul + 4 * 16 * 1024 * 32 * 64)
  head = 128256 * 2048  # a prefill runs the head on the last position only
  assert spec.prefill_flops(10) == 10 * (2 * (matmul - head) + 4 * 16 * 5 * 32 * 64) + 2 * head
  assert spec.param_bytes(2) == 2 * spec.params_total


def test_head_width_may_differ_from_d_model():
  spec = ArchSpec(d_model=96, n_layers=2, n_heads=6, n_kv_heads=3, d_head=32, d_ff=128)
  assert spec.n_heads * spec.d_head != spec.d_model
  assert spec.params_attention == 2 * 96 * 32 * (12 + 6)


def test_from_budget_lands_on_panda_1b():
  n = spec_of("llama3_2_1b").params_nonembed
  spec, report = ArchSpec.from_budget(n, 0.082, 1.07, 4, 16, 64)
  panda = spec_of("panda_1b")
  assert (spec.d_model, spec.n_heads, spec.n_kv_heads, spec.d_ff) == (
      panda.d_model, panda.n_heads, panda.n_kv_heads, panda.d_ff)
  assert report["requested"]["r"] == 1.07
  assert report["achieved"]["n_nonembed"] == spec.params_nonembed
  assert abs(report["rel_error"]["n_nonembed"]) < 0.1
  assert report["rel_error"]["gqa"] == 0


def test_from_budget_respects_gqa_multiples_and_reports_error():
  spec, report = ArchSpec.from_budget(50e6, 0.1, 2.0, 3, 8, 32, d_ff_multiple=128)
  assert spec.n_heads == 3 * spec.n_kv_heads
  assert spec.d_ff % 128 == 0 and spec.d_model % 64 == 0
  for key in ("n_nonembed", "d_over_sqrt_n", "r"):
    assert report["rel_error"][key] == pytest.approx(
        report["achieved"][key] / report["requested"][key] - 1)
  assert abs(report["rel_error"]["r"]) < 0.15
  assert abs(report["rel_error"]["n_nonembed"]) < 0.15


def test_from_budget_passes_fixed_fields_through():
  spec, _ = ArchSpec.from_budget(1e6, 0.1, 1.0, 1, 2, 16, vocab_size=256, rope_scaling="none")
  assert spec.vocab_size == 256 and spec.rope_scaling == "none"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(d_model=0), "d_model must be positive"),
        (dict(n_layers=-2), "n_layers must be positive"),
        (dict(d_ff=3.5), "d_ff must be an integer"),
        (dict(vocab_size=True), "vocab_size must be an integer"),
        (dict(n_heads=6, n_kv_heads=4), "n_heads .* divisible by .*n_kv_heads"),
        (dict(d_head=15), "d_head must be even"),
        (dict(rope_scaling="yarn"), "rope_scaling must be one of"),
        (dict(rope_theta=0.0), "rope_theta must be positive"),
        (dict(norm_eps=-1.0), "norm_eps must be positive"),
        (dict(tie_embeddings="yes"), "tie_embeddings must be a bool"),
        (dict(max_seq_len=0), "max_seq_len must be positive"),
    ],
)
def test_invalid_specs_raise_naming_the_field(kwargs, match):
  base = dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_head=16, d_ff=128)
  with pytest.raises(ValueError, match=match):
    ArchSpec(**{**base, **kwargs})


def test_from_dict_rejects_unknown_and_missing_fields():
  base = dict(config_lib.ARCHS["demo"])
  with pytest.raises(ValueError, match="unknown ArchSpec field.*d_modle"):
    ArchSpec.from_dict({**base, "d_modle": 3})
  del base["d_ff"]
  with pytest.raises(ValueError, match="missing required field.*d_ff"):
    ArchSpec.from_dict(base)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_nonembed=-1), "n_nonembed must be a positive number"),
        (dict(r=0.0), "r must be a positive number"),
        (dict(d_over_sqrt_n=float("nan")), "d_over_sqrt_n must be a positive number"),
        (dict(gqa=2.5), "gqa must be an integer"),
        (dict(n_nonembed=2e4), "infeasible request"),
        (dict(r=1e-4), "infeasible request"),
    ],
)
def test_from_budget_rejects_infeasible_requests(kwargs, match):
  args = dict(n_nonembed=50e6, d_over_sqrt_n=0.1, r=1.0, gqa=2, n_layers=8, d_head=32)
  with pytest.raises(ValueError, match=match):
    ArchSpec.from_budget(**{**args, **kwargs})


@pytest.mark.parametrize("name, total", [("llama3_2_1b", 1235814400), ("llama3_2_3b", 3212749824)])
def test_describe_cli_reports_exact_totals(name, total):
  out = subprocess.run(
      [sys.executable, "-m", "archscale.main", f"--config=configs/{name}.py", "--mode=describe"],
      capture_output=True, text=True, check=True, cwd=config_lib.CONFIG_DIR.parent)
  desc = json.loads(out.stdout)
  assert desc["params_total"] == total
  for key in ("params_nonembed", "mlp_attn_ratio", "d_over_sqrt_n", "gqa",
              "decode_flops_per_token", "train_flops_per_token", "kv_bytes_per_token_bf16"):
    assert key in desc
  assert math.isclose(desc["d_over_sqrt_n"], spec_of(name).d_over_sqrt_n)


def test_describe_cli_accepts_overrides():
  out = subprocess.run(
      [sys.executable, "-m", "archscale.main", "--config=configs/llama3_2_1b.py",
       "--mode=describe", "--config.model.n_kv_heads=32"],
      capture_output=True, text=True, check=True, cwd=config_lib.CONFIG_DIR.parent)
  desc = json.loads(out.stdout)
  assert desc["gqa"] == 1 and desc["kv_bytes_per_token_bf16"] == 4 * 32768


def test_describe_cli_rejects_invalid_override_with_the_field_name():
  out = subprocess.run(
      [sys.executable, "-m", "archscale.main", "--config=configs/llama3_2_1b.py",
       "--mode=describe", "--config.model.n_kv_heads=5"],
      capture_output=True, text=True, cwd=config_lib.CONFIG_DIR.parent)
  assert out.returncode != 0
  assert "n_kv_heads" in out.stderr and "divisible" in out.stderr
