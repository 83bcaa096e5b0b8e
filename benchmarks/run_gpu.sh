#!/usr/bin/env bash
# The full benchmark table (issue 6) on one GPU, in under 8 minutes including compilation.
#
# Preparation, once, on the development machine, in the repository root (pip reaches the registry there only):
#   bash benchmarks/fetch_wheels.sh
# which runs, in effect:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl resnest==0.0.5 ml_collections==1.1.0 grain==0.2.18 array-record==0.8.6 portpicker==1.6.0
#   (same flags) -d .whl/fallback flax==0.12.8 optax==0.2.8 orbax-checkpoint==0.12.8
#
# On the GPU machine (the device tool), carrying the wheels:
#   run(command="bash benchmarks/run_gpu.sh $OUT/bench.json 2>&1 | tee $OUT/bench.log", carry=[".whl"],
#       timeout_s=560)
# Any further arguments go to `python -m benchmarks.bench` (e.g. --archs=resnest101 --dtypes=bfloat16).
#
# What it does: installs the carried wheels into /tmp (never into the machine's site-packages), checks with a
# tiny JAX step that our code runs on the machine's jax/flax (falling back to the carried, tested flax/optax/orbax
# versions if not), records the GPU, then runs `python -m benchmarks.bench --suite gpu` with a time budget
# counted from this script's start: no row starts after 450 s, and a phase still running at 505 s is killed, so
# the table (printed last) and the JSON are out before 9 minutes.
set -u -o pipefail
started_at=$(date +%s.%N)
json_path=${1:-bench.json}
[ $# -gt 0 ] && shift
cd "$(dirname "$0")/.."
repository=$PWD
python=${PYTHON:-python3}
wheels=${WHEELS_DIR:-.whl}

export PYTHONUNBUFFERED=1
# JAX and PyTorch run in separate, consecutive processes (see benchmarks/bench.py), so JAX may take most of the GPU.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-1}

install_wheels() {  # install_wheels DIRECTORY TARGET: all at once, else one by one so one bad wheel costs only itself
  local directory=$1 target=$2
  ls "$directory"/*.whl >/dev/null 2>&1 || return 0
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$target" \
    "$directory"/*.whl 2>/dev/null && return 0
  for wheel in "$directory"/*.whl; do
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$target" \
      "$wheel" || echo "run_gpu.sh: WARNING could not install $wheel" >&2
  done
}

install_wheels "$wheels" /tmp/puzzle_bench_site
export PYTHONPATH=$repository:/tmp/puzzle_bench_site${PYTHONPATH:+:$PYTHONPATH}

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm \
  --format=csv >&2
"$python" - >&2 <<'EOF'
import importlib
for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "torch", "numpy", "ml_collections", "resnest",
             "grain"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')} {getattr(module, '__file__', '')}")
    except Exception as error:
        print(f"{name}: not importable ({type(error).__name__}: {error})")
EOF

# A hung CUDA initialisation must not eat the budget: the preflight gets at most 150 s.
if ! timeout 150 "$python" -m benchmarks.bench --preflight >&2; then
  if ls "$wheels"/fallback/*.whl >/dev/null 2>&1; then
    echo "run_gpu.sh: preflight failed with the machine's packages; retrying with $wheels/fallback" >&2
    install_wheels "$wheels/fallback" /tmp/puzzle_bench_fallback
    export PYTHONPATH=$repository:/tmp/puzzle_bench_fallback:/tmp/puzzle_bench_site${PYTHONPATH#*/tmp/puzzle_bench_site}
    timeout 150 "$python" -m benchmarks.bench --preflight >&2 \
      || echo "run_gpu.sh: WARNING preflight still fails: the JAX rows will report errors" >&2
  else
    echo "run_gpu.sh: WARNING preflight failed and no fallback wheels were carried" >&2
  fi
fi

require_accelerator=()
[ "${BENCH_REQUIRE_ACCELERATOR:-1}" = 1 ] && require_accelerator=(--require-accelerator)
exec "$python" -m benchmarks.bench --suite gpu --json "$json_path" --started-at "$started_at" \
  --time-budget-s "${BENCH_TIME_BUDGET_S:-450}" --hard-limit-s "${BENCH_HARD_LIMIT_S:-505}" \
  ${require_accelerator[@]+"${require_accelerator[@]}"} "$@"
