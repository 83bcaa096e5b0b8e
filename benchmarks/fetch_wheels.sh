#!/usr/bin/env bash
# Downloads the wheels that benchmarks/run_gpu.sh carries to the GPU machine (Python 3.12, x86-64, no internet).
#
# The GPU machine has jax (+ CUDA plugin), flax, optax, orbax-checkpoint, torch, numpy, pillow and opencv, but not:
#   resnest          the authors' backbones for the PyTorch reference (pure Python)
#   ml_collections   configs/ (benchmarks/bench.py takes its Puzzle-CAM setting from configs/default.py) and
#                    puzzle_jax.driver (pure Python; absl-py and PyYAML are on the machine)
#   grain, array-record, portpicker   the host input-pipeline rows and puzzle_jax.tasks, whose objectives the JAX
#                    train rows use
#   tensorflow-datasets and the needs the image lacks (tensorflow-metadata, googleapis-common-protos, dm-tree,
#   immutabledict, promise, toml, termcolor, simple-parsing, docstring-parser), tensorboardX
#                    the real stages (`python -m puzzle_jax.main`, benchmarks/end_to_end.py); promise is a source
#                    distribution only, so it is built into a (pure Python) wheel here
# .whl/fallback/ holds the versions our code is tested with (flax, optax, orbax-checkpoint); run_gpu.sh uses them
# only when its preflight step fails with the machine's own versions.
#
# Usage, once, in the repository root of the development machine:
#   bash benchmarks/fetch_wheels.sh            # writes .whl/ and adds /.whl/ to .git/info/exclude
#   bash benchmarks/fetch_wheels.sh DIRECTORY  # writes DIRECTORY instead (no git change)
set -euo pipefail
cd "$(dirname "$0")/.."
destination=${1:-.whl}
if [ "$destination" = ".whl" ] && [ -d .git ]; then
  # Ignored, so the wheels travel only where a run names .whl in carry, and are never committed.
  grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
fi
platform=(--only-binary=:all: --python-version 3.12 --implementation cp
          --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps "${platform[@]}" -d "$destination" \
  resnest==0.0.5 ml_collections==1.1.0 grain==0.2.18 array-record==0.8.6 portpicker==1.6.0
python3 -m pip download -q --no-deps "${platform[@]}" -d "$destination" \
  tensorflow-datasets==4.9.10 tensorflow-metadata==1.21.0 googleapis-common-protos==1.76.0 dm-tree==0.1.10 \
  immutabledict==4.3.1 toml==0.10.2 termcolor==3.3.0 simple-parsing==0.1.9 docstring-parser==0.18.0 \
  tensorboardX==2.6.5
python3 -m pip wheel -q --no-deps -w "$destination" promise==2.3
python3 -m pip download -q --no-deps "${platform[@]}" -d "$destination/fallback" \
  flax==0.12.8 optax==0.2.8 orbax-checkpoint==0.12.8
ls -l "$destination" "$destination/fallback"
