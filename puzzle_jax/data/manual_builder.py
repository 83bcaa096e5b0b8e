"""What the builders of data the user has downloaded share (`voc2012_aug`, `coco2014`, `voc_folder`).

This module owns the base builder and its options: the `root` option (the user's data folder), config names that
change when the data or the options change (`fingerprint`, `file_digest`, `make_config_name`), the bad-example
policy (`on_bad_example`: "error" or "skip", counted), parallel reading of the examples, the per-split report kept
in the prepared dataset's metadata, and `make_record`, the record of one example (schema: `records`).

A builder module subclasses `ManualDataConfig` and `ManualDataBuilder`, defines `_split_generators` calling
`_generate_split` with a loader of one id (built from `readers` and `labels.read_label_png`), and exposes a
`create_builder` that checks the options and names the config.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from puzzle_jax.data import announce, records
from puzzle_jax.labels import IGNORE_LABEL, BadExampleError

# What a builder does with an example whose files are missing or invalid.
BAD_EXAMPLE_POLICIES = ("error", "skip")

# Threads that read and validate examples while a split is prepared: decoding (OpenCV, PIL, zlib)
# releases the GIL, and reading a network file system is latency bound.
PREPARATION_THREADS = min(8, os.cpu_count() or 1)

# The split names tfds accepts in split strings such as "train[:10%]".
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_]+$")

# How many skipped examples the metadata and the log name per split (the count is always exact).
_SKIPPED_EXAMPLES_LISTED = 50


def make_record(
    example_id: str,
    *,
    image: bytes,
    height: int,
    width: int,
    image_path: epath.PathLike,
    labels: np.ndarray,
    mask: np.ndarray | None,
    mask_path: epath.PathLike | None = None,
    parts: np.ndarray | None = None,
    parts_path: epath.PathLike | None = None,
) -> dict[str, Any]:
    """The tfds example of one image; a missing mask becomes all IGNORE_LABEL.

    Args:
      example_id: the record's id.
      image: the image's bytes to store, from `readers.read_image`.
      height: the image's height.
      width: the image's width.
      image_path: the image file, for messages.
      labels: (C,) multi-hot image-level labels.
      mask: uint8 (H, W) label map, or None when the example has none.
      mask_path: the mask's file, for messages.
      parts: uint8 (H, W) part map (values `records.PART_VALUES`) for a dataset that declares parts, else None.
      parts_path: the part map's file, for messages.

    Returns:
      The example, in the layout of `records.record_features` (with `parts` when given).

    Raises:
      BadExampleError: when the mask's or the part map's size differs from the image's (naming both files).
    """
    if mask is None:
        mask = np.full((height, width), IGNORE_LABEL, np.uint8)
    elif mask.shape != (height, width):
        raise BadExampleError(
            mask_path if mask_path is not None else image_path,
            f"mask is {mask.shape[0]}x{mask.shape[1]} (HxW) but its image {image_path} is "
            f"{height}x{width}",
        )
    if parts is not None and parts.shape != (height, width):
        raise BadExampleError(
            parts_path if parts_path is not None else image_path,
            f"part map is {parts.shape[0]}x{parts.shape[1]} (HxW) but its image {image_path} (and mask) is "
            f"{height}x{width}",
        )
    return records.encode_record(example_id, image=image, mask=mask, labels=labels, parts=parts)


def resolve_root(root: str | os.PathLike, dataset: str, layout_hint: str) -> epath.Path:
    """The user's data folder as an absolute path (local paths) or URL (gs://...).

    Raises:
      ValueError: when no root is given.
      FileNotFoundError: when it is not a directory.
    """
    text = os.path.expanduser(os.fspath(root)) if root else ""
    if not text:
        raise ValueError(
            f"Dataset {dataset!r} reads data you have downloaded: set its folder with "
            f"--config.data.root=DIR (builder option `root`). Expected layout: {layout_hint}"
        )
    if "://" not in text:
        text = os.path.abspath(text)
    path = epath.Path(text)
    if not path.is_dir():
        raise FileNotFoundError(f"Dataset {dataset!r}: root {text} is not a directory.")
    return path


def check_policy(name: str, value: str, allowed: Sequence[str], dataset: str) -> str:
    """Returns `value` when it is one of `allowed`, else raises a ValueError naming the option."""
    if value not in allowed:
        raise ValueError(
            f"Dataset {dataset!r}: option {name}={value!r} is not allowed; allowed: "
            f"{list(allowed)}."
        )
    return value


def parse_split_names(
    value: str | Sequence[str] | None, allowed: Sequence[str], dataset: str
) -> tuple[str, ...] | None:
    """Parses the `splits` option ("train,val" or a sequence); None when not given.

    Raises:
      ValueError: for a name not in `allowed` or an empty selection.
    """
    if value is None or value == "" or (not isinstance(value, str) and len(value) == 0):
        return None
    names = [name.strip() for name in value.split(",")] if isinstance(value, str) else list(value)
    names = [name for name in names if name]
    unknown = [name for name in names if name not in allowed]
    if unknown or not names:
        raise ValueError(
            f"Dataset {dataset!r}: option splits={value!r} names unknown split(s) {unknown}; "
            f"allowed: {list(allowed)}."
        )
    return tuple(dict.fromkeys(names))


def check_split_name(name: str, source: epath.PathLike) -> str:
    """Split names must be usable in tfds split strings (letters, digits, underscores)."""
    if not _SPLIT_NAME.match(name):
        raise ValueError(
            f"{source}: split name {name!r} may only contain letters, digits and underscores."
        )
    return name


def fingerprint(parts: Mapping[str, Any]) -> str:
    """Short hash of JSON-serialisable parts (options, list contents): part of a config name."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def file_digest(path: epath.PathLike) -> str | None:
    """sha256 of a small file's content (split lists, class names); None when it does not exist."""
    path = epath.Path(path)
    if not path.is_file():
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_config_name(root: epath.Path, digest: str) -> str:
    """`<root folder name>_<digest>`, restricted to the characters tfds allows in config names."""
    base = re.sub(r"[^A-Za-z0-9_.+-]", "_", root.name or "root")[:40]
    return f"{base}_{digest}"


def _capture_bad_examples(load_example: Callable[[str], dict]) -> Callable[[str], Any]:
    def load(example_id: str) -> dict | BadExampleError:
        try:
            return load_example(example_id)
        except BadExampleError as error:
            return error

    return load


def map_in_threads(
    function: Callable[[Any], Any], items: Iterable[Any], *, threads: int = PREPARATION_THREADS
) -> Iterator[Any]:
    """Yields function(item) in item order, computed by a thread pool a bounded window ahead."""
    if threads <= 1:
        yield from map(function, items)
        return
    window = 4 * threads  # Bounded, so a slow consumer never piles up a whole split in memory.
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        pending: collections.deque = collections.deque()
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


@dataclasses.dataclass(eq=False, kw_only=True)
class ManualDataConfig(tfds.core.BuilderConfig):
    """Options shared by the builders of downloaded data. Built by each module's `create_builder`.

    Attributes:
      root: absolute path (or URL) of the user's data folder.
      class_names: the C foreground class names, in label order.
      splits: the splits to prepare.
      on_bad_example: "error" (stop with a message naming the file) or "skip" (count, report in
        the log and in the prepared dataset's metadata, and go on).
      parts: whether the records carry a part map (`records`; a voc_folder with `SegmentationParts/`).
    """

    root: str = ""
    class_names: tuple[str, ...] = ()
    splits: tuple[str, ...] = ()
    on_bad_example: str = "error"
    parts: bool = False


class ManualDataBuilder(announce.AnnouncedPreparation, tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the builders that read a manual `root` and prepare it to array_record.

    Subclasses define `_split_generators` and call `_generate_split` for each split.
    """

    def _preparation_message(self) -> str:
        splits = ", ".join(self.builder_config.splits)
        return (
            f"Preparing {self.name} (splits {splits}) from the files in {self.builder_config.root} (nothing is "
            f"downloaded) into {self.data_dir}"
        )

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # tfds derives this through `importlib_resources`, which its 4.9.10 wheel does not declare
        # as a dependency (see demo.py); the module file of the builder class is the same answer.
        return epath.Path(sys.modules[cls.__module__].__file__)

    @property
    def class_names(self) -> list[str]:
        """Names of the foreground classes, in label order."""
        return list(self.builder_config.class_names)

    def _info(self) -> tfds.core.DatasetInfo:
        num_classes = len(self.builder_config.class_names)
        return tfds.core.DatasetInfo(
            builder=self,
            description=(self.__doc__ or "") + f"\nRoot: {self.builder_config.root}",
            # Records stay in list order, so record i of a split is the i-th kept id of its list.
            disable_shuffling=True,
            # Images keep their original JPEG/PNG bytes (`readers.read_image`).
            features=records.record_features(num_classes, parts=self.builder_config.parts),
            # Per split: examples kept, skipped (with the first few named) and notes of the builder.
            metadata=tfds.core.MetadataDict(),
        )

    def _generate_examples(self, **kwargs) -> Iterator[tuple[str, dict[str, Any]]]:
        # Required by tfds's abstract base; `_split_generators` returns `_generate_split` instead.
        raise NotImplementedError("Use _generate_split.")

    def _generate_split(
        self,
        split: str,
        example_ids: Sequence[str],
        load_example: Callable[[str], dict[str, Any]],
        *,
        source: str,
        notes: Mapping[str, Any] | None = None,
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """Yields the examples of one split, applying the bad-example policy.

        Args:
          split: split name.
          example_ids: ids in record order.
          load_example: id -> tfds example; raises BadExampleError for a bad file.
          source: what lists the ids (a file), for messages.
          notes: extra facts about the split, written to the metadata.

        Raises:
          BadExampleError: for the first bad example when on_bad_example is "error".
          ValueError: when no example is left.
        """
        policy = self.builder_config.on_bad_example
        skipped: list[dict[str, str]] = []
        kept = 0
        outcomes = map_in_threads(_capture_bad_examples(load_example), example_ids)
        for example_id, outcome in zip(example_ids, outcomes):
            if isinstance(outcome, BadExampleError):
                if policy == "error":
                    raise BadExampleError(
                        outcome.path,
                        f"{outcome.problem} (dataset {self.name!r}, split {split!r}, id "
                        f"{example_id!r}; the builder option on_bad_example='skip' skips and "
                        "counts such examples instead)",
                    ) from outcome
                skipped.append({"id": example_id, "file": outcome.path, "problem": outcome.problem})
                continue
            kept += 1
            yield example_id, outcome
        report = {
            "listed": len(example_ids),
            "examples": kept,
            "skipped": len(skipped),
            "skipped_examples": skipped[:_SKIPPED_EXAMPLES_LISTED],
            "source": source,
            **dict(notes or {}),
        }
        self.info.metadata.setdefault("splits", {})[split] = report
        if skipped:
            logging.warning(
                "%s split %r: skipped %d of %d examples (on_bad_example='skip'); first ones: %s",
                self.name, split, len(skipped), len(example_ids),
                "; ".join(f"{item['file']}: {item['problem']}" for item in skipped[:5]),
            )
        if kept == 0:
            raise ValueError(
                f"Dataset {self.name!r} split {split!r} is empty: all {len(example_ids)} ids "
                f"listed in {source} were skipped as bad examples (first: {skipped[0]['file']}: "
                f"{skipped[0]['problem']})."
            )
        logging.info("%s split %r: %d examples from %s.", self.name, split, kept, source)
