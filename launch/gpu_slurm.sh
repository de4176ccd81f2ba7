#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one JAX process per node, each driving all its GPUs.
#
#   sbatch --nodes=4 launch/gpu_slurm.sh configs/llama3_2_1b.py runs/llama1b \
#       --config.compute.dtype=bfloat16 --config.data.path=/data/dolma_llama3
#
# jax.distributed is initialised from the SLURM environment (archscale.model.sharding detects
# SLURM_JOB_ID / SLURM_NTASKS / SLURM_PROCID), so no addresses are passed. For one process per GPU
# instead, use --ntasks-per-node=<GPUs> --gpus-per-task=1. The mesh defaults to pure data
# parallelism over all GPUs; set e.g. --config.mesh.fsdp=-1 --config.mesh.data=<nodes> to shard
# parameters within a node. Rerunning the same command (or `scontrol requeue`) resumes from the
# workdir's latest checkpoint. SLURM's SIGTERM before a preemption or the time limit triggers a
# final checkpoint and exit status 75 ("resume me"), on which this script requeues the job.
# One run of an emitted sweep (`sweep.launch=emit`): pass that run's config and the sweep's
# workdir and switch the mode (the last --mode wins); every task trains it, task 0 writes its row:
#   sbatch --nodes=2 launch/gpu_slurm.sh SWEEP/runs/<run_id>/sweep_config.py SWEEP --mode=sweep
#SBATCH --job-name=archscale
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --signal=TERM@120
#SBATCH --requeue
#SBATCH --output=slurm-%j.out
set -euo pipefail

config=${1:?usage: sbatch launch/gpu_slurm.sh CONFIG WORKDIR [--config.x=v ...]}
workdir=${2:?usage: sbatch launch/gpu_slurm.sh CONFIG WORKDIR [--config.x=v ...]}
shift 2

export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
# srun starts one task per node with SLURM_* set; --kill-on-bad-exit stops the job if one dies.
set +e
srun --kill-on-bad-exit=1 python -m archscale.main --mode=train --config="$config" \
  --workdir="$workdir" "$@"
rc=$?
if [ "$rc" -eq 75 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
  echo "archscale: the run stopped early to be resumed; requeueing job $SLURM_JOB_ID" >&2
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$rc"
