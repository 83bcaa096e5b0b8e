"""Images/s of the label stages' CRF work against the number of worker processes.

Times ``label_folders.write_label_folder`` (the ``aff_labels`` / ``pseudo_labels`` loop: the parent hands each
worker a CAM file path and the image, the worker reads the file, adds the background channel, runs the dense CRF,
and the parent writes the PNG) on synthetic images with smooth blob CAMs of 1-3 classes, for demo-size (~100 px) and
VOC-size (375x500) images. The affinity labels run two 10-step CRFs per image, the pseudo labels one 1-step CRF.
Two figures per row: the whole call (with the start of the spawned workers) and the steady rate (images after the
first ``workers`` results, which carry the start); and the workers' CPU-seconds per image (start included), the
figure that carries over to a machine whose cores are free (images/s ~ cores / CPU s/img):

    python benchmarks/crf_workers.py [--workers 1,2] [--images 16]
"""

from __future__ import annotations

import argparse
import functools
import os
import resource
import sys
import tempfile
import time

import numpy as np

# The repository root, so that ``puzzle_jax`` imports when this file is run as a script.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from puzzle_jax import cam_files, labels, per_image  # noqa: E402
from puzzle_jax.refine import cam_labels, label_folders  # noqa: E402

SIZES = {"demo (104x96)": (104, 96), "VOC (375x500)": (375, 500)}
RULES = {
    "aff_labels (2 x 10 steps)": (
        "hr_cam",
        functools.partial(cam_labels.affinity_labels_from_file, fg_threshold=0.4, bg_threshold=0.1, iterations=10),
    ),
    "pseudo_labels (1 step)": (
        "rw",
        functools.partial(cam_labels.pseudo_labels_from_file, threshold=0.35, iterations=1),
    ),
}


def synthetic_records(
    directory: str, field: str, count: int, size: tuple[int, int], rng: np.random.Generator
) -> list[dict]:
    """``count`` images of ``size`` with blob score maps of 1-3 classes under ``field`` in ``directory``; their records
    (``id``, ``image``)."""
    height, width = size
    rows, cols = np.mgrid[:height, :width]
    records = []
    for index in range(count):
        classes = rng.choice(20, size=rng.integers(1, 4), replace=False) + 1
        maps = []
        for _ in classes:
            centre, spread = rng.uniform((0, 0), size), rng.uniform(0.1, 0.3) * min(size)
            maps.append(np.exp(-((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2) / (2 * spread**2)))
        maps = np.asarray(maps, np.float32)
        image_id = f"image_{index:04d}"
        cam_files.write_cam_file(
            cam_files.path_of(directory, image_id), keys=np.concatenate([[0], classes]), **{field: maps}
        )
        image = np.clip(maps.max(0), 0, 1)[..., None] * rng.integers(0, 256, 3) + rng.integers(
            0, 40, (height, width, 3)
        )
        records.append({"id": image_id, "image": np.clip(image, 0, 255).astype(np.uint8)})
    return records


def _worker_cpu_seconds() -> float:
    # Finished (joined) child processes only: the pool's workers once the call has shut it down.
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _time(records, score_dir, function, workers) -> tuple[float, float, float]:
    """(images/s over the whole call, images/s after the first `workers` results, worker CPU-seconds per image)."""
    arrivals = []
    cpu_before = _worker_cpu_seconds()
    with tempfile.TemporaryDirectory() as label_dir:
        started = time.perf_counter()
        per_image.write_per_image(
            records,
            output_path=lambda image_id: label_folders.label_path(label_dir, image_id),
            compute=per_image.compute_in_processes(
                function,
                prepare=lambda record: (cam_files.path_of(score_dir, record["id"]), record["image"]),
                workers=workers,
            ),
            write=lambda path, label_map: (
                labels.write_label_png(path, label_map),
                arrivals.append(time.perf_counter()),
            ),
            description="crf",
        )
        total = time.perf_counter() - started
    steady = (len(arrivals) - workers) / (arrivals[-1] - arrivals[workers - 1])
    return len(records) / total, steady, (_worker_cpu_seconds() - cpu_before) / len(records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--workers", default="1,2", help="worker counts to try, comma-separated")
    parser.add_argument("--images", type=int, default=16, help="VOC-size images per row (demo size: 4x as many)")
    options = parser.parse_args()
    worker_counts = [int(value) for value in options.workers.split(",")]
    print(f"CPU cores available: {len(os.sched_getaffinity(0))}")
    print(f"{'rule':<28}{'images':<16}{'workers':>8}{'images/s':>10}{'steady':>10}{'CPU s/img':>11}")
    rng = np.random.default_rng(0)
    for rule, (field, function) in RULES.items():
        for size_name, size in SIZES.items():
            count = options.images * (4 if size[0] < 200 else 1)
            with tempfile.TemporaryDirectory() as score_dir:
                records = synthetic_records(score_dir, field, count, size, rng)
                for workers in worker_counts:
                    overall, steady, cpu = _time(records, score_dir, function, workers)
                    print(
                        f"{rule:<28}{size_name:<16}{workers:>8}{overall:>10.2f}{steady:>10.2f}{cpu:>11.3f}", flush=True
                    )


if __name__ == "__main__":
    main()
