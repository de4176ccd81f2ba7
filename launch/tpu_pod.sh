#!/usr/bin/env bash
# Multi-host training on a Cloud TPU VM pod slice: the same command on every worker.
#
#   launch/tpu_pod.sh my-tpu us-central2-b configs/llama3_2_1b.py /mnt/shared/runs/llama1b \
#       --config.compute.dtype=bfloat16 --config.data.path=/mnt/data/dolma_llama3
#
# Assumes the repository is checked out at ~/archscale on every worker with its dependencies
# installed (e.g. `gcloud compute tpus tpu-vm ssh NAME --worker=all --command="cd archscale &&
# pip install -e ."`) and the prepared dataset readable at the same path on every host. Each
# worker runs one JAX process; jax.distributed finds its peers through the TPU metadata
# (archscale.model.sharding detects the pod), and each process loads only its own rows of every batch.
# The workdir must be one directory seen by all workers (Filestore/NFS, a gcsfuse mount of a
# bucket, or a gs:// URI with gcsfs installed): checkpoints are written there collectively and
# restarts resume from them. A gs:// data.path is copied to each worker's local cache once.
# One run of an emitted sweep: SWEEP/runs/<run_id>/sweep_config.py as CONFIG, the sweep's
# directory as WORKDIR and --mode=sweep among the overrides (the last --mode wins).
set -euo pipefail

tpu=${1:?usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.x=v ...]}
zone=${2:?usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.x=v ...]}
config=${3:?usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.x=v ...]}
workdir=${4:?usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [--config.x=v ...]}
shift 4

# Every word is quoted for the remote shell, so a path or override holding blanks, quotes or $(...)
# reaches archscale as text.
remote=$(printf ' %q' python -m archscale.main --mode=train "--config=$config" \
  "--workdir=$workdir" --config.distributed.initialize=always "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="cd ~/archscale &&$remote"
