"""What the persistent compilation cache (``config.compilation_cache_dir``) saves: cold vs warm compile.

Builds our Puzzle-CAM training step (``benchmarks.bench.build_jax_train_step``) in two fresh processes that share
one empty cache folder, and prints, for each, the time from ``lower`` to a compiled executable. The first process
compiles and stores the program; the second finds it in the cache and only deserialises it. Runs on whatever
backend JAX picks (CPU here, the GPU on the device machine):

    python benchmarks/compile_cache.py                                    # resnet_tiny 128x128 b16: the demo step
    python benchmarks/compile_cache.py --arch resnest101 --size 512 --batch 16  # the paper's step (GPU)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

_REPOSITORY_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _compile_once(arch: str, size: int, batch: int, dtype: str, cache_dir: str) -> dict:
    """In this process: enables the cache, builds the step and times its compilation."""
    sys.path.insert(0, _REPOSITORY_ROOT)
    import jax

    from benchmarks import bench
    from puzzle_jax import main

    main.enable_compilation_cache(cache_dir)
    train_step, state, batch_arrays, _ = bench.build_jax_train_step(
        arch, batch_per_device=batch, height=size, width=size, dtype=dtype
    )
    started = time.perf_counter()
    lowered = train_step.lower(state, batch_arrays)
    lowered_at = time.perf_counter()
    lowered.compile()
    compiled_at = time.perf_counter()
    return {
        "backend": jax.default_backend(),
        "lower_s": lowered_at - started,
        "compile_s": compiled_at - lowered_at,
        "cache_files": len(os.listdir(cache_dir)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--arch", default="resnet_tiny")
    parser.add_argument("--size", type=int, default=128, help="square crop side")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--json", default="", help="also write the two measurements here")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)  # the cache folder, in a child process
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_compile_once(args.arch, args.size, args.batch, args.dtype, args.child)))
        return

    with tempfile.TemporaryDirectory() as cache_dir:
        runs = []
        for _ in ("cold", "warm"):
            output = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--arch", args.arch, "--size", str(args.size),
                 "--batch", str(args.batch), "--dtype", args.dtype, "--child", cache_dir],
                check=True, capture_output=True, text=True, cwd=_REPOSITORY_ROOT,
            ).stdout
            runs.append(json.loads(output.strip().splitlines()[-1]))
    cold, warm = runs
    print(f"{args.arch} {args.size}x{args.size} batch {args.batch} {args.dtype} on {cold['backend']}")
    print("| process | lower s | compile s |\n|---|---|---|")
    print(f"| cold (empty cache) | {cold['lower_s']:.2f} | {cold['compile_s']:.2f} |")
    print(f"| warm (cache hit) | {warm['lower_s']:.2f} | {warm['compile_s']:.2f} |")
    print(f"compile time saved: {cold['compile_s'] - warm['compile_s']:.2f} s "
          f"({cold['compile_s'] / max(warm['compile_s'], 1e-9):.0f}x)")
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"arch": args.arch, "size": args.size, "batch": args.batch, "dtype": args.dtype,
                       "cold": cold, "warm": warm}, file, indent=2)


if __name__ == "__main__":
    main()
