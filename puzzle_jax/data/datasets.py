"""The dataset registry: dataset names (`config.data.dataset`) -> tfds builders, and `load_split`.

This module owns how a named dataset becomes a random-access source of decoded numpy records: it
prepares the tfds builder to `array_record` on first use (no TensorFlow needed), opens the split
with `tfds.data_source`-style random access, and converts each record to the layout every stage
uses (`records.decode_record`: `image` uint8 (H, W, 3) RGB, `mask` uint8 (H, W) unless the split is
opened with `decode_masks=False`, `id` str, `labels` float32 (C,), and `parts` uint8 (H, W) with the
mask where the dataset declares it; see `records`).

To add a dataset, write a builder module that exposes `create_builder(*, data_dir, **kwargs)`
returning a tfds builder with a `class_names` property and the features `records.record_features`,
and add it to `DATASET_BUILDERS`.

`LabelFolderRecords` joins a split's images with a folder of label PNGs that an earlier stage
wrote (pseudo labels, affinity labels), by image id: the label maps the segmentation and affinity
tasks train on.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from puzzle_jax import labels, sharding
from puzzle_jax.data import coco, demo, voc, voc_folder
from puzzle_jax.data.records import decode_id, decode_record

# Name (the value of config.data.dataset) -> builder factory taking data_dir and builder options.
# The builders of downloaded data take the data's folder as the option `root`.
DATASET_BUILDERS: dict[str, Callable[..., tfds.core.DatasetBuilder]] = {
    "puzzle_demo": demo.create_builder,
    "voc2012_aug": voc.create_builder,
    "coco2014": coco.create_builder,
    "voc_folder": voc_folder.create_builder,
}


@dataclasses.dataclass(frozen=True)
class SplitInfo:
    """What a stage needs to know about a loaded split.

    Attributes:
      name: dataset name (a key of DATASET_BUILDERS).
      split: split name.
      num_examples: number of records in the split.
      num_classes: number of foreground classes C (labels have shape (C,), mask values 1..C).
      class_names: the C foreground class names, in label order.
      split_sizes: every split of the dataset and its number of records.
      tfds_info: the underlying tfds DatasetInfo, for anything else.
    """

    name: str
    split: str
    num_examples: int
    num_classes: int
    class_names: tuple[str, ...]
    split_sizes: Mapping[str, int]
    tfds_info: Any


class DecodedRecords(Sequence):
    """Random-access view of a tfds data source with records in the project's layout.

    Picklable, so grain worker processes can read from it. When it knows how it was opened (``opened_with``: the
    arguments of `create_builder` and the split), a worker reopens the split through the registry instead of
    unpickling the tfds builder: unpickling a builder whose config object is not the registered one fails in a fresh
    process ("Cannot name a custom BuilderConfig the same as an available BuilderConfig").
    """

    def __init__(self, data_source: Sequence[dict], opened_with: tuple | None = None, decode_masks: bool = True):
        self._data_source = data_source
        self._opened_with = opened_with
        self._decode_masks = decode_masks

    def __reduce__(self):
        if self._opened_with is None:
            return (DecodedRecords, (self._data_source, None, self._decode_masks))
        return (_reopen_split, self._opened_with)

    def __len__(self) -> int:
        return len(self._data_source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"Records are indexed by int; got {type(index).__name__} {index!r}.")
        if not -len(self) <= index < len(self):
            raise IndexError(f"Record index {index} is out of range for {len(self)} records.")
        return decode_record(self._data_source[int(index) % len(self)], decode_mask=self._decode_masks)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for index in range(len(self)):
            yield self[index]

    def __repr__(self) -> str:
        return f"DecodedRecords({self._data_source!r})"

    def ids(self) -> list[str]:
        """Every record's id, in record order, read without decoding any image (when the split was opened through
        the registry; else by decoding each record)."""
        return [decode_id(record["id"]) for record in self._undecoded_records()]

    def labels(self) -> np.ndarray:
        """Every record's image-level labels, ``(N, C)`` float32 in record order, read without decoding any image."""
        labels = [np.asarray(record["labels"], np.float32) for record in self._undecoded_records()]
        return np.stack(labels) if labels else np.zeros((0, 0), np.float32)

    def _undecoded_records(self) -> Iterator[Mapping[str, Any]]:
        if self._opened_with is None:
            yield from self
            return
        name, split, data_dir, builder_kwargs, _ = self._opened_with
        builder = create_builder(name, data_dir=data_dir, **builder_kwargs)
        raw = builder.as_data_source(split, decoders=_skip_decoding(builder, ("image", *_LABEL_MAP_FEATURES)))
        for index in range(len(raw)):
            yield raw[index]


class LabelFolderRecords(Sequence):
    """A split's records whose ``mask`` is the label PNG ``<label_dir>/<id>.png`` written by an earlier stage.

    The images and image-level labels come from ``source`` (opened without its own masks); the label maps from the
    folder, read with the VOC palette rules (``0`` background, ``1..C`` classes, ``255`` ignored). Picklable for grain
    workers, like ``source``.

    Args:
      source: a split's ``DecodedRecords``.
      label_dir: folder of ``<id>.png`` label maps.
      num_classes: foreground classes C (a value above C that is not 255 is an error naming the file).
      produced_by: what writes the folder (e.g. "the pseudo_labels stage"), for the error messages.

    Raises:
      FileNotFoundError: the folder is missing, or some ids of the split have no label map (the count and the first
        missing files are named).
    """

    def __init__(self, source: DecodedRecords, label_dir: str, num_classes: int, *, produced_by: str):
        self._source = source
        self.label_dir = os.path.abspath(os.path.expanduser(label_dir))
        self.num_classes = int(num_classes)
        self.produced_by = produced_by
        if not os.path.isdir(self.label_dir):
            raise FileNotFoundError(f"{self.label_dir}: no such label folder; it is written by {produced_by}.")
        present = {name[: -len(".png")] for name in os.listdir(self.label_dir) if name.endswith(".png")}
        missing = [image_id for image_id in source.ids() if image_id not in present]
        if missing:
            first = ", ".join(self.label_path(image_id) for image_id in missing[:3])
            raise FileNotFoundError(
                f"{len(missing)} of {len(source)} images have no label map in {self.label_dir} (first: {first}); "
                f"it is written by {produced_by}: run it (again) for this split."
            )

    def __repr__(self) -> str:
        # grain compares the repr of a checkpoint's data source with the loader's on resume: a stable one (not the
        # default, which holds the object's address) lets a run that reads a label folder resume.
        return f"LabelFolderRecords({self._source!r}, {self.label_dir!r}, num_classes={self.num_classes})"

    def label_path(self, image_id: str) -> str:
        return os.path.join(self.label_dir, f"{image_id}.png")

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self._source[index]
        path = self.label_path(record["id"])
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: the label map of image {record['id']!r} is missing ({self.produced_by}).")
        mask = labels.read_label_png(path, self.num_classes)
        if mask.shape != record["image"].shape[:2]:
            raise ValueError(
                f"{path}: label map of size {mask.shape[0]}x{mask.shape[1]} for image {record['id']!r} of size "
                f"{record['image'].shape[0]}x{record['image'].shape[1]}."
            )
        return {**record, "mask": mask}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for index in range(len(self)):
            yield self[index]


def create_builder(name: str, *, data_dir: str, **builder_kwargs) -> tfds.core.DatasetBuilder:
    """Returns the tfds builder registered under `name` (not prepared yet).

    Raises:
      ValueError: when `name` is not a registered dataset.
    """
    if name not in DATASET_BUILDERS:
        raise ValueError(
            f"Unknown dataset {name!r} (config field data.dataset); allowed values: "
            f"{sorted(DATASET_BUILDERS)}."
        )
    return DATASET_BUILDERS[name](data_dir=data_dir, **builder_kwargs)


def load_split(
    name: str, split: str, *, data_dir: str, decode_masks: bool = True, field: str | None = None, **builder_kwargs
) -> tuple[DecodedRecords, SplitInfo]:
    """Prepares dataset `name` in `data_dir` if needed and opens one split for random access.

    Args:
      name: dataset name, the value of config.data.dataset (e.g. "puzzle_demo").
      split: split name (e.g. "train").
      data_dir: tfds data directory; the dataset is generated or prepared there on first use.
      decode_masks: False leaves the masks (and part maps) undecoded and out of the records
        (classifier training).
      field: the config field that named the split (e.g. "pretrain.split"), for the error message.
      **builder_kwargs: dataset options, e.g. for puzzle_demo: seed, num_classes, num_pretrain,
        num_train, num_val, min_side, max_side.

    Returns:
      (source, info): `source` is a random-access sequence of records (dicts of numpy arrays:
      `image`, `mask` (unless `decode_masks` is False), `id`, `labels`, and `parts` with the mask
      where the dataset declares it); `info` describes the split and the classes.

    Raises:
      ValueError: for an unknown dataset name, dataset option or split.
    """
    builder = create_builder(name, data_dir=data_dir, **builder_kwargs)
    # A no-op when the data is already prepared; tfds writes to a temporary directory and renames
    # it, so an interrupted preparation never leaves a half-written dataset behind.
    builder.download_and_prepare()
    split_sizes = {key: value.num_examples for key, value in builder.info.splits.items()}
    if split not in split_sizes:
        named_by = f" ({field})" if field else ""
        advice = f" Set {field} to one of them." if field else ""
        raise ValueError(
            f"Unknown split {split!r}{named_by} of dataset {name!r}; its splits are {sorted(split_sizes)}.{advice}"
        )
    source = _open_split(builder, name, split, data_dir, dict(builder_kwargs), decode_masks)
    class_names = tuple(builder.class_names)
    info = SplitInfo(
        name=name,
        split=split,
        num_examples=len(source),
        num_classes=len(class_names),
        class_names=class_names,
        split_sizes=split_sizes,
        tfds_info=builder.info,
    )
    return source, info


# The per-pixel maps that a split opened with decode_masks=False leaves undecoded (and out of its records).
_LABEL_MAP_FEATURES = ("mask", "parts")


def _skip_decoding(builder: tfds.core.DatasetBuilder, names: Sequence[str]) -> dict[str, Any]:
    """Decoders that leave the named features encoded, for those of them the dataset declares."""
    return {name: tfds.decode.SkipDecoding() for name in names if name in builder.info.features}


def _open_split(
    builder: tfds.core.DatasetBuilder, name: str, split: str, data_dir: str, builder_kwargs: dict, decode_masks: bool
) -> DecodedRecords:
    decoders = None if decode_masks else _skip_decoding(builder, _LABEL_MAP_FEATURES)
    return DecodedRecords(
        builder.as_data_source(split, decoders=decoders),
        opened_with=(name, split, data_dir, builder_kwargs, decode_masks),
        decode_masks=decode_masks,
    )


def _reopen_split(
    name: str, split: str, data_dir: str, builder_kwargs: dict, decode_masks: bool = True
) -> DecodedRecords:
    """Opens an already prepared split again (used when a `DecodedRecords` is unpickled in a worker)."""
    builder = create_builder(name, data_dir=data_dir, **builder_kwargs)
    return _open_split(builder, name, split, data_dir, builder_kwargs, decode_masks)


def load_split_from_config(
    data_config: Any, split: str, *, decode_masks: bool = True, field: str | None = None
) -> tuple[DecodedRecords, SplitInfo]:
    """`load_split` for the `config.data` section of a run (dataset, data_dir, root, builder_kwargs).

    `data.root` (the folder of a dataset the user downloaded) is passed to the builder as its `root` option
    when set; the built-in demo set takes none. In a multi-process run, process 0 prepares the dataset before the
    other processes open it.
    """
    builder_kwargs = dict(data_config.builder_kwargs)
    if data_config.root:
        builder_kwargs["root"] = os.path.expanduser(data_config.root)

    def load() -> tuple[DecodedRecords, SplitInfo]:
        return load_split(
            data_config.dataset,
            split,
            data_dir=os.path.expanduser(data_config.data_dir),
            decode_masks=decode_masks,
            field=field,
            **builder_kwargs,
        )

    # Several processes (a pod, several GPU hosts): process 0 prepares a missing dataset alone, since concurrent
    # preparations of one shared data_dir would race; the others open it once process 0 is done (a data_dir local
    # to each host is then prepared by each, one after process 0), or fail with process 0's message.
    return sharding.first_on_process_zero(f"dataset {data_config.dataset} {split} prepared", load)
