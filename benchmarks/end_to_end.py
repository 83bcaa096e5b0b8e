"""End-to-end training throughput: the real ``train_cam`` stage (grain loader, host-to-device copies, the step,
metrics and checkpoints), in images/s, for several input worker counts.

Where ``python -m benchmarks.bench`` times the step alone on data resident on the device, this runs
``python -m puzzle_jax.main`` on the built-in demo set (generated on first use) at the paper's crop and rescale
range, so the input pipeline is on the path; comparing worker counts shows whether the host feeds the device. Each
run starts from random weights in its own temporary workdir; the rate is the median of the ``images_per_second``
that ``train_cam/metrics.jsonl`` records after the first ``--skip-steps`` steps (compilation, pipeline start):

    python benchmarks/end_to_end.py --arch resnest101 --dtype bfloat16 --batch 32 --workers 8,0   # a GPU
    python benchmarks/end_to_end.py --arch resnet_tiny --crop 64 --batch 4 --steps 12 --workers 0  # a CPU check
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

_REPOSITORY_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_rate(metrics_path: str, skip_steps: int) -> tuple[float, int]:
    """Median ``images_per_second`` of the records after ``skip_steps``, and how many records that is."""
    rates = []
    with open(metrics_path) as file:
        for line in file:
            record = json.loads(line)
            if record.get("step", 0) > skip_steps and "images_per_second" in record:
                rates.append(float(record["images_per_second"]))
    if not rates:
        raise ValueError(f"{metrics_path}: no images_per_second record after step {skip_steps}")
    return statistics.median(rates), len(rates)


_CONFIG_TEMPLATE = """# Written by benchmarks/end_to_end.py: the demo config at the benchmark's settings.
import ml_collections

from configs import demo


def get_config():
    config = demo.get_config()
    config.stages = ("train_cam",)
    config.train_cam.init_from = ""
    config.model.arch = {arch!r}
    config.model.dtype = {dtype!r}
    config.train_cam.crop_size = {crop}
    config.train_cam.rescale_range = ({rescale_min}, {rescale_max})
    config.data.worker_count = {workers}
    config.data.data_dir = {data_dir!r}
    config.data.builder_kwargs = ml_collections.ConfigDict(
        dict(num_pretrain={pretrain_images}, num_train={train_images}, num_val={pretrain_images})
    )
    config.train_cam.batch_size = {batch}
    config.train_cam.epochs = {epochs}
    config.train_cam.log_every_steps = {log_every}
    config.train_cam.checkpoint_every_steps = {checkpoint_every}
    return config
"""


def run_once(args: argparse.Namespace, workers: int, data_dir: str) -> dict:
    """One ``train_cam`` run with ``workers`` grain workers; returns its measurements."""
    steps_per_epoch = args.train_images // args.batch
    epochs = -(-args.steps // steps_per_epoch)
    with tempfile.TemporaryDirectory(prefix="end_to_end_") as workdir:
        config_path = os.path.join(workdir, "end_to_end_config.py")
        with open(config_path, "w") as file:
            file.write(_CONFIG_TEMPLATE.format(
                arch=args.arch, dtype=args.dtype, crop=args.crop, rescale_min=args.rescale_min,
                rescale_max=args.rescale_max, workers=workers, data_dir=data_dir,
                pretrain_images=args.pretrain_images, train_images=args.train_images, batch=args.batch,
                epochs=epochs, log_every=args.log_every, checkpoint_every=args.checkpoint_every,
            ))
        run_dir = os.path.join(workdir, "run")
        command = [sys.executable, "-m", "puzzle_jax.main", f"--config={config_path}", f"--workdir={run_dir}"]
        started = time.perf_counter()
        completed = subprocess.run(command, cwd=_REPOSITORY_ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - started
        if completed.returncode != 0:
            raise RuntimeError(f"train_cam with {workers} workers failed:\n{completed.stderr[-3000:]}")
        rate, records = read_rate(os.path.join(run_dir, "train_cam", "metrics.jsonl"), args.skip_steps)
    return {
        "workers": workers,
        "images_per_second": rate,
        "records": records,
        "steps": epochs * steps_per_epoch,
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--arch", default="resnest101")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--batch", type=int, default=32, help="global batch size")
    parser.add_argument("--crop", type=int, default=512)
    parser.add_argument("--rescale-min", type=int, default=320)
    parser.add_argument("--rescale-max", type=int, default=640)
    parser.add_argument("--workers", default="8,0", help="comma-separated grain worker counts, one run each")
    parser.add_argument("--steps", type=int, default=60, help="at least this many steps per run (whole epochs)")
    parser.add_argument("--skip-steps", type=int, default=10, help="records of the first steps are not counted")
    parser.add_argument("--log-every", type=int, default=5, help="steps per metrics window")
    parser.add_argument("--checkpoint-every", type=int, default=1000, help="steps between checkpoints")
    parser.add_argument("--train-images", type=int, default=320, help="images of the generated training split")
    parser.add_argument("--pretrain-images", type=int, default=4, help="images of the (unused) other splits")
    parser.add_argument("--data-dir", default="", help="where the demo set is generated (default: a temporary one)")
    parser.add_argument("--json", default="", help="also write the measurements here")
    args = parser.parse_args()
    if args.train_images < args.batch:
        parser.error("--train-images must be at least --batch")

    header = (
        f"train_cam end to end: {args.arch} {args.dtype}, batch {args.batch}, crop {args.crop}, "
        f"rescale {args.rescale_min}-{args.rescale_max}\n"
        f"| grain workers | images/s (median after step {args.skip_steps}) | records | steps | wall s |\n"
        "|---|---|---|---|---|"
    )
    print(header, flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="end_to_end_data_") as scratch:
        data_dir = args.data_dir or scratch
        for workers in args.workers.split(","):
            # Each row as soon as it is measured: on a time-limited machine a later run may be cut.
            result = run_once(args, int(workers), data_dir)
            results.append(result)
            print(f"| {result['workers']} | {result['images_per_second']:.1f} | {result['records']} "
                  f"| {result['steps']} | {result['wall_s']:.0f} |", flush=True)
            if args.json:
                with open(args.json + ".tmp", "w") as file:
                    json.dump({"arguments": vars(args), "results": results}, file, indent=2)
                os.replace(args.json + ".tmp", args.json)


if __name__ == "__main__":
    main()
