#!/usr/bin/env bash
# Runs a config on every worker of a Cloud TPU VM pod slice (one process per host; JAX discovers the other
# hosts itself, puzzle_jax.main calls jax.distributed.initialize() when TPU_WORKER_HOSTNAMES lists several).
#
#   launch/tpu_pod.sh TPU_NAME ZONE configs/resnest101.py gs://bucket/runs/resnest101 [--config.x=y ...]
#
# The workdir must be reachable from every host (a GCS path or a shared file system); the dataset's
# data_dir too (--config.data.data_dir=gs://...). The repository is copied to each worker's home first.
set -euo pipefail
if [[ $# -lt 4 ]]; then
  echo "usage: $0 TPU_NAME ZONE CONFIG WORKDIR [overrides...]" >&2
  exit 2
fi
tpu_name=$1; zone=$2; config=$3; workdir=$4; shift 4
repo_dir=$(cd "$(dirname "$0")/.." && pwd)
archive=$(mktemp --suffix=.tar.gz)
tar -C "$repo_dir" --exclude=runs --exclude=.git -czf "$archive" .
gcloud compute tpus tpu-vm scp "$archive" "$tpu_name":puzzle_jax.tar.gz --zone="$zone" --worker=all
overrides=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$tpu_name" --zone="$zone" --worker=all --command="
  set -e
  mkdir -p ~/puzzle_jax && tar -C ~/puzzle_jax -xzf ~/puzzle_jax.tar.gz && cd ~/puzzle_jax
  python3 -m pip install -q -r requirements.txt 'jax[tpu]==0.10.2'
  python3 -m puzzle_jax.main --config=$config --workdir=$workdir $overrides
"
