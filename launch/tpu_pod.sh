#!/usr/bin/env bash
# Runs a config on every host of a Cloud TPU VM pod slice obtained through a queued resource: one process per host,
# each started with the same command (puzzle_jax.main calls jax.distributed.initialize(), which finds the other
# hosts through TPU_WORKER_HOSTNAMES).
#
#   launch/tpu_pod.sh [--dry-run] create NAME ZONE ACCELERATOR_TYPE      queue a request for the slice (spot)
#   launch/tpu_pod.sh [--dry-run] mount  NAME ZONE SERVER:/SHARE MOUNT_POINT    mount an NFS share on every host
#   launch/tpu_pod.sh [--dry-run] run    NAME ZONE CONFIG WORKDIR [--config.x=y ...]   copy the repository, run
#   launch/tpu_pod.sh [--dry-run] delete NAME ZONE                        delete the request and its slice
#
# For example, a v4-32 slice (4 hosts) with a Filestore share at 10.0.0.2:/runs:
#   launch/tpu_pod.sh create pjx us-central2-b v4-32
#   launch/tpu_pod.sh mount pjx us-central2-b 10.0.0.2:/runs /mnt/runs
#   launch/tpu_pod.sh run pjx us-central2-b configs/resnest101.py /mnt/runs/resnest101 \
#       --config.data.data_dir=/mnt/runs/tensorflow_datasets
#
# --dry-run prints every command (gcloud, tar) instead of running it.
#
# create: `gcloud compute tpus queued-resources create NAME --node-id=NAME ... --spot`. The request waits in the
#   queue (WAITING_FOR_RESOURCES, then PROVISIONING) until the slice exists (ACTIVE); `run` waits for that. The
#   provisioning model comes from TPU_PROVISIONING: `spot` (default; --spot: cheapest, can be preempted at any
#   time), `reserved` (--reserved: your project's reservation) or `on-demand` (no flag). (`--best-effort` is the
#   older preemptible tier, only in `gcloud alpha/beta`; --spot replaces it.) The software image comes from
#   TPU_RUNTIME_VERSION, by default the one for the TPU generation (v4: tpu-ubuntu2204-base, v5litepod:
#   v2-alpha-tpuv5-lite, v5p: v2-alpha-tpuv5, v6e: v2-alpha-tpuv6e). The project is gcloud's (`gcloud config set
#   project ...` or CLOUDSDK_CORE_PROJECT).
# mount: installs nfs-common and mounts SERVER:/SHARE (a Filestore instance's IP and share) at MOUNT_POINT on every
#   host, so that the workdir and data_dir can live there. Run it again after a new slice was created.
# run: packs this checkout (without .git and runs/), copies it to ~/puzzle_jax on every host (`tpu-vm scp
#   --worker=all`), installs requirements.txt with jax[tpu] and starts puzzle_jax.main on every host at once (`tpu-vm
#   ssh --worker=all`; run `ssh-add ~/.ssh/google_compute_engine` first, as gcloud asks for several workers). Its
#   output is every host's, line by line; keep the terminal open (tmux). WORKDIR must be an absolute path that every
#   host sees, the same files at the same path (an NFS share from `mount`); the pipeline writes it through the
#   local file system API, so a gs:// URL is refused. data.data_dir must be shared too (the default
#   ~/tensorflow_datasets is each host's own disk: every host would prepare its own copy of the dataset).
# delete: deletes the queued resource and its slice (--force).
#
# Preemption: a spot slice can be taken back at any time. The hosts are shut down (a training stage that gets
# SIGTERM or the cluster's preemption notice in time saves the step on every host) and the queued resource ends in
# SUSPENDED: it does not come back. To resume: `delete`, `create` again, `mount`, then the same `run` command; every
# stage continues from the shared workdir (training from its newest checkpoint, per-image stages from the files
# already written).
set -euo pipefail

usage="usage: $0 [--dry-run] create NAME ZONE ACCELERATOR_TYPE
       $0 [--dry-run] mount NAME ZONE SERVER:/SHARE MOUNT_POINT
       $0 [--dry-run] run NAME ZONE CONFIG WORKDIR [--config.x=y ...]
       $0 [--dry-run] delete NAME ZONE"
dry_run=0
if [[ ${1:-} == --dry-run ]]; then
  dry_run=1
  shift
fi
fail() {  # a usage or input error: the message (its words joined), and exit status 2
  echo "tpu_pod.sh: $*" >&2
  exit 2
}
if [[ $# -lt 3 ]]; then
  echo "$usage" >&2
  exit 2
fi
action=$1
name=$2
zone=$3
shift 3
repo_dir=$(cd "$(dirname "$0")/.." && pwd)

# quoted: prints its arguments as one shell command line.
# shellcheck source=launch/shell_words.sh
source "$(dirname "${BASH_SOURCE[0]}")/shell_words.sh"

execute() {  # runs the command, or prints it under --dry-run
  if ((dry_run)); then
    quoted "$@"
  else
    "$@"
  fi
}

default_runtime_version() {  # $1: the accelerator type
  case $1 in
    v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) fail "no default runtime version for accelerator type $1: set TPU_RUNTIME_VERSION (see the Cloud TPU" \
      "docs' 'TPU software versions')." ;;
  esac
}

wait_until_active() {  # polls the queued resource's state until its slice exists
  local state
  local describe=(gcloud compute tpus queued-resources describe "$name" --zone="$zone" "--format=value(state.state)")
  if ((dry_run)); then
    echo "$(quoted "${describe[@]}")   # repeated every 60 s until the state is ACTIVE"
    return
  fi
  while :; do
    state=$("${describe[@]}")
    case $state in
      ACTIVE) return ;;
      SUSPENDED | SUSPENDING | FAILED | DELETING)
        fail "queued resource $name is $state (a spot slice that was preempted, or a failed request):" \
          "run '$0 delete $name $zone', then create it again." ;;
      *) echo "tpu_pod.sh: queued resource $name is $state; checking again in 60 s" >&2 && sleep 60 ;;
    esac
  done
}

case $action in
  create)
    [[ $# -eq 1 ]] || fail "create takes NAME ZONE ACCELERATOR_TYPE. $usage"
    accelerator_type=$1
    runtime_version=${TPU_RUNTIME_VERSION:-$(default_runtime_version "$accelerator_type")}
    case ${TPU_PROVISIONING:-spot} in
      spot) provisioning=(--spot) ;;
      reserved) provisioning=(--reserved) ;;
      on-demand) provisioning=() ;;
      *) fail "TPU_PROVISIONING=${TPU_PROVISIONING} is not one of spot, reserved, on-demand." ;;
    esac
    execute gcloud compute tpus queued-resources create "$name" --node-id="$name" --zone="$zone" \
      --accelerator-type="$accelerator_type" --runtime-version="$runtime_version" "${provisioning[@]}"
    ;;
  mount)
    [[ $# -eq 2 ]] || fail "mount takes NAME ZONE SERVER:/SHARE MOUNT_POINT. $usage"
    share=$1
    mount_point=$2
    [[ $share == *:/* ]] ||
      fail "the share must be SERVER:/SHARE (a Filestore instance: its IP and file share name), got '$share'."
    [[ $mount_point == /* ]] || fail "the mount point must be an absolute path, got '$mount_point'."
    remote="sudo apt-get -qq update && sudo apt-get -qq install -y nfs-common && sudo mkdir -p $(quoted "$mount_point")"
    remote+=" && (mountpoint -q $(quoted "$mount_point")"
    remote+=" || sudo mount -t nfs -o rw,hard $(quoted "$share" "$mount_point"))"
    remote+=" && sudo chmod a+rwx $(quoted "$mount_point")"
    wait_until_active
    execute gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="$remote"
    ;;
  run)
    [[ $# -ge 2 ]] || fail "run takes NAME ZONE CONFIG WORKDIR [overrides]. $usage"
    config=$1
    workdir=$2
    shift 2
    [[ $workdir != gs://* ]] || fail "WORKDIR $workdir: the pipeline writes its workdir through the local file" \
      "system, so it must be a path that every host mounts (an NFS share: '$0 mount ...'), not a gs:// URL."
    [[ $workdir == /* ]] || fail "WORKDIR $workdir must be an absolute path that every host sees (e.g. an NFS" \
      "share mounted with '$0 mount ...')."
    [[ -f $repo_dir/$config ]] || fail "CONFIG $config is not a file of the repository ($repo_dir); give its" \
      "path from the repository root, e.g. configs/resnest101.py."
    if [[ " $* " != *" --config.data.data_dir="* ]]; then
      echo "tpu_pod.sh: note: data.data_dir comes from $config; every host must see it" \
        "(set --config.data.data_dir=<shared path>)." >&2
    fi
    jax_version=$(sed -n 's/^jax==\([0-9.]*\).*/\1/p' "$repo_dir/requirements.txt")
    [[ -n $jax_version ]] || fail "requirements.txt pins no jax==VERSION; cannot choose the jax[tpu] to install."
    archive=${TMPDIR:-/tmp}/puzzle_jax-$name.tar.gz
    remote="set -e; mkdir -p ~/puzzle_jax; tar -C ~/puzzle_jax -xzf ~/puzzle_jax.tar.gz; cd ~/puzzle_jax"
    remote+="; python3 -m pip install -q -r requirements.txt \"jax[tpu]==$jax_version\""
    remote+="; exec python3 -m puzzle_jax.main $(quoted --config="$config" --workdir="$workdir" "$@")"
    wait_until_active
    execute tar -C "$repo_dir" --exclude=./.git --exclude=./runs --exclude=__pycache__ -czf "$archive" .
    execute gcloud compute tpus tpu-vm scp "$archive" "$name":puzzle_jax.tar.gz --zone="$zone" --worker=all
    execute gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="$remote"
    ;;
  delete)
    [[ $# -eq 0 ]] || fail "delete takes NAME ZONE. $usage"
    execute gcloud compute tpus queued-resources delete "$name" --zone="$zone" --force --quiet
    ;;
  *)
    fail "unknown action '$action'. $usage"
    ;;
esac
