"""Host input pipelines: the grain train loader, the per-image eval iterator, steps per epoch.

This module owns how records of a split (see `datasets.load_split`) become what a stage consumes:

* `create_train_loader`: a grain `DataLoader` that shuffles, shards across JAX processes, augments
  (spec §4, `transforms.train_crop`: uint8 crops, normalised later on the device by
  `transforms.normalize_crops`) and batches. Its iterator's state
  (`get_state`/`set_state`, checkpointable by Orbax) makes a resumed run see exactly the data order
  of an uninterrupted one.
* `iterate_eval`: single images, normalised but unpadded, sharded so that every example is seen by
  exactly one process.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import grain.python as grain
import numpy as np

from puzzle_jax.data import transforms


class TrainAugmentation(grain.RandomMapTransform):
    """The classifier augmentation as a grain random map: record -> {image, image_box, labels}.

    The image stays uint8 (see `transforms.train_crop`): normalising on the host would make every
    batch four times larger to stack, to hand from a worker process to the main one and to copy
    to the device, and cost the workers a float pass over every pixel. The mask and id are
    dropped: the classifier sees only image-level labels, and masks of varied sizes could not be
    batched anyway.
    """

    def __init__(self, *, crop_size: int, rescale_range: tuple[int, int]):
        self.crop_size = crop_size
        self.rescale_range = (int(rescale_range[0]), int(rescale_range[1]))

    def random_map(
        self, element: dict[str, Any], rng: np.random.Generator
    ) -> dict[str, np.ndarray]:
        image, _, box = transforms.train_crop(
            element["image"],
            None,
            crop_size=self.crop_size,
            rescale_range=self.rescale_range,
            rng=rng,
        )
        return {
            "image": image,
            "image_box": box,
            "labels": np.asarray(element["labels"], np.float32),
        }


def _validate_process(process_index: int, process_count: int) -> None:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"Need 0 <= process_index < process_count; got process_index={process_index}, "
            f"process_count={process_count}."
        )


def create_train_loader(
    source: Sequence[dict[str, Any]],
    *,
    global_batch_size: int,
    crop_size: int,
    rescale_range: tuple[int, int],
    seed: int,
    num_epochs: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    worker_count: int = 0,
    drop_remainder: bool = True,
) -> grain.DataLoader:
    """Creates the shuffled, augmented, batched and process-sharded training loader.

    Each process reads its own contiguous shard of the split (shards are equal: the remainder of
    len(source) / process_count is dropped so that all processes run the same number of steps) and
    produces batches of global_batch_size // process_count images. Randomness (shuffle order and
    augmentation) is a function of `seed` and the position in the stream only.

    Args:
      source: random-access records with `image` uint8 (H, W, 3) and `labels` (C,).
      global_batch_size: images per step over all processes; divisible by process_count.
      crop_size: side of the square training crop.
      rescale_range: inclusive (min, max) of the random long side (spec §4).
      seed: shuffle and augmentation seed (non-negative, 32 bits).
      num_epochs: passes over the data; None repeats forever (reshuffled every epoch).
      process_index: this process (jax.process_index()).
      process_count: number of processes (jax.process_count()).
      worker_count: grain worker processes; 0 runs in this process (multi-process loading needs
        absl flags to be parsed first, as `main` does).
      drop_remainder: drop the last incomplete batch (with num_epochs=None there is none).

    Returns:
      A grain DataLoader; iterate it (`iter(loader)`) for batches {"image": uint8 (b, crop, crop,
      3), "image_box": int32 (b, 4), "labels": float32 (b, C)} with b = global_batch_size //
      process_count: unnormalised crops and the (top, left, height, width) of each image on its
      crop (`transforms.normalize_crops` turns both into the normalised float32 batch). The
      iterator has `get_state()` / `set_state()`.

    Raises:
      ValueError: for a batch size that is not a positive multiple of process_count, bad process
        indices, or a source too small for one batch per process.
    """
    _validate_process(process_index, process_count)
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} must be a positive multiple of "
            f"process_count={process_count}."
        )
    per_process_batch = global_batch_size // process_count
    records_per_process = len(source) // process_count
    if records_per_process < per_process_batch:
        raise ValueError(
            f"The split has {len(source)} records: {records_per_process} per process, fewer than "
            f"one batch of {per_process_batch} (global_batch_size={global_batch_size}, "
            f"process_count={process_count})."
        )
    shard_options = grain.ShardOptions(
        shard_index=process_index, shard_count=process_count, drop_remainder=True
    )
    sampler = grain.IndexSampler(
        num_records=len(source),
        shard_options=shard_options,
        shuffle=True,
        num_epochs=num_epochs,
        seed=seed,
    )
    operations = [
        TrainAugmentation(crop_size=crop_size, rescale_range=rescale_range),
        grain.Batch(batch_size=per_process_batch, drop_remainder=drop_remainder),
    ]
    return grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=operations,
        worker_count=worker_count,
        shard_options=shard_options,
    )


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
    """Full batches per epoch, floor(num_examples / global_batch_size) (the authors' drop_last).

    Raises:
      ValueError: when not even one full batch fits.
    """
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size must be positive; got {global_batch_size}.")
    steps = num_examples // global_batch_size
    if steps < 1:
        raise ValueError(
            f"num_examples={num_examples} is smaller than global_batch_size={global_batch_size}: "
            "an epoch would have no step."
        )
    return steps


def iterate_eval(
    source: Sequence[dict[str, Any]], *, process_index: int = 0, process_count: int = 1
) -> Iterator[dict[str, Any]]:
    """Yields this process's share of the split, one image at a time, in record order.

    Process p gets records p, p + process_count, ... so every record is seen by exactly one process
    (counts differ by at most one between processes).

    Args:
      source: random-access records (`image`, `mask`, `id`, `labels`).
      process_index: this process.
      process_count: number of processes.

    Yields:
      {"image": float32 (H, W, 3) normalised, "mask": uint8 (H, W), "id": str,
       "labels": float32 (C,), "original_size": (H, W), "index": record index}.
    """
    _validate_process(process_index, process_count)
    for index in range(process_index, len(source), process_count):
        record = source[index]
        image, mask = transforms.eval_transform(record["image"], record["mask"])
        yield {
            "image": image,
            "mask": mask,
            "id": record["id"],
            "labels": np.asarray(record["labels"], np.float32),
            "original_size": tuple(int(side) for side in record["image"].shape[:2]),
            "index": index,
        }
