#!/usr/bin/env bash
# What the speed work since the first H100 table still needs from a GPU, in one device call of under 9.5 minutes
# (BENCHMARKS.md, "Speed work after the first GPU table": every "GPU: to be measured").
#
# Preparation, once, here: bash benchmarks/fetch_wheels.sh
# With the device tool:
#   run(command="bash benchmarks/gpu_followup.sh $OUT", carry=[".whl"], timeout_s=580)
#
# In order of importance, each part given what is left of a total budget (FOLLOWUP_TOTAL_S, default 540 s, counted
# from this script's start), each writing its log and JSON into OUTPUT_DIRECTORY as it goes:
#   1. bench.json/.log: the ResNeSt-101 b16 bf16 train rows (JAX now normalises uint8 crops inside the step; was
#      151.0 img/s against PyTorch autocast's 68.2), the inference rows (were host-bound at 6.5 and 5.3 img/s)
#      and the input-pipeline row, through benchmarks/run_gpu.sh (which also installs the carried wheels).
#   2. random_walk.json/.log: our stencil random walk against the authors' dense PyTorch walk at 375x500 and
#      640x640 (benchmarks/random_walk.py; about a minute, at most FOLLOWUP_RANDOM_WALK_MAX_S, default 120 s).
#   3. end_to_end.json/.log: the real train_cam stage's images/s with 8 grain workers and with 0.
#   4. memory.json/.log: XLA's static memory of the ResNeSt-269 step with and without remat (the numbers
#      model.remat=auto acts on), if at least FOLLOWUP_MEMORY_MIN_S (default 150 s) is left.
# The arguments of each part can be replaced for a CPU check (FOLLOWUP_BENCH_ARGS, FOLLOWUP_RANDOM_WALK_ARGS,
# FOLLOWUP_END_TO_END_ARGS, FOLLOWUP_MEMORY_ARGS; BENCH_REQUIRE_ACCELERATOR=0 lets the bench run on a CPU).
set -u -o pipefail
started=$(date +%s)
out=${1:?usage: gpu_followup.sh OUTPUT_DIRECTORY}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
deadline=$((started + ${FOLLOWUP_TOTAL_S:-540}))
seconds_left() { echo $((deadline - $(date +%s))); }

bench_budget=${FOLLOWUP_BENCH_BUDGET_S:-240}
read -r -a bench_args <<< "${FOLLOWUP_BENCH_ARGS:---archs resnest101 --batch-sizes 16 --dtypes bfloat16 --kinds train,inference,pipeline}"
echo "gpu_followup: 1/4 bench rows (budget ${bench_budget} s)" >&2
BENCH_TIME_BUDGET_S=$bench_budget BENCH_HARD_LIMIT_S=$((bench_budget + 45)) \
  bash benchmarks/run_gpu.sh "$out/bench.json" "${bench_args[@]}" > "$out/bench.log" 2>&1
echo "gpu_followup: bench exited $? after $(($(date +%s) - started)) s" >&2
tail -n 15 "$out/bench.log" >&2

# run_gpu.sh installed the carried wheels here (and the fallback flax/optax/orbax only if its preflight needed them).
site=/tmp/puzzle_bench_site
[ -d /tmp/puzzle_bench_fallback ] && site=/tmp/puzzle_bench_fallback:$site
export PYTHONPATH=$PWD:$site${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1

read -r -a random_walk_args <<< "${FOLLOWUP_RANDOM_WALK_ARGS:---device cuda --batches 1,16 --repeats 10}"
limit=$(($(seconds_left) - 10))
[ "$limit" -gt "${FOLLOWUP_RANDOM_WALK_MAX_S:-120}" ] && limit=${FOLLOWUP_RANDOM_WALK_MAX_S:-120}
if [ "$limit" -gt 30 ]; then
  echo "gpu_followup: 2/4 random walk (at most ${limit} s)" >&2
  timeout "$limit" "$python" -m benchmarks.random_walk "${random_walk_args[@]}" --json "$out/random_walk.json" \
    > "$out/random_walk.log" 2>&1
  echo "gpu_followup: random walk exited $? after $(($(date +%s) - started)) s" >&2
  tail -n 10 "$out/random_walk.log" >&2
else
  echo "gpu_followup: random walk skipped: ${limit} s left" >&2
fi

read -r -a end_to_end_args <<< "${FOLLOWUP_END_TO_END_ARGS:---arch resnest101 --dtype bfloat16 --batch 32 --workers 8,0}"
limit=$(($(seconds_left) - 10))
if [ "$limit" -gt 30 ]; then
  echo "gpu_followup: 3/4 end to end (at most ${limit} s)" >&2
  timeout "$limit" "$python" benchmarks/end_to_end.py "${end_to_end_args[@]}" --json "$out/end_to_end.json" \
    > "$out/end_to_end.log" 2>&1
  echo "gpu_followup: end to end exited $? after $(($(date +%s) - started)) s" >&2
  grep -v '^\s*$' "$out/end_to_end.log" | tail -n 8 >&2
else
  echo "gpu_followup: end to end skipped: ${limit} s left" >&2
fi

read -r -a memory_args <<< "${FOLLOWUP_MEMORY_ARGS:---archs resnest269 --batch 32 --dtypes bfloat16,float32 --remat 0,1}"
limit=$(($(seconds_left) - 5))
if [ "$limit" -ge "${FOLLOWUP_MEMORY_MIN_S:-150}" ]; then
  echo "gpu_followup: 4/4 memory estimate (at most ${limit} s)" >&2
  timeout "$limit" "$python" benchmarks/memory_estimate.py "${memory_args[@]}" --json "$out/memory.json" \
    > "$out/memory.log" 2>&1
  echo "gpu_followup: memory estimate exited $? after $(($(date +%s) - started)) s" >&2
  tail -n 8 "$out/memory.log" >&2
else
  echo "gpu_followup: memory estimate skipped: ${limit} s left" >&2
fi
echo "gpu_followup: done in $(($(date +%s) - started)) s; results in $out" >&2
