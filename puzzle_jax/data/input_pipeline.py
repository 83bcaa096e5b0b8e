"""Host input pipelines: the grain train loader and its per-task transforms, the per-image eval iterator, steps
per epoch.

This module owns how records of a split (see `datasets.load_split`) become what a stage consumes:

* `create_train_loader`: a grain `DataLoader` that shuffles, shards across JAX processes, applies
  the training task's random transform and batches. Its iterator's state (`get_state`/`set_state`,
  checkpointable by Orbax) makes a resumed run see exactly the data order of an uninterrupted one. The global
  batches (the processes' batches side by side) are the same for any number of processes
  (`GlobalOrderSampler`), so a pod trains on the data a single host would.
* the transforms of the training tasks (grain random maps), all built on `transforms.train_crop`
  (spec §4: rescale, flip, crop, with uint8 crops normalised later on the device by
  `transforms.normalize_crops`): `ClassifierAugmentation` (image-level labels),
  `SegmentationAugmentation` (the label map cropped with the image, 255 outside it) and
  `AffinityAugmentation` (the same, then the label map reduced to the network's stride-4 grid).
* `iterate_eval`: single images, normalised but unpadded, sharded so that every example is seen by
  exactly one process.

Grain's worker processes die with the process that started them: a daemon thread in each worker (started with its
first batch, `_ExitWithParent`) ends it within a second of its parent's death. Without it, a `kill -9` of a
training stage left every worker (and multiprocessing's resource tracker, which exits once they are gone) running
with hundreds of MB each; grain 0.2's `DataLoader` offers no worker-init hook, so the watch rides on the last
operation, which changes no element and no random stream (it follows the transform and the batching).

The images stay uint8 up to the device: normalising on the host would make every batch four times
larger to stack, to hand from a worker process to the main one and to copy to the device, and cost
the workers a float pass over every pixel.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import grain.python as grain
import numpy as np

from puzzle_jax.data import transforms


class ClassifierAugmentation(grain.RandomMapTransform):
    """The classifier augmentation: record -> {image, image_box, labels}.

    The mask and id are dropped: the classifier sees only image-level labels (and masks of varied
    sizes could not be batched anyway).
    """

    def __init__(self, *, crop_size: int, rescale_range: tuple[int, int]):
        self.crop_size = int(crop_size)
        self.rescale_range = (int(rescale_range[0]), int(rescale_range[1]))

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        image, _, box = transforms.train_crop(
            element["image"], None, crop_size=self.crop_size, rescale_range=self.rescale_range, rng=rng
        )
        return {"image": image, "image_box": box, "labels": np.asarray(element["labels"], np.float32)}


class SegmentationAugmentation(ClassifierAugmentation):
    """Image and label map augmented together: record -> {image, image_box, mask, labels}.

    The mask is rescaled by nearest neighbour, flipped and cropped with the image, and is 255
    (ignored) wherever the crop holds no image pixel (spec §9: DeepLab's training data).
    """

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        if "mask" not in element:
            raise ValueError(
                f"Record {element.get('id')!r} has no label map; a segmentation or affinity task needs one "
                "(open the split with its masks, or join it with a label folder)."
            )
        image, mask, box = transforms.train_crop(
            element["image"], element["mask"], crop_size=self.crop_size, rescale_range=self.rescale_range, rng=rng
        )
        return {
            "image": image,
            "image_box": box,
            "mask": mask,
            "labels": np.asarray(element["labels"], np.float32),
        }


class AffinityAugmentation(SegmentationAugmentation):
    """`SegmentationAugmentation`, then the label map reduced to the edge network's grid by nearest
    neighbour (spec §8: a 512 crop's labels become 128 x 128 at stride 4)."""

    def __init__(self, *, crop_size: int, rescale_range: tuple[int, int], label_stride: int = 4):
        super().__init__(crop_size=crop_size, rescale_range=rescale_range)
        if crop_size % label_stride:
            raise ValueError(f"crop_size={crop_size} must be a multiple of the label stride {label_stride}.")
        self.label_stride = int(label_stride)

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        example = super().random_map(element, rng)
        example["mask"] = transforms.downscale_labels(example["mask"], self.label_stride)
        return example


# How often a worker checks that its parent is alive (seconds).
_PARENT_POLL_SECONDS = 0.5
# The process whose parent watch runs (a worker starts it once; a forked child starts its own).
_watching_pid: int | None = None


def exit_with_parent() -> None:
    """In a process started by `multiprocessing` (a grain worker), starts once a daemon thread that ends the process
    as soon as its parent is gone (it is then re-parented, so `os.getppid()` changes). Does nothing in a process that
    `multiprocessing` did not start (the main process), so the stage itself never exits because its shell did."""
    global _watching_pid
    if _watching_pid == os.getpid():
        return
    parent = multiprocessing.parent_process()
    if parent is None:
        return
    _watching_pid = os.getpid()
    parent_pid = parent.pid

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(_PARENT_POLL_SECONDS)
        os._exit(1)  # the parent was killed: nothing of this worker's is worth finishing

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


class _ExitWithParent(grain.MapTransform):
    """Passes batches through unchanged; in a worker process, starts `exit_with_parent`'s watch."""

    def map(self, element: Any) -> Any:
        exit_with_parent()
        return element


def _validate_process(process_index: int, process_count: int) -> None:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"Need 0 <= process_index < process_count; got process_index={process_index}, "
            f"process_count={process_count}."
        )


class GlobalOrderSampler:
    """Grain sampler whose global batches depend on neither the number of processes nor of loader workers.

    One stream of records, reshuffled every epoch, is cut into global batches of ``global_batch_size``; process
    ``p`` of ``P`` takes the ``p``-th slice of each (the rows that ``jax.make_array_from_process_local_data``
    places on its devices), so the global batch of every step, and each example's augmentation (seeded by its
    position in the stream), are those of a one-process run. Grain's own ``IndexSampler`` shards first and
    shuffles within each shard, and its workers batch strided elements, so its global batches change with both
    counts. With one process and no workers this sampler yields exactly ``IndexSampler``'s records and random
    streams (same shuffle, same per-position seeds).

    The inverse of grain's reading order: process ``p`` asks for sampler index ``i * P + p`` for its ``i``-th
    example; worker ``w = i % W`` reads it as its ``k = i // W``-th, puts it in row ``k % b`` of its batch
    ``k // b`` (``b = B / P``), and the loader emits the workers' batches round robin, so it becomes row ``k % b``
    of output batch ``j = (k // b) * W + w``: stream position ``j * B + p * b + k % b``. Within each ``W`` global
    batches this is a permutation, so a length that is a multiple of ``W * B`` keeps every index in range.
    """

    def __init__(
        self,
        num_records: int,
        *,
        seed: int,
        global_batch_size: int,
        process_count: int,
        worker_count: int,
        num_epochs: int | None,
    ):
        self._seed = int(seed)
        self._process_count = int(process_count)
        self._workers = max(1, int(worker_count))  # 0 workers reads in the main process, as one worker would
        self._global_batch_size = int(global_batch_size)
        self._per_process_batch = self._global_batch_size // self._process_count
        # Epoch e's order is a permutation of its own (grain's MapDataset.shuffle reshuffles past the first length).
        self._record_keys = grain.MapDataset.range(num_records).shuffle(seed=self._seed)
        positions = sys.maxsize if num_epochs is None else num_epochs * num_records
        block = self._workers * self._global_batch_size
        self._length = positions // block * block

    def __len__(self) -> int:
        return self._length

    def __repr__(self) -> str:
        # Grain compares a restored iterator state's repr of the sampler with the loader's.
        return (
            f"GlobalOrderSampler(num_records={len(self._record_keys)}, seed={self._seed}, "
            f"global_batch_size={self._global_batch_size}, process_count={self._process_count}, "
            f"workers={self._workers}, length={self._length})"
        )

    def __getitem__(self, index: int) -> grain.RecordMetadata:
        if not 0 <= index < self._length:
            raise IndexError(f"sampler index {index} outside [0, {self._length})")
        example, process = divmod(index, self._process_count)
        read, worker = divmod(example, self._workers)
        worker_batch, row = divmod(read, self._per_process_batch)
        output_batch = worker_batch * self._workers + worker
        position = output_batch * self._global_batch_size + process * self._per_process_batch + row
        return grain.RecordMetadata(
            index=index,
            record_key=self._record_keys[position],
            rng=np.random.Generator(np.random.Philox(key=self._seed + position)),
        )


def create_train_loader(
    source: Sequence[dict[str, Any]],
    *,
    transform: grain.RandomMapTransform,
    global_batch_size: int,
    seed: int,
    num_epochs: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    worker_count: int = 0,
    drop_remainder: bool = True,
) -> grain.DataLoader:
    """Creates the shuffled, augmented, batched and process-sharded training loader.

    Each process produces its slice of every global batch, global_batch_size // process_count examples
    (`GlobalOrderSampler`: the global batches are those of one process without workers). Randomness (shuffle
    order and augmentation) is a function of `seed` and the position in the stream only. With `num_epochs`, the
    stream ends at the last full global batch (of the last full group of `worker_count` batches).

    Args:
      source: random-access records with `image` uint8 (H, W, 3) and `labels` (C,) (and `mask`
        for the segmentation and affinity transforms).
      transform: the task's per-example random transform (`ClassifierAugmentation`, ...); every
        example it returns must have the same shapes.
      global_batch_size: examples per step over all processes; divisible by process_count.
      seed: shuffle and augmentation seed (non-negative, 32 bits).
      num_epochs: passes over the data; None repeats forever (reshuffled every epoch).
      process_index: this process (jax.process_index()).
      process_count: number of processes (jax.process_count()).
      worker_count: grain worker processes; 0 runs in this process (multi-process loading needs
        absl flags to be parsed first, as `main` does).
      drop_remainder: drop the last incomplete batch (with num_epochs=None there is none).

    Returns:
      A grain DataLoader; iterate it (`iter(loader)`) for batches of the transform's examples
      stacked to b = global_batch_size // process_count (with `ClassifierAugmentation`:
      {"image": uint8 (b, crop, crop, 3), "image_box": int32 (b, 4), "labels": float32 (b, C)}:
      unnormalised crops and the (top, left, height, width) of each image on its crop, which
      `transforms.normalize_crops` turns into the normalised float32 batch). The iterator has
      `get_state()` / `set_state()`.

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
    if len(source) < global_batch_size:
        raise ValueError(
            f"The split has {len(source)} records, fewer than one global batch of {global_batch_size} "
            f"(global_batch_size={global_batch_size}, process_count={process_count})."
        )
    shard_options = grain.ShardOptions(
        shard_index=process_index, shard_count=process_count, drop_remainder=True
    )
    sampler = GlobalOrderSampler(
        len(source),
        seed=seed,
        global_batch_size=global_batch_size,
        process_count=process_count,
        worker_count=worker_count,
        num_epochs=num_epochs,
    )
    operations = [
        transform,
        grain.Batch(batch_size=per_process_batch, drop_remainder=drop_remainder),
        _ExitWithParent(),
    ]
    return grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=operations,
        worker_count=worker_count,
        shard_options=shard_options,
    )


def batch_spec(
    source: Sequence[dict[str, Any]], transform: grain.RandomMapTransform, global_batch_size: int
) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """The global batch's ``name -> (shape, dtype)`` that `create_train_loader` would produce, from the transform
    of the split's first record (the transforms give every example the same shapes)."""
    example = transform.random_map(source[0], np.random.default_rng(0))
    return {
        name: ((global_batch_size, *np.shape(value)), np.asarray(value).dtype) for name, value in example.items()
    }


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
