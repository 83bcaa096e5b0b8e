"""Images/s of the label stages' CRF on the two backends of ``config.refine.backend``, in the same run.

Times the loop of the ``aff_labels`` / ``pseudo_labels`` stages (``label_folders.write_label_folder``: the driver hands
each worker a score file's path and the image, the worker runs the rule with the CRF, the driver writes the PNG) on
the synthetic images of ``crf_workers.py`` (blob CAMs of 1-3 classes) with ``per_image.HostBackend``: ``local`` (a
pool of ``--workers`` spawned processes) and ``ray`` (a Ray instance started on this machine with ``--workers`` CPUs,
shut down at the end). Each call starts its workers (the pool) or its Ray instance and writes every PNG; the
columns: images/s over the whole call, the steady rate (images after the first ``workers`` results, which carry the
start), and the seconds to the first result (the start). The files of the two backends are compared byte for byte.

    python benchmarks/crf_backends.py [--workers 2] [--images 48]
"""

from __future__ import annotations

import argparse
import filecmp
import functools
import os
import sys
import tempfile
import time

import numpy as np

# The repository root, so that ``puzzle_jax`` and ``benchmarks`` import when this file is run as a script.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import crf_workers  # noqa: E402
from puzzle_jax import cam_files, labels, per_image  # noqa: E402
from puzzle_jax.refine import label_folders  # noqa: E402

# The image sizes and label rules of crf_workers.py, so the two tables compare.
SIZES = crf_workers.SIZES
RULES = crf_workers.RULES


def _time(records, score_dir, label_dir, function, backend) -> tuple[float, float, float]:
    """(images/s over the whole call, images/s after the first `workers` results, seconds to the first result)."""
    arrivals = []

    def write(path, label_map):
        labels.write_label_png(path, label_map)
        arrivals.append(time.perf_counter())

    started = time.perf_counter()
    per_image.write_per_image(
        records,
        output_path=functools.partial(label_folders.label_path, label_dir),
        compute=per_image.host_compute(
            function,
            prepare=lambda record: (cam_files.path_of(score_dir, record["id"]), record["image"]),
            backend=backend,
        ),
        write=write,
        description=f"crf on {backend.kind}",
    )
    total = time.perf_counter() - started
    workers = backend.workers
    steady = (len(arrivals) - workers) / (arrivals[-1] - arrivals[workers - 1])
    return len(records) / total, steady, arrivals[0] - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--workers", type=int, default=2, help="local: processes; ray: CPUs of the Ray instance")
    parser.add_argument("--images", type=int, default=48, help="demo-size images per row (VOC size: a quarter)")
    options = parser.parse_args()
    print(f"CPU cores available: {len(os.sched_getaffinity(0))}; load average {os.getloadavg()[0]:.2f} at the start")
    print(f"{'rule':<28}{'images':<16}{'count':>6}{'backend':>9}{'images/s':>10}{'steady':>10}{'start s':>9}  files")
    rng = np.random.default_rng(0)
    for rule, (field, function) in RULES.items():
        for size_name, size in SIZES.items():
            count = options.images if size[0] < 200 else max(options.images // 4, options.workers + 2)
            with tempfile.TemporaryDirectory() as folder:
                score_dir = os.path.join(folder, "scores")
                records = crf_workers.synthetic_records(score_dir, field, count, size, rng)
                label_dirs = {}
                for kind in ("local", "ray"):
                    label_dirs[kind] = os.path.join(folder, kind)
                    backend = per_image.HostBackend(kind=kind, workers=options.workers)
                    overall, steady, start = _time(records, score_dir, label_dirs[kind], function, backend)
                    same = "" if kind == "local" else _same_files(label_dirs["local"], label_dirs[kind])
                    print(
                        f"{rule:<28}{size_name:<16}{count:>6}{kind:>9}{overall:>10.2f}{steady:>10.2f}{start:>9.1f}  "
                        f"{same}",
                        flush=True,
                    )
    print(f"load average {os.getloadavg()[0]:.2f} at the end")


def _same_files(first: str, second: str) -> str:
    names = sorted(os.listdir(first))
    match, mismatch, errors = filecmp.cmpfiles(first, second, names, shallow=False)
    return "identical to local" if len(match) == len(names) == len(os.listdir(second)) else f"DIFFER: {mismatch}"


if __name__ == "__main__":
    main()
