"""The accelerators archscale knows: dense bf16 peak FLOP/s, HBM bandwidth and capacity.

The cost model (archscale.serve.costmodel) predicts throughput from this table, and training
reports MFU against its peaks; `accelerator_for_device_kind` maps what JAX calls a device to an
entry, and to none where the table would give the wrong peak.
"""

from __future__ import annotations

import dataclasses

GB = 1e9
TB = 1e12


@dataclasses.dataclass(frozen=True)
class Accelerator:
  """One chip: dense bf16 peak FLOP/s, HBM bandwidth (bytes/s) and HBM capacity (bytes)."""

  name: str
  peak_flops: float
  hbm_bandwidth: float
  hbm_bytes: float


# Vendor data-sheet figures: dense (no sparsity) bf16 matmul peak, HBM bandwidth and capacity.
ACCELERATORS: dict[str, Accelerator] = {
    # NVIDIA H100 Tensor Core GPU datasheet, SXM5 column: 989 TFLOPS bf16 dense (1979 with
    # sparsity), 80 GB HBM3 at 3.35 TB/s.
    "h100-sxm": Accelerator("h100-sxm", 989e12, 3.35 * TB, 80 * GB),
    # NVIDIA H200 Tensor Core GPU datasheet, SXM column: same compute as H100 SXM, 141 GB HBM3e
    # at 4.8 TB/s.
    "h200": Accelerator("h200", 989e12, 4.8 * TB, 141 * GB),
    # NVIDIA A100 Tensor Core GPU datasheet: 312 TFLOPS bf16 dense; 40 GB HBM2 at 1,555 GB/s.
    "a100-40gb": Accelerator("a100-40gb", 312e12, 1.555 * TB, 40 * GB),
    # Same datasheet, 80 GB SXM: 80 GB HBM2e at 2,039 GB/s.
    "a100-80gb": Accelerator("a100-80gb", 312e12, 2.039 * TB, 80 * GB),
    # Google Cloud TPU v4 system architecture page: 275 TFLOPs bf16, 32 GiB HBM2 at 1,200 GB/s.
    "tpu-v4": Accelerator("tpu-v4", 275e12, 1.2 * TB, 32 * 2**30),
    # Cloud TPU v5e page: 197 TFLOPs bf16, 16 GB HBM2 at 819 GB/s.
    "tpu-v5e": Accelerator("tpu-v5e", 197e12, 0.819 * TB, 16 * GB),
    # Cloud TPU v5p page: 459 TFLOPs bf16, 95 GiB HBM2e at 2,765 GB/s.
    "tpu-v5p": Accelerator("tpu-v5p", 459e12, 2.765 * TB, 95 * 2**30),
    # Cloud TPU v6e (Trillium) page: 918 TFLOPs bf16, 32 GB HBM at 1,640 GB/s.
    "tpu-v6e": Accelerator("tpu-v6e", 918e12, 1.64 * TB, 32 * GB),
}

def get_accelerator(name: str | Accelerator) -> Accelerator:
  """The table entry for `name` (an Accelerator passes through)."""
  if isinstance(name, Accelerator):
    return name
  if name not in ACCELERATORS:
    raise ValueError(f"accelerator {name!r} is unknown; choose one of {sorted(ACCELERATORS)}")
  return ACCELERATORS[name]


def accelerator_for_device_kind(device_kind: str) -> str | None:
  """Maps `jax.devices()[0].device_kind` (e.g. "NVIDIA H100 80GB HBM3") to a table key.

  None for devices not in the table (CPU, PCIe / NVL / GH200 variants whose clocks and bandwidth
  differ from the SXM parts, TPU v4 lite), so callers never report against the wrong peak.
  """
  kind = device_kind.lower()
  if "nvidia" in kind or kind.startswith(("h100", "h200", "a100")):
    if "pcie" in kind or "nvl" in kind or "gh200" in kind:
      return None
    if "h200" in kind:
      return "h200"
    if "h100" in kind:
      return "h100-sxm"
    if "a100" in kind:
      return "a100-80gb" if "80gb" in kind else "a100-40gb"
    return None
  if kind.startswith("tpu"):
    if "v4" in kind:
      return None if "lite" in kind else "tpu-v4"
    if "v5" in kind:
      return "tpu-v5e" if ("lite" in kind or "v5e" in kind) else "tpu-v5p"
    if "v6" in kind:
      return "tpu-v6e"
  return None
