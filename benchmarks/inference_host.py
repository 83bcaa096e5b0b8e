"""The host side of multi-scale + flip CAM inference, alone: what a GPU waits for between forward calls.

On the H100 the CAM inference rows ran at ~6.5 images/s in both frameworks, host-bound (BENCHMARKS.md). This
times ``cam_inference.iterate_cams`` on VOC-sized images (500x375, 20 classes, 1-3 present, scales 0.5/1/1.5/2 +
flip, pad to 64, output stride 16) with a stand-in forward that returns zero maps of the right shape at once, so
every second measured is host work: resizing, padding, batching and accumulating the maps at both
resolutions (the normalisation runs on the device since the inputs travel as uint8). It also times each piece of
that work for one image:

    python benchmarks/inference_host.py [--images 24]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

# The repository root, so that ``puzzle_jax`` imports when this file is run as a script.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from puzzle_jax import batched_inference, cam_inference, puzzle  # noqa: E402

NUM_CLASSES = 20
OUTPUT_STRIDE = 16
SCALES = (0.5, 1.0, 1.5, 2.0)
PAD_MULTIPLE = 64


def _zero_forward(images: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Stands in for the network (and the device's normalisation): class maps of the right shape, in no time."""
    batch, height, width, _ = images.shape
    return np.zeros((batch, height // OUTPUT_STRIDE, width // OUTPUT_STRIDE, NUM_CLASSES), np.float32)


def _records(count: int, rng: np.random.Generator):
    for index in range(count):
        image = rng.integers(0, 256, size=(375, 500, 3), dtype=np.uint8)
        labels = np.zeros(NUM_CLASSES, np.float32)
        labels[rng.choice(NUM_CLASSES, size=rng.integers(1, 4), replace=False)] = 1.0
        yield f"image_{index:04d}", image, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--images-per-call", type=int, default=8)
    parser.add_argument("--host-threads", type=int, default=0, help="0: batched_inference.default_host_threads()")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    records = list(_records(args.images, rng))
    started = time.perf_counter()
    produced = sum(
        1
        for _ in cam_inference.iterate_cams(
            _zero_forward, records, scales=SCALES, flip=True, pad_multiple=PAD_MULTIPLE,
            output_stride=OUTPUT_STRIDE, images_per_call=args.images_per_call, host_threads=args.host_threads,
        )
    )
    elapsed = time.perf_counter() - started
    threads = args.host_threads or batched_inference.default_host_threads()
    per_image_ms = 1000 * elapsed / produced
    print(
        f"iterate_cams, host work only, {threads} host thread(s): {produced} images in {elapsed:.2f} s = "
        f"{per_image_ms:.1f} ms/image ({produced / elapsed:.1f} images/s)"
    )

    # The pieces, for one image (median of 5).
    _, image, labels = records[0]

    def timed(function) -> float:
        times = []
        for _ in range(5):
            start = time.perf_counter()
            function()
            times.append(time.perf_counter() - start)
        return 1000 * float(np.median(times))

    prepare = timed(lambda: [batched_inference.scaled_input(image, scale) for scale in SCALES])

    def accumulate():
        accumulator = cam_inference.CamAccumulator(image, labels, flip=True, output_stride=OUTPUT_STRIDE)
        for scale in SCALES:
            height, width = round(image.shape[0] * scale), round(image.shape[1] * scale)
            padded = puzzle.padded_size(height, width, PAD_MULTIPLE)
            maps = _zero_forward(np.zeros((2, *padded, 3), np.uint8), np.zeros((2, 4), np.int32))
            accumulator.add(maps, (height, width))
        return accumulator.result()

    accumulate_ms = timed(accumulate)
    print("| piece, one image, 4 scales + flip | ms |\n|---|---|")
    print(f"| resize the inputs | {prepare:.1f} |")
    print(f"| accumulate the maps at both resolutions + normalise | {accumulate_ms:.1f} |")


if __name__ == "__main__":
    main()
