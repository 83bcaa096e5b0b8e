"""Host input pipeline throughput on a VOC-like folder: what one grain worker delivers, in images/s.

Writes a VOC-layout folder of JPEG images (375-500 px sides, with a palette PNG mask each, as VOC's train_aug has
SBD masks), prepares it with the ``voc_folder`` builder, and times ``input_pipeline.create_train_loader`` in the
main process (``worker_count=0``: one worker's work, read + decode + augment + batch) for the paper's 512x512 crop.
Reports wall-clock and CPU-time rates; CPU time is what a worker process costs a host core and is steadier than
wall time on a shared machine. ``--repo`` picks the source tree, so two versions can be compared on the same
prepared folder (``--data``):

    python benchmarks/input_pipeline.py --data /tmp/pipeline_data            # this tree
    python benchmarks/input_pipeline.py --data /tmp/pipeline_data --repo ../old_checkout
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

_REPOSITORY_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_folder(root: str, count: int, seed: int) -> None:
    """A VOC-layout folder: JPEGImages/*.jpg, SegmentationClass/*.png, labels.csv, classes.txt, one split."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for folder in ("JPEGImages", "SegmentationClass", os.path.join("ImageSets", "Segmentation")):
        os.makedirs(os.path.join(root, folder), exist_ok=True)
    classes = [f"class{index}" for index in range(20)]
    rows, ids = ["image_id,labels"], []
    palette = (np.arange(256 * 3) * 37 % 256).astype(np.uint8).tolist()
    for index in range(count):
        example_id = f"img_{index:04d}"
        height, width = (375, 500) if index % 2 else (500, int(rng.integers(375, 501)))
        # Smooth colour fields with mild noise: photo-like JPEG sizes (tens of KiB), unlike pure noise.
        coarse = rng.integers(0, 256, (height // 50 + 2, width // 50 + 2, 3), dtype=np.uint8)
        image = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC))
        image = np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(os.path.join(root, "JPEGImages", f"{example_id}.jpg"), quality=90)
        present = sorted(rng.choice(20, size=1 + index % 2, replace=False).tolist())
        mask = np.zeros((height, width), np.uint8)
        mask[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = present[0] + 1
        mask_image = Image.fromarray(mask, mode="P")
        mask_image.putpalette(palette)
        mask_image.save(os.path.join(root, "SegmentationClass", f"{example_id}.png"))
        rows.append(f"{example_id},{';'.join(classes[i] for i in present)}")
        ids.append(example_id)
    with open(os.path.join(root, "classes.txt"), "w") as file:
        file.write("\n".join(classes) + "\n")
    with open(os.path.join(root, "labels.csv"), "w") as file:
        file.write("\n".join(rows) + "\n")
    with open(os.path.join(root, "ImageSets", "Segmentation", "train.txt"), "w") as file:
        file.write("\n".join(ids) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--data", required=True, help="folder for the VOC-like images and their prepared copy")
    parser.add_argument("--repo", default=_REPOSITORY_ROOT, help="source tree whose puzzle_jax is timed")
    parser.add_argument("--images", type=int, default=96, help="images in the folder")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--crop", type=int, default=512)
    parser.add_argument("--batches", type=int, default=40, help="timed batches")
    parser.add_argument(
        "--warmup", type=int, default=40,
        help="untimed batches first: grain's reader threads decode up to 500 records ahead, so the CPU time of a "
        "short window counts records read for later batches",
    )
    parser.add_argument("--json", default="", help="also write the measurement here")
    args = parser.parse_args()

    sys.path.insert(0, os.path.abspath(args.repo))
    import inspect

    from puzzle_jax.data import datasets, input_pipeline

    # Open the split as classifier training does (trees older than decode_masks decode the masks).
    options = {"decode_masks": False} if "decode_masks" in inspect.signature(datasets.load_split).parameters else {}

    root = os.path.join(args.data, "voc_like")
    if not os.path.exists(os.path.join(root, "labels.csv")):
        write_folder(root, args.images, seed=0)
    source, _ = datasets.load_split(
        "voc_folder", "train", data_dir=os.path.join(args.data, "tfds"), root=root, **options
    )
    transform = input_pipeline.ClassifierAugmentation(crop_size=args.crop, rescale_range=(320, 640))
    loader = input_pipeline.create_train_loader(source, transform=transform, global_batch_size=args.batch, seed=0)
    iterator = iter(loader)
    first = next(iterator)
    for _ in range(args.warmup - 1):
        next(iterator)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(args.batches):
        next(iterator)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    images = args.batch * args.batches
    batch_bytes = sum(value.nbytes for value in first.values())
    result = {
        "repo": os.path.abspath(args.repo),
        "images": images,
        "images_per_second": images / wall,
        "images_per_cpu_second": images / cpu,
        "batch_megabytes": batch_bytes / 2**20,
        "image_dtype": str(first["image"].dtype),
    }
    print(
        f"{result['images_per_second']:.1f} images/s wall, {result['images_per_cpu_second']:.1f} images per "
        f"CPU-second, {result['batch_megabytes']:.1f} MiB per batch of {args.batch} ({result['image_dtype']} "
        f"images), {os.path.abspath(args.repo)}"
    )
    if args.json:
        with open(args.json, "w") as file:
            json.dump(result, file, indent=2)


if __name__ == "__main__":
    main()
