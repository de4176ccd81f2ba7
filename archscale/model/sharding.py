"""Device mesh, logical-to-mesh sharding rules and multi-host initialisation.

The mesh has three axes: `data` (pure data parallelism: parameters replicated), `fsdp` (data
parallelism with parameters and optimiser state sharded along `embed`) and `tensor` (heads, MLP
width and vocabulary split across devices). Every parameter and activation of the decoder
(`transformer`) carries logical axis names; `LOGICAL_RULES` maps them onto mesh axes.

One table serves both parameters and activations. In activations the `batch` dimension owns the
mesh axes it is mapped to (data and fsdp), so those axes are dropped from the other logical names
there (`activation_rules`): fsdp shards a weight along `embed` but an activation along `batch`.
Within one array two logical axes may never share a mesh axis, and every sharded dimension must be
divisible by the size of its mesh axes; both are checked here, with the array's path in the error,
instead of surfacing later as an XLA failure.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import jax
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

MeshAxes = tuple[str, ...]
Rules = tuple[tuple[str, MeshAxes], ...]

# logical axis -> mesh axes (empty = replicated). Parameters: embed, q_heads, kv_heads, head_dim,
# mlp, vocab, layers; activations: batch, seq, embed, q_heads, kv_heads, head_dim, mlp, vocab.
LOGICAL_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("embed", ("fsdp",)),
    ("q_heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("mlp", ("tensor",)),
    ("vocab", ("tensor",)),
    ("seq", ()),
    ("head_dim", ()),
    ("layers", ()),
)

DISTRIBUTED_MODES = ("auto", "always", "never")


# ------------------------------------------------------------------------------------ the mesh


def mesh_shape(mesh_config: Any, device_count: int) -> dict[str, int]:
  """Axis sizes from `mesh.{data,fsdp,tensor}` for `device_count` devices; one may be -1."""
  sizes = {}
  for axis in MESH_AXES:
    value = mesh_config[axis]
    if isinstance(value, bool) or not isinstance(value, int) or (value < 1 and value != -1):
      raise ValueError(f"mesh.{axis} must be a positive integer or -1 (the rest), got {value!r}")
    sizes[axis] = value
  free = [axis for axis, size in sizes.items() if size == -1]
  if len(free) > 1:
    raise ValueError(
        f"mesh.{free[0]} and mesh.{free[1]} are both -1; at most one mesh axis may take the rest "
        "of the devices")
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if free:
    if device_count % fixed:
      raise ValueError(
          f"mesh.{free[0]}=-1 cannot take the rest: the other axes use {fixed} devices, which does "
          f"not divide the {device_count} available; change the mesh.* sizes")
    sizes[free[0]] = device_count // fixed
  elif fixed != device_count:
    named = ", ".join(f"mesh.{a}={s}" for a, s in sizes.items())
    raise ValueError(
        f"{named} spans {fixed} devices but {device_count} are available; make the product "
        "equal the device count or set one axis to -1")
  return sizes


def make_mesh(mesh_config: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over all devices (or `devices`), laid out for the interconnect."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = mesh_shape(mesh_config, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


# ------------------------------------------------------------------------------------- rules


def parse_rules(overrides: str, base: Rules = LOGICAL_RULES) -> Rules:
  """`base` with `mesh.rules` overrides applied.

  Format: comma-separated `logical=axis[+axis]`; an empty right side replicates, e.g.
  `embed=,mlp=fsdp+tensor`.
  """
  rules = dict(base)
  for item in filter(None, (s.strip() for s in overrides.split(","))):
    name, sep, axes = item.partition("=")
    name = name.strip()
    if not sep or name not in rules:
      raise ValueError(
          f"mesh.rules entry {item!r} must look like logical=axis[+axis] with logical one of "
          f"{sorted(rules)}")
    mesh_axes = tuple(a.strip() for a in axes.split("+") if a.strip())
    unknown = [a for a in mesh_axes if a not in MESH_AXES]
    if unknown or len(set(mesh_axes)) != len(mesh_axes):
      raise ValueError(
          f"mesh.rules entry {item!r}: mesh axes must be distinct names from {MESH_AXES}")
    rules[name] = mesh_axes
  return tuple(rules.items())


def activation_rules(rules: Rules) -> Rules:
  """The rules for activations: mesh axes owned by `batch` are removed from every other name."""
  table = dict(rules)
  batch_axes = set(table.get("batch", ()))
  return tuple((name, axes if name == "batch" else tuple(a for a in axes if a not in batch_axes))
               for name, axes in rules)


def logical_to_mesh(logical: Sequence[str | None], rules: Rules, what: str = "array",
                    field: str = "mesh.rules") -> PartitionSpec:
  """The mesh PartitionSpec of one array's logical axes; raises when two share a mesh axis."""
  table = dict(rules)
  owner: dict[str, str] = {}
  out = []
  for name in logical:
    if name is None:
      out.append(None)
      continue
    if name not in table:
      raise ValueError(f"{what}: logical axis {name!r} has no rule; known: {sorted(table)}")
    axes = table[name]
    for axis in axes:
      if axis in owner:
        raise ValueError(
            f"{field}: {what} has logical axes {owner[axis]!r} and {name!r} (axes "
            f"{tuple(logical)}) both mapped to mesh axis {axis!r}; map one of them elsewhere")
      owner[axis] = name
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*out)


def check_divisible(shape: Sequence[int], spec: PartitionSpec, axis_sizes: dict[str, int],
                    what: str = "array") -> None:
  """Raises unless every sharded dimension divides evenly over its mesh axes."""
  for dim, (size, axes) in enumerate(zip(shape, tuple(spec) + (None,) * len(shape), strict=False)):
    if axes is None:
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    parts = math.prod(axis_sizes[a] for a in axes)
    if size % parts:
      named = " x ".join(f"mesh.{a}={axis_sizes[a]}" for a in axes)
      raise ValueError(
          f"{what}: dimension {dim} (size {size}) is sharded over {named} ({parts} parts) but is "
          f"not divisible by it; change mesh.{axes[-1]} or map this axis elsewhere in mesh.rules")


def _is_spec(x: Any) -> bool:
  return isinstance(x, PartitionSpec)


def logical_shardings(abstract: Any, logical: Any, mesh: Mesh, rules: Rules) -> Any:
  """NamedShardings for a pytree of arrays whose logical axis names are in `logical` (same tree).

  Checks collisions and divisibility for every leaf, naming its path.
  """
  sizes = dict(mesh.shape)

  def one(path, spec, leaf):
    what = f"parameter {jax.tree_util.keystr(path)}"
    mesh_spec = logical_to_mesh(tuple(spec), rules, what)
    check_divisible(leaf.shape, mesh_spec, sizes, what)
    return NamedSharding(mesh, mesh_spec)

  return jax.tree_util.tree_map_with_path(one, logical, abstract, is_leaf=_is_spec)


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
  """Sharding of a [batch, seq] token array: rows over the batch axes, positions replicated."""
  # Positions stay whole: the token array is seq_len + 1 long, which a sequence-parallel rule
  # for activations ("seq=...") would rarely divide.
  return NamedSharding(mesh, logical_to_mesh(("batch", None), activation_rules(rules), "batch"))


def batch_parallelism(mesh: Mesh, rules: Rules) -> int:
  """How many ways the batch dimension is split (the product of the batch rule's mesh axes)."""
  return math.prod(mesh.shape[a] for a in dict(rules).get("batch", ()))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


# ------------------------------------------------------------------------------- multi-host

# Environment variables that mark a multi-process launch (JAX's own cluster detection reads them).
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID")
_TPU_POD_VARS = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")


def detect_cluster(env: dict[str, str] | None = None) -> str | None:
  """Names the multi-process environment this process runs in, or None when single-process."""
  env = os.environ if env is None else env
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return "jax_env"
  if all(v in env for v in _SLURM_VARS) and int(env.get("SLURM_NTASKS", "1")) > 1:
    return "slurm"
  hosts = env.get("TPU_WORKER_HOSTNAMES", "")
  if "," in hosts or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
    return "tpu_pod"
  if "OMPI_MCA_orte_hnp_uri" in env:
    return "ompi"
  return None


def initialize_distributed(dist_config: Any, env: dict[str, str] | None = None) -> bool:
  """Starts `jax.distributed` when this is a multi-process run; returns whether it did.

  `distributed.initialize`: "never" skips; "always" initialises (explicit fields, else JAX's own
  cluster detection); "auto" initialises when `distributed.coordinator_address` is set or a
  SLURM job with several tasks, a TPU pod or JAX_COORDINATOR_ADDRESS is detected, and is a no-op
  for a single process. Must run before anything touches the devices.
  """
  mode = dist_config.initialize
  if mode not in DISTRIBUTED_MODES:
    raise ValueError(f"distributed.initialize must be one of {DISTRIBUTED_MODES}, got {mode!r}")
  if mode == "never":
    return False
  explicit = bool(dist_config.coordinator_address)
  if explicit:
    if dist_config.num_processes < 1:
      raise ValueError("distributed.num_processes must be set (>= 1) with "
                       "distributed.coordinator_address")
    if not 0 <= dist_config.process_id < dist_config.num_processes:
      raise ValueError(
          f"distributed.process_id must be in [0, {dist_config.num_processes}) with "
          f"distributed.coordinator_address, got {dist_config.process_id}")
  cluster = detect_cluster(env)
  if mode == "auto" and not explicit and cluster is None:
    return False
  if jax.distributed.is_initialized():
    return True
  kwargs = {}
  if explicit:
    kwargs = dict(coordinator_address=dist_config.coordinator_address,
                  num_processes=int(dist_config.num_processes),
                  process_id=int(dist_config.process_id))
  logging.info("initialising jax.distributed (%s)", "explicit" if explicit else cluster)
  jax.distributed.initialize(**kwargs)
  return True


def describe_topology(mesh: Mesh | None = None) -> str:
  """One line naming this process and the device counts: the first thing a run logs."""
  devices = jax.devices()
  text = (f"process {jax.process_index()}/{jax.process_count()}: "
          f"{jax.local_device_count()} local / {jax.device_count()} global devices "
          f"({devices[0].platform}, {devices[0].device_kind})")
  if mesh is not None:
    text += " mesh " + " x ".join(f"{a}={n}" for a, n in mesh.shape.items())
  return text
