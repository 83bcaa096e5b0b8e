#!/usr/bin/env bash
# The GPU measurements of the step's waste (BENCHMARKS.md, "GPU waste of the training step"), one device call of
# under 9.5 minutes per part.
#
# Preparation, once, here: bash benchmarks/fetch_wheels.sh
# With the device tool:
#   run(command="bash benchmarks/gpu_step_waste.sh $OUT", carry=[".whl"], timeout_s=580)          # part a
#   run(command="STEP_WASTE_PART=b bash benchmarks/gpu_step_waste.sh $OUT", carry=[".whl"], timeout_s=580)
#
# Part a (the before/after of the program choices, ResNeSt-101, 512x512, batch 16, bfloat16), in order of
# importance, each writing its log and JSON into OUTPUT_DIRECTORY as it goes, within STEP_WASTE_TOTAL_S (default
# 540 s) from this script's start:
#   1. torch.json/.log: the authors' step under PyTorch autocast, channels-last (the reference of the same run),
#      through benchmarks/run_gpu.sh (which installs the carried wheels and checks a tiny JAX step first).
#   2. jax.json/.log: our step once per program (model.grouped_conv/model.bn_statistics), today's default first;
#      rows that would start too late to finish are skipped. The compiled programs go to a compilation cache.
#   3. profile_<program>.json/.log: benchmarks/profile_step.py's kernel table of the fastest program (and of
#      today's default if time is left), compiled from the cache.
#   4. summary.txt: images/s, MFU, the ratio to today's default and to PyTorch of each program.
# Part b (the whole table with the fastest program; STEP_WASTE_PROGRAM, default split/one_pass): the gpu suite
# (batch 32, ResNeSt-50/-269, ResNet-50, float32 = TF32), then the ResNeSt-101 b16 bf16 row under each XLA flag set
# of STEP_WASTE_XLA_FLAGS (';'-separated sets; an unknown flag fails only its own row).
set -u -o pipefail
started=$(date +%s)
out=${1:?usage: gpu_step_waste.sh OUTPUT_DIRECTORY}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.." || exit 2
python=${PYTHON:-python3}
deadline=$((started + ${STEP_WASTE_TOTAL_S:-540}))
seconds_left() { echo $((deadline - $(date +%s))); }
log() { echo "gpu_step_waste: $* ($(($(date +%s) - started)) s)" >&2; }
programs=${STEP_WASTE_PROGRAMS:-grouped/two_pass,split/one_pass,split/two_pass,block_diagonal/one_pass,grouped/one_pass}
read -r -a shape <<< "${STEP_WASTE_SHAPE:---archs resnest101 --batch-sizes 16 --dtypes bfloat16}"
cache=${STEP_WASTE_CACHE:-/tmp/puzzle_step_waste_cache}
# Both benchmark processes and the profiler read the same cache: the profiled program is compiled once.
export JAX_COMPILATION_CACHE_DIR=$cache
require_accelerator=()
[ "${BENCH_REQUIRE_ACCELERATOR:-1}" = 1 ] && require_accelerator=(--require-accelerator)

use_installed_wheels() {  # after run_gpu.sh installed the carried wheels (and the fallback only if it needed it)
  local site=/tmp/puzzle_bench_site
  [ -d /tmp/puzzle_bench_fallback ] && site=/tmp/puzzle_bench_fallback:$site
  export PYTHONPATH=$PWD:$site${PYTHONPATH:+:$PYTHONPATH}
  export PYTHONUNBUFFERED=1
}

if [ "${STEP_WASTE_PART:-a}" = b ]; then
  program=${STEP_WASTE_PROGRAM:-split/one_pass}
  log "b/1 gpu suite with $program"
  BENCH_TIME_BUDGET_S=$(($(seconds_left) - 200)) BENCH_HARD_LIMIT_S=$(($(seconds_left) - 170)) \
    bash benchmarks/run_gpu.sh "$out/suite.json" --jax-programs "$program" --compilation-cache-dir "$cache" \
    > "$out/suite.log" 2>&1
  log "suite exited $?"
  tail -n 40 "$out/suite.log" >&2
  use_installed_wheels
  IFS=';' read -r -a flag_sets <<< "${STEP_WASTE_XLA_FLAGS:---xla_gpu_enable_command_buffer=;--xla_gpu_autotune_level=0;--xla_gpu_enable_triton_gemm=false;--xla_gpu_enable_latency_hiding_scheduler=true}"
  index=0
  for flags in "${flag_sets[@]}"; do
    index=$((index + 1))
    limit=$(($(seconds_left) - 5))
    if [ "$limit" -lt 150 ]; then log "b/2 XLA flags '$flags' skipped: ${limit} s left"; continue; fi
    log "b/2 XLA flags '$flags'"
    XLA_FLAGS="${XLA_FLAGS:-} $flags" timeout "$limit" "$python" -m benchmarks.bench --suite grid "${shape[@]}" \
      --frameworks jax --jax-programs "$program" ${require_accelerator[@]+"${require_accelerator[@]}"} --json "$out/flags_$index.json" \
      --time-budget-s 60 --hard-limit-s "$limit" > "$out/flags_$index.log" 2>&1
    log "flags '$flags' exited $?"
    tail -n 3 "$out/flags_$index.log" >&2
  done
  log "done; results in $out"
  exit 0
fi

log "a/1 PyTorch autocast reference"
BENCH_TIME_BUDGET_S=60 BENCH_HARD_LIMIT_S=$((${STEP_WASTE_TORCH_MAX_S:-150})) \
  bash benchmarks/run_gpu.sh "$out/torch.json" --suite grid "${shape[@]}" --frameworks torch > "$out/torch.log" 2>&1
log "torch exited $?"
tail -n 4 "$out/torch.log" >&2
use_installed_wheels

# A ResNeSt-101 row takes 75-120 s to compile: none starts later than 200 s before the end, so that the profiles
# (compiled from the cache: about a minute each) still fit.
now=$(date +%s)
log "a/2 programs $programs"
"$python" -m benchmarks.bench --suite grid "${shape[@]}" --frameworks jax --jax-programs "$programs" \
  ${require_accelerator[@]+"${require_accelerator[@]}"} --compilation-cache-dir "$cache" --json "$out/jax.json" --started-at "$now" \
  --time-budget-s $(($(seconds_left) - 200)) --hard-limit-s $(($(seconds_left) - 90)) > "$out/jax.log" 2>&1
log "programs exited $?"
tail -n 12 "$out/jax.log" >&2

fastest=$("$python" - "$out/jax.json" <<'EOF'
import json, sys
rows = [row for row in json.load(open(sys.argv[1]))["rows"] if row["status"] == "ok" and row.get("program")]
print(max(rows, key=lambda row: row["images_per_second"])["program"] if rows else "")
EOF
)
read -r -a profile_shape <<< "${STEP_WASTE_PROFILE_SHAPE:---arch resnest101 --batch 16 --dtype bfloat16 --size 512}"
for program in $fastest grouped/two_pass; do
  limit=$(($(seconds_left) - 5))
  name=profile_${program//\//_}
  [ -e "$out/$name.json" ] && continue
  if [ "$limit" -lt 60 ]; then log "a/3 profile of $program skipped: ${limit} s left"; continue; fi
  log "a/3 profile of $program (at most $limit s)"
  timeout "$limit" "$python" -m benchmarks.profile_step "${profile_shape[@]}" --grouped-conv "${program%/*}" \
    --bn-statistics "${program#*/}" --trace-dir "$out/trace_${program//\//_}" --json "$out/$name.json" \
    > "$out/$name.log" 2>&1
  log "profile exited $?"
  head -n 30 "$out/$name.log" >&2
done

"$python" - "$out" > "$out/summary.txt" <<'EOF'
import json, os, sys
out = sys.argv[1]
def rows(name):
    path = os.path.join(out, name)
    return json.load(open(path))["rows"] if os.path.exists(path) else []
torch = [row for row in rows("torch.json") if row["status"] == "ok"]
reference = torch[0]["images_per_second"] if torch else None
jax_rows = rows("jax.json")
baseline = next((row["images_per_second"] for row in jax_rows
                 if row.get("program") == "grouped/two_pass" and row["status"] == "ok"), None)
print(f"PyTorch autocast: {reference and round(reference, 1)} img/s")
print(f"{'program':28} {'img/s':>7} {'step ms':>8} {'MFU':>6} {'x default':>9} {'x torch':>8}  status")
for row in jax_rows:
    ips = row.get("images_per_second")
    mfu = row.get("mfu")
    print(f"{row.get('program') or '-':28} {ips or 0:7.1f} {row.get('step_time_ms') or 0:8.1f} "
          f"{100 * mfu if mfu else 0:5.1f}% {ips / baseline if ips and baseline else 0:9.2f} "
          f"{ips / reference if ips and reference else 0:8.2f}  {row['status']} {row.get('error') or ''}"[:160])
for name in sorted(os.listdir(out)):
    if name.startswith("profile_") and name.endswith(".json"):
        profile = json.load(open(os.path.join(out, name)))
        classes = ", ".join(f"{entry['class']} {entry['ms_per_step']:.1f} ms ({100 * entry['share']:.0f}%)"
                            for entry in profile.get("classes", []))
        slicing = profile["classes"][0].get("channel_slicing_ms_per_step") if profile.get("classes") else None
        print(f"{name}: {classes}; of the convolutions, channel slicing {slicing or 0:.1f} ms")
EOF
cat "$out/summary.txt" >&2
log "done; results in $out"
