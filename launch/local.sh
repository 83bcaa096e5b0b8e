#!/usr/bin/env bash
# Runs one config as N cooperating processes on this machine, each with its own CPU devices: what a pod or a
# multi-node job does, on one computer (for trying a multi-process run, and for the tests of multi-process code).
#
#   launch/local.sh [--dry-run] N CONFIG WORKDIR [--config.x=y ...]
#   launch/local.sh 2 configs/demo.py runs/demo_2proc --config.train_cam.epochs=1
#
# Starts N `python3 -m puzzle_jax.main --config=CONFIG --workdir=WORKDIR --coordinator_address=127.0.0.1:PORT
# --num_processes=N --process_id=I --num_cpu_devices=K [overrides]` (I = 0 .. N-1) with JAX_PLATFORMS=cpu, and waits
# for all of them. Process 0's output goes to the terminal; every process's output is appended to
# WORKDIR/logs/process_<I>.log. --dry-run prints the commands instead of running them.
#
# Environment:
#   CPU_DEVICES_PER_PROCESS  K, the CPU devices each process exposes (default 1)
#   PUZZLE_JAX_PORT          the coordinator's port on 127.0.0.1 (default: a free port)
#   PYTHON                   the interpreter (default python3)
#   JAX_PLATFORMS            kept when set (default cpu)
#   PUZZLE_JAX_STOP_GRACE_S  seconds a process is given to exit after being asked to stop, before SIGKILL (default 30)
#
# Exit status: 0 when every process exited 0; otherwise the status of the first process that failed (75 when it was
# preempted: a checkpoint was saved, run the same command again to resume). When one process fails the others are
# stopped, since they would wait for it forever at their next collective: at once with SIGTERM, or, when the first
# failure is 75 (every process saves the same step and exits 75), after the grace period. Ctrl-C or SIGTERM to this
# script is passed to every process as SIGTERM (a training stage saves a checkpoint and exits 75); a second one
# kills them.
set -euo pipefail

usage="usage: $0 [--dry-run] N CONFIG WORKDIR [--config.x=y ...]"
dry_run=0
if [[ ${1:-} == --dry-run ]]; then
  dry_run=1
  shift
fi
if [[ $# -lt 3 ]]; then
  echo "$usage" >&2
  exit 2
fi
num_processes=$1
config=$2
workdir=$3
shift 3
cpu_devices=${CPU_DEVICES_PER_PROCESS:-1}
grace_s=${PUZZLE_JAX_STOP_GRACE_S:-30}
python=${PYTHON:-python3}
for setting in "N=$num_processes" "CPU_DEVICES_PER_PROCESS=$cpu_devices" "PUZZLE_JAX_STOP_GRACE_S=$grace_s"; do
  if ! [[ ${setting#*=} =~ ^[1-9][0-9]*$ ]]; then
    echo "local.sh: $setting must be a whole number >= 1. $usage" >&2
    exit 2
  fi
done
if ((BASH_VERSINFO[0] < 5)); then
  echo "local.sh: needs bash 5 or newer (EPOCHSECONDS); this is $BASH_VERSION." >&2
  exit 2
fi
if [[ -n ${PUZZLE_JAX_PORT:-} ]]; then
  port=$PUZZLE_JAX_PORT
else
  # The kernel's choice of a free port; it is released at once for process 0's coordinator to take.
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
logs=$workdir/logs

# quoted: prints its arguments as one shell command line.
# shellcheck source=launch/shell_words.sh
source "$(dirname "${BASH_SOURCE[0]}")/shell_words.sh"

process_command() {  # $1: the process id; fills the array `command`
  command=("$python" -m puzzle_jax.main --config="$config" --workdir="$workdir"
    --coordinator_address="127.0.0.1:$port" --num_processes="$num_processes" --process_id="$1"
    --num_cpu_devices="$cpu_devices" "${overrides[@]}")
}
overrides=("$@")

if ((dry_run)); then
  echo "export JAX_PLATFORMS=$(quoted "$JAX_PLATFORMS")"
  quoted mkdir -p "$logs"
  for ((i = 0; i < num_processes; i++)); do
    process_command "$i"
    if ((i == 0)); then
      echo "$(quoted "${command[@]}") > >(tee -a $(quoted "$logs/process_$i.log")) 2>&1 &"
    else
      echo "$(quoted "${command[@]}") >> $(quoted "$logs/process_$i.log") 2>&1 &"
    fi
  done
  echo "wait"
  exit 0
fi

mkdir -p "$logs"
declare -A process_of_pid=()  # pid -> process id, for the processes still running
exit_status=()                # process id -> exit status
first_failure=""              # the process id of the first process that exited with a status other than 0
stop_level=0                  # 0: running; 1: asked to stop (SIGTERM); 2: killed (SIGKILL)
next_step_at=""               # when (EPOCHSECONDS) stopping goes one step further, if it is under way

stop_processes() {  # $1: the signal; sends it to every process still running
  local pid
  for pid in "${!process_of_pid[@]}"; do
    kill -s "$1" "$pid" 2>/dev/null || true
  done
}

escalate() {  # one step further in stopping the processes: SIGTERM, then SIGKILL a grace period later
  if ((stop_level == 0)); then
    stop_level=1
    stop_processes TERM
    next_step_at=$((EPOCHSECONDS + grace_s))
  elif ((stop_level == 1)); then
    stop_level=2
    next_step_at=""
    echo "local.sh: killing the processes still running: ${process_of_pid[*]}" >&2
    stop_processes KILL
  fi
}

# shellcheck disable=SC2329  # invoked by the trap below
on_signal() {
  echo "local.sh: asking every process to stop (SIGTERM: a training stage saves a checkpoint and exits 75)" >&2
  escalate
}
trap on_signal INT TERM

process_ended() {  # $1: its pid, $2: its exit status; records it and stops the others after a first failure
  local i=${process_of_pid[$1]} status=$2
  unset "process_of_pid[$1]"
  exit_status[i]=$status
  if ((status != 0)) && [[ -z $first_failure ]]; then
    first_failure=$i
    echo "local.sh: process $i exited with status $status; the end of its log ($logs/process_$i.log):" >&2
    tail -n 20 "$logs/process_$i.log" | sed 's/^/    /' >&2 || true
    if ((${#process_of_pid[@]} > 0)); then
      if ((status == 75)); then
        echo "local.sh: waiting up to ${grace_s}s for the other processes to save the same step and exit" >&2
        next_step_at=$((EPOCHSECONDS + grace_s))
      else
        echo "local.sh: stopping the other processes" >&2
        escalate
      fi
    fi
  fi
}

for ((i = 0; i < num_processes; i++)); do
  process_command "$i"
  if ((i == 0)); then
    "${command[@]}" > >(tee -a "$logs/process_$i.log") 2>&1 &
  else
    "${command[@]}" >>"$logs/process_$i.log" 2>&1 &
  fi
  process_of_pid[$!]=$i
done
echo "local.sh: $num_processes processes (coordinator 127.0.0.1:$port, $cpu_devices CPU device(s) each);" \
  "logs in $logs" >&2

# Polls rather than `wait -n`: bash 5.2's `wait -n` can miss a process killed by a signal when several end at once.
# Bash reaps each process when it ends (kill -0 then fails) and keeps its status for `wait PID`.
while ((${#process_of_pid[@]} > 0)); do
  sleep 0.2 || true  # (Ctrl-C ends this sleep too: SIGINT goes to the whole process group)
  for pid in "${!process_of_pid[@]}"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      status=0
      wait "$pid" || status=$?
      process_ended "$pid" "$status"
    fi
  done
  if [[ -n $next_step_at ]] && ((EPOCHSECONDS >= next_step_at)); then
    escalate
  fi
done

summary=""
for ((i = 0; i < num_processes; i++)); do
  summary+=" $i:${exit_status[i]:-?}"
done
if [[ -z $first_failure ]]; then
  echo "local.sh: every process finished (exit status by process:$summary)" >&2
  exit 0
fi
echo "local.sh: exit status by process:$summary" >&2
exit "${exit_status[first_failure]}"
