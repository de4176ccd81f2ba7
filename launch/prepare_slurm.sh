#!/usr/bin/env bash
# Data preparation as a SLURM array: task i of n tokenizes units i, i + n, ... into one data.path.
#
#   sbatch --array=0-15 launch/prepare_slurm.sh configs/llama3_2_1b.py runs/prep \
#       --config.data.source=/data/dolma/v1_7 --config.data.path=/data/dolma_llama3 \
#       --config.data.tokenizer=/models/llama3/tokenizer.json
#
# Array indices must run 0..n-1. Each task uses its CPUs as data.workers. The task that finds
# every unit finished writes metadata.json; a requeued or rerun task redoes only unfinished units.
# If tasks ended without that final step (one failed, say), rerun one task with
# --config.data.partition=0/1: it prepares what is missing and finishes the dataset.
#SBATCH --job-name=archscale-data
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=32
#SBATCH --requeue
#SBATCH --output=slurm-%A_%a.out
set -euo pipefail

config=${1:?usage: sbatch --array=0-N launch/prepare_slurm.sh CONFIG WORKDIR [--config.x=v ...]}
workdir=${2:?usage: sbatch --array=0-N launch/prepare_slurm.sh CONFIG WORKDIR [--config.x=v ...]}
shift 2

python -m archscale.main --mode=prepare_data --config="$config" --workdir="$workdir" \
  --config.data.partition="${SLURM_ARRAY_TASK_ID}/${SLURM_ARRAY_TASK_COUNT}" \
  --config.data.workers="${SLURM_CPUS_PER_TASK:-1}" "$@"
