"""Mesh construction, logical-to-mesh rules, their checks, and multi-host detection."""

import os
import subprocess
import sys
import textwrap

import jax
import ml_collections
import pytest
from jax.sharding import PartitionSpec as P

from archscale.model import sharding
from archscale.model import transformer as model_lib
from archscale.model.arch import ArchSpec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mesh_cfg(data=-1, fsdp=1, tensor=1):
  return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor, rules=""))


def test_mesh_shape_fills_the_free_axis():
  assert sharding.mesh_shape(_mesh_cfg(-1, 4, 1), 8) == {"data": 2, "fsdp": 4, "tensor": 1}
  assert sharding.mesh_shape(_mesh_cfg(2, -1, 2), 8) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert sharding.mesh_shape(_mesh_cfg(1, 1, 1), 1) == {"data": 1, "fsdp": 1, "tensor": 1}


@pytest.mark.parametrize("cfg, devices, field", [
    (dict(data=-1, fsdp=-1), 8, "mesh.data"),
    (dict(data=2, fsdp=2, tensor=1), 8, "mesh.data=2"),
    (dict(data=-1, fsdp=3), 8, "mesh.data=-1"),
    (dict(data=0), 8, "mesh.data"),
    (dict(tensor=1.5), 8, "mesh.tensor"),
    (dict(fsdp=True), 8, "mesh.fsdp"),
])
def test_mesh_shape_errors_name_the_field(cfg, devices, field):
  with pytest.raises(ValueError, match=field.replace(".", r"\.")):
    sharding.mesh_shape(_mesh_cfg(**cfg), devices)


def test_make_mesh_on_this_host():
  mesh = sharding.make_mesh(_mesh_cfg())
  assert mesh.axis_names == sharding.MESH_AXES
  assert mesh.devices.size == jax.device_count()
  with pytest.raises(ValueError, match=r"mesh\.data"):
    sharding.make_mesh(_mesh_cfg(data=jax.device_count() + 1))


def test_parse_rules_overrides_and_rejects_bad_entries():
  rules = dict(sharding.parse_rules("embed=, mlp=fsdp+tensor"))
  assert rules["embed"] == ()
  assert rules["mlp"] == ("fsdp", "tensor")
  assert rules["q_heads"] == ("tensor",)
  for bad in ("embed", "nonsense=data", "mlp=model", "mlp=data+data"):
    with pytest.raises(ValueError, match=r"mesh\.rules"):
      sharding.parse_rules(bad)


def test_logical_to_mesh_maps_and_detects_collisions():
  rules = sharding.LOGICAL_RULES
  assert sharding.logical_to_mesh(("embed", "mlp"), rules) == P("fsdp", "tensor")
  assert sharding.logical_to_mesh(("batch", "seq"), rules) == P(("data", "fsdp"), None)
  assert sharding.logical_to_mesh(("layers", "embed", None), rules) == P(None, "fsdp", None)
  colliding = sharding.parse_rules("embed=tensor")
  with pytest.raises(ValueError, match=r"mesh\.rules: w has logical axes 'embed' and 'mlp'"):
    sharding.logical_to_mesh(("embed", "mlp"), colliding, "w")
  with pytest.raises(ValueError, match="no rule"):
    sharding.logical_to_mesh(("unknown",), rules)


def test_activation_rules_give_fsdp_to_the_batch():
  act = sharding.activation_rules(sharding.LOGICAL_RULES)
  # In a [batch, seq, embed] activation fsdp splits the batch, so embed is left whole.
  assert sharding.logical_to_mesh(("batch", "seq", "embed"), act) == P(("data", "fsdp"), None,
                                                                       None)
  assert sharding.logical_to_mesh(("batch", "seq", "mlp"), act) == P(("data", "fsdp"), None,
                                                                     "tensor")


def test_check_divisible_names_array_dim_and_axis():
  sizes = {"data": 2, "fsdp": 4, "tensor": 2}
  sharding.check_divisible((8, 6), P("fsdp", "tensor"), sizes, "w")
  sharding.check_divisible((16, 3), P(("data", "fsdp"), None), sizes, "w")
  with pytest.raises(ValueError, match=r"w: dimension 1 \(size 3\).*mesh\.tensor=2"):
    sharding.check_divisible((8, 3), P("fsdp", "tensor"), sizes, "w")
  with pytest.raises(ValueError, match=r"dimension 0 \(size 12\).*mesh\.data=2 x mesh\.fsdp=4"):
    sharding.check_divisible((12,), P(("data", "fsdp")), sizes, "batch")


def test_logical_shardings_cover_every_parameter():
  spec = ArchSpec(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_head=8, d_ff=64,
                  vocab_size=256, rope_scaling="none", max_seq_len=64)
  model = model_lib.Transformer(spec)
  abstract = jax.eval_shape(lambda: model_lib.init_params(model, jax.random.key(0)))
  mesh = sharding.make_mesh(_mesh_cfg())
  shardings = sharding.logical_shardings(abstract, model_lib.logical_axes(model), mesh,
                                         sharding.LOGICAL_RULES)
  assert jax.tree.structure(shardings) == jax.tree.structure(abstract)
  assert shardings["embedding"].spec == P("tensor", "fsdp")
  assert shardings["layers"]["mlp"]["down"].spec == P(None, "tensor", "fsdp")


def test_detect_cluster_from_environment():
  assert sharding.detect_cluster({}) is None
  assert sharding.detect_cluster({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "1",
                                  "SLURM_PROCID": "0"}) is None
  assert sharding.detect_cluster({"SLURM_JOB_ID": "1", "SLURM_NTASKS": "4",
                                  "SLURM_PROCID": "2"}) == "slurm"
  assert sharding.detect_cluster({"TPU_WORKER_HOSTNAMES": "a,b,c,d"}) == "tpu_pod"
  assert sharding.detect_cluster({"TPU_WORKER_HOSTNAMES": "localhost"}) is None
  assert sharding.detect_cluster({"JAX_COORDINATOR_ADDRESS": "h:1234"}) == "jax_env"


def test_initialize_distributed_single_process_is_a_noop_and_fields_are_checked():
  cfg = ml_collections.ConfigDict(dict(coordinator_address="", num_processes=0, process_id=-1,
                                       initialize="auto"))
  assert sharding.initialize_distributed(cfg, env={}) is False
  cfg.initialize = "never"
  assert sharding.initialize_distributed(cfg, env={"JAX_COORDINATOR_ADDRESS": "h:1"}) is False
  cfg.initialize = "sometimes"
  with pytest.raises(ValueError, match=r"distributed\.initialize"):
    sharding.initialize_distributed(cfg, env={})
  cfg.initialize = "auto"
  cfg.coordinator_address = "localhost:1234"
  with pytest.raises(ValueError, match=r"distributed\.num_processes"):
    sharding.initialize_distributed(cfg, env={})
  cfg.num_processes = 2
  with pytest.raises(ValueError, match=r"distributed\.process_id"):
    sharding.initialize_distributed(cfg, env={})


_EIGHT_DEVICES = textwrap.dedent("""
    import jax, ml_collections
    from jax.sharding import PartitionSpec as P
    from archscale.model import sharding
    from archscale.model import transformer as model_lib
    from archscale.model.arch import ArchSpec

    assert jax.device_count() == 8
    spec = ArchSpec(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_head=8, d_ff=64,
                    vocab_size=256, rope_scaling="none", max_seq_len=64)
    model = model_lib.Transformer(spec)
    abstract = jax.eval_shape(lambda: model_lib.init_params(model, jax.random.key(0)))
    axes = model_lib.logical_axes(model)

    def mesh(data, fsdp, tensor):
      return sharding.make_mesh(ml_collections.ConfigDict(
          dict(data=data, fsdp=fsdp, tensor=tensor, rules="")))

    m = mesh(2, 2, 2)
    sh = sharding.logical_shardings(abstract, axes, m, sharding.LOGICAL_RULES)
    # embedding [V=256, D=32]: vocab over tensor (2), embed over fsdp (2); data replicates.
    assert sh["embedding"].shard_shape((256, 32)) == (128, 16), sh["embedding"]
    assert sh["layers"]["attn"]["q"].shard_shape((2, 32, 4, 8)) == (2, 16, 2, 8)
    b = sharding.batch_sharding(m, sharding.LOGICAL_RULES)
    assert b.spec == P(("data", "fsdp"), None) and b.shard_shape((8, 33)) == (2, 33)
    assert sharding.batch_parallelism(m, sharding.LOGICAL_RULES) == 4
    # A sequence-parallel activation rule leaves the token array's (odd) positions whole.
    seq_rules = sharding.parse_rules("seq=tensor")
    assert sharding.batch_sharding(m, seq_rules).spec == P(("data", "fsdp"), None)

    try:  # 2 KV heads cannot be split 8 ways.
      sharding.logical_shardings(abstract, axes, mesh(1, 1, 8), sharding.LOGICAL_RULES)
      raise SystemExit("no error for 2 kv heads over mesh.tensor=8")
    except ValueError as e:
      assert "['layers']['attn']['k']" in str(e) and "mesh.tensor=8" in str(e), e
    print("OK")
""")


def test_shardings_on_eight_devices():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  out = subprocess.run([sys.executable, "-c", _EIGHT_DEVICES], env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


_LOOP_REDUCTIONS = textwrap.dedent("""
import re
import jax
from archscale.core import config_lib
from archscale.train import trainer as train

def loop_all_reduces(loss_chunk):
  c = config_lib.make_config("demo")
  c.data.seq_len = 128
  c.train.global_batch_size = 16
  c.train.loss_chunk = loss_chunk
  c.mesh.update(data=4, fsdp=2, tensor=1)
  setup = train.build(c, with_data=False)
  text = train.compile_step(setup, c.train).as_text()
  bodies = set(re.findall(r"body=%?([\\w.\\-]+)", text))
  count, comp = 0, None
  for line in text.splitlines():
    m = re.match(r"^(?:ENTRY )?%?([\\w.\\-]+) .*\\{$", line)
    if m:
      comp = m.group(1)
    elif comp in bodies and re.search(r" all-reduce(-start)?\\(", line):
      count += 1
  return count

assert jax.device_count() == 8
full, chunked = loop_all_reduces(0), loop_all_reduces(32)
assert chunked == full, (full, chunked)
print("OK", full, chunked)
""")


def test_data_times_fsdp_step_needs_no_replication_and_one_head_reduction():
  """On a 4 x 2 (data x fsdp) mesh the partitioner never replicates an activation to reshard it
  (it warns when it must), and the fused loss adds no reduction inside its loop over chunks."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL="0")  # keep its warnings
  out = subprocess.run([sys.executable, "-c", _LOOP_REDUCTIONS], env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
  assert "Involuntary full rematerialization" not in out.stderr, out.stderr[-3000:]
