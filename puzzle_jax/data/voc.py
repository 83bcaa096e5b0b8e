"""PASCAL VOC 2012 + SBD as the tfds builder "voc2012_aug", and what the manual-data builders share.

This module owns:

* the readers of the VOC layout, also used by `voc_folder` (and `coco` for images): split lists,
  images (validated, stored as their original JPEG/PNG bytes), XML image-level labels (spec §1),
  SBD `cls/*.mat` masks (class-mask PNGs are read by `puzzle_jax.labels.read_label_png`, whose
  `BadExampleError` every reader raises);
* the machinery shared by the builders that read data the user has downloaded (`voc2012_aug`,
  `coco2014`, `voc_folder`): the `root` option, config names that change when the data or the
  options change, the bad-example policy (`on_bad_example`: "error" or "skip", counted), parallel
  reading, and the per-split report kept in the prepared dataset's metadata;
* the `voc2012_aug` builder.

Records have the layout of `datasets.py`: `image` uint8 (H, W, 3), `mask` uint8 (H, W) with 0
background, 1..C classes and 255 ignored, `id` str, `labels` float32 (C,) multi-hot.

Expected layout of `root` for voc2012_aug (`root` may also be `VOCdevkit/` or `VOC2012/` itself)::

    root/VOCdevkit/VOC2012/JPEGImages/<id>.jpg
    root/VOCdevkit/VOC2012/Annotations/<id>.xml              image-level labels (spec §1)
    root/VOCdevkit/VOC2012/SegmentationClass/<id>.png        fine masks of train and val
    root/VOCdevkit/VOC2012/ImageSets/Segmentation/{train,val}.txt   (+ test.txt from the test tar)
    and SBD, either
    root/benchmark_RELEASE/dataset/{cls/<id>.mat,train.txt,val.txt}   (or builder option sbd_root)
    or the widely shared SegmentationClassAug PNGs in
    root/VOCdevkit/VOC2012/SegmentationClassAug/<id>.png  (or root/SegmentationClassAug/)

Splits: `train` (1,464) and `val` (1,449) are VOC's lists; `train_aug` is the standard recipe
(SBD train + SBD val + VOC train) - VOC val, 10,582 ids on the real data (with SegmentationClassAug
alone, its file names stand for SBD's lists); `test` (1,456, only when test.txt exists) has images
only: its labels are all 0 and its masks all 255, i.e. nothing to learn or score. Masks: VOC's fine
`SegmentationClass` mask where it exists (train, val), else SBD's.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import io
import json
import os
import re
import sys
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import cv2
import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from puzzle_jax.labels import (
    IGNORE_LABEL,
    BadExampleError,
    check_mask_values,
    read_file_bytes,
    read_label_png,
)

VOC_CLASS_NAMES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)

# Sizes of the standard splits, to check what the user's copy gives.
VOC2012_SPLIT_SIZES: Mapping[str, int] = {
    "train_aug": 10582, "train": 1464, "val": 1449, "test": 1456
}

# What a builder does with an example whose files are missing or invalid.
BAD_EXAMPLE_POLICIES = ("error", "skip")

# Threads that read and validate examples while a split is prepared: decoding (OpenCV, PIL, zlib)
# releases the GIL, and reading a network file system is latency bound.
PREPARATION_THREADS = min(8, os.cpu_count() or 1)

# The split names tfds accepts in split strings such as "train[:10%]".
_SPLIT_NAME = re.compile(r"^[A-Za-z0-9_]+$")

# How many skipped examples the metadata and the log name per split (the count is always exact).
_SKIPPED_EXAMPLES_LISTED = 50


# --------------------------------------------------------------------------------------------------
# Readers of the VOC layout.
# --------------------------------------------------------------------------------------------------


def read_id_list(path: epath.PathLike) -> list[str]:
    """Reads a split list: one id per line (first whitespace-separated field), CRLF tolerated.

    Args:
      path: the list file, e.g. `ImageSets/Segmentation/train.txt`.

    Returns:
      The ids in file order.

    Raises:
      FileNotFoundError: when the file does not exist.
      ValueError: when it lists no id or an id twice.
    """
    path = epath.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Split list {path} does not exist.")
    ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise ValueError(f"Split list {path} is empty: it lists no image id.")
    seen: set[str] = set()
    for example_id in ids:
        if example_id in seen:
            raise ValueError(f"Split list {path} lists id {example_id!r} more than once.")
        seen.add(example_id)
    return ids


def read_image(path: epath.PathLike) -> tuple[bytes, int, int]:
    """Reads and validates an image file; returns the bytes to store and the image size.

    The original bytes are stored when they are a JPEG or PNG that tfds's reader (OpenCV,
    `IMREAD_UNCHANGED`: EXIF orientation ignored, as PIL does) decodes to 8-bit grey or RGB.
    Anything else (alpha, 16 bits, other formats) is converted to 8-bit RGB and stored as PNG.

    Args:
      path: the image file.

    Returns:
      (encoded, height, width).

    Raises:
      BadExampleError: for a missing, empty, unreadable or corrupt (e.g. truncated) file.
    """
    path = epath.Path(path)
    data = read_file_bytes(path, "image")
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if decoded is None or decoded.size == 0:
        raise BadExampleError(path, "image is corrupt or not in a format OpenCV can decode")
    height, width = decoded.shape[:2]
    is_jpeg_or_png = data[:3] == b"\xff\xd8\xff" or data[:8] == b"\x89PNG\r\n\x1a\n"
    channels = 1 if decoded.ndim == 2 else decoded.shape[2]
    if is_jpeg_or_png and decoded.dtype == np.uint8 and channels in (1, 3):
        return data, height, width
    if decoded.dtype == np.uint16:
        decoded = np.rint(decoded / 257.0).astype(np.uint8)
    elif decoded.dtype != np.uint8:
        raise BadExampleError(path, f"image has unsupported pixel type {decoded.dtype}")
    if channels == 1:
        decoded = decoded.reshape(height, width)
    elif channels == 4:
        decoded = cv2.cvtColor(decoded, cv2.COLOR_BGRA2BGR)
    elif channels != 3:
        raise BadExampleError(path, f"image has {channels} channels; expected 1, 3 or 4")
    return encode_png(decoded), height, width


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of a uint8 (H, W) or BGR (H, W, 3) array."""
    ok, encoded = cv2.imencode(".png", array)
    if not ok:
        raise RuntimeError(f"OpenCV could not encode an array of shape {array.shape} as PNG.")
    return encoded.tobytes()


def read_sbd_mask(path: epath.PathLike, num_classes: int = len(VOC_CLASS_NAMES)) -> np.ndarray:
    """Reads an SBD `cls/<id>.mat` file (MATLAB struct GTcls.Segmentation) as uint8 class ids.

    Raises:
      BadExampleError: for a missing or unreadable file, or one without GTcls.Segmentation.
    """
    import scipy.io  # pylint: disable=import-outside-toplevel  (only SBD needs it)

    path = epath.Path(path)
    data = read_file_bytes(path, "SBD mask")
    try:
        content = scipy.io.loadmat(io.BytesIO(data), squeeze_me=True, struct_as_record=False)
        segmentation = content["GTcls"].Segmentation
    except Exception as error:  # scipy raises many types for corrupt files.
        raise BadExampleError(
            path, f"is not an SBD cls .mat file with GTcls.Segmentation ({error})"
        ) from error
    mask = np.asarray(segmentation)
    if mask.ndim != 2:
        raise BadExampleError(path, f"GTcls.Segmentation has shape {mask.shape}; expected (H, W)")
    if mask.min() < 0 or mask.max() > 255:
        raise BadExampleError(path, "GTcls.Segmentation has values outside 0..255")
    return check_mask_values(mask.astype(np.uint8), path, num_classes)


def _box_coordinate(box: ElementTree.Element, field: str, path: epath.Path) -> float:
    text = box.findtext(field)
    try:
        return float(text)
    except (TypeError, ValueError):
        raise BadExampleError(path, f"bndbox {field} is {text!r}, not a number") from None


def parse_xml_labels(path: epath.PathLike, class_names: Sequence[str]) -> np.ndarray:
    """Image-level labels from a VOC XML annotation, as the authors (spec §1).

    Every `<object>` counts, difficult and truncated ones included; an object whose box has zero
    width or height is skipped. An object without `<bndbox>` counts (its name is the label).

    Args:
      path: the XML file.
      class_names: the C foreground class names; label i is class_names[i].

    Returns:
      float32 (C,) multi-hot.

    Raises:
      BadExampleError: for a missing or malformed file, an object without a name, an unknown class
        name (the message lists the allowed ones) or a box of negative size.
    """
    path = epath.Path(path)
    data = read_file_bytes(path, "annotation")
    try:
        root = ElementTree.fromstring(data)
    except ElementTree.ParseError as error:
        raise BadExampleError(path, f"annotation is not valid XML ({error})") from error
    index_of = {name: index for index, name in enumerate(class_names)}
    labels = np.zeros((len(class_names),), np.float32)
    for number, element in enumerate(root.iter("object")):
        name = (element.findtext("name") or "").strip()
        if not name:
            raise BadExampleError(path, f"<object> number {number + 1} has no <name>")
        if name not in index_of:
            raise BadExampleError(
                path, f"unknown class name {name!r}; allowed: {list(class_names)}"
            )
        box = element.find("bndbox")
        if box is not None:
            width = _box_coordinate(box, "xmax", path) - _box_coordinate(box, "xmin", path)
            height = _box_coordinate(box, "ymax", path) - _box_coordinate(box, "ymin", path)
            if width < 0 or height < 0:
                raise BadExampleError(
                    path, f"object {name!r} has a box of negative size ({width} x {height})"
                )
            if width == 0 or height == 0:
                continue
        labels[index_of[name]] = 1.0
    return labels


def labels_from_mask(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """float32 (C,) multi-hot of the classes 1..C present in a mask (PSA/IRN's labels)."""
    present = np.unique(mask)
    present = present[(present >= 1) & (present <= num_classes)]
    labels = np.zeros((num_classes,), np.float32)
    labels[present.astype(np.int64) - 1] = 1.0
    return labels


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
) -> dict[str, Any]:
    """The tfds example of one image; a missing mask becomes all IGNORE_LABEL.

    Raises:
      BadExampleError: when the mask's size differs from the image's (naming both files).
    """
    if mask is None:
        mask = np.full((height, width), IGNORE_LABEL, np.uint8)
    elif mask.shape != (height, width):
        raise BadExampleError(
            mask_path if mask_path is not None else image_path,
            f"mask is {mask.shape[0]}x{mask.shape[1]} (HxW) but its image {image_path} is "
            f"{height}x{width}",
        )
    return {
        "image": image,
        "mask": encode_png(mask),
        "id": example_id,
        "labels": np.asarray(labels, np.float32),
    }


# --------------------------------------------------------------------------------------------------
# Shared by the builders of downloaded data (voc2012_aug, coco2014, voc_folder).
# --------------------------------------------------------------------------------------------------


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
    """

    root: str = ""
    class_names: tuple[str, ...] = ()
    splits: tuple[str, ...] = ()
    on_bad_example: str = "error"


class ManualDataBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of the builders that read a manual `root` and prepare it to array_record.

    Subclasses define `_split_generators` and call `_generate_split` for each split.
    """

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
            features=tfds.features.FeaturesDict(
                {
                    # Images keep their original JPEG/PNG bytes; masks are single-channel PNGs.
                    "image": tfds.features.Image(shape=(None, None, 3), dtype=np.uint8),
                    "mask": tfds.features.Image(shape=(None, None, 1), dtype=np.uint8),
                    "id": tfds.features.Text(),
                    "labels": tfds.features.Tensor(shape=(num_classes,), dtype=np.float32),
                }
            ),
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


# --------------------------------------------------------------------------------------------------
# voc2012_aug.
# --------------------------------------------------------------------------------------------------

VOC2012_SPLITS = ("train_aug", "train", "val", "test")

_VOC_LAYOUT_HINT = (
    "ROOT/VOCdevkit/VOC2012/{JPEGImages,Annotations,SegmentationClass,ImageSets/Segmentation} and "
    "SBD as ROOT/benchmark_RELEASE/dataset/{cls,train.txt,val.txt} or "
    "ROOT/VOCdevkit/VOC2012/SegmentationClassAug/ (see puzzle_jax/data/voc.py)."
)


@dataclasses.dataclass(frozen=True)
class SbdSource:
    """Where the SBD masks come from.

    Attributes:
      kind: "mat" (benchmark_RELEASE `cls/*.mat`) or "png" (SegmentationClassAug).
      mask_dir: folder of the masks.
      list_files: SBD's train.txt and val.txt ("mat" only).
    """

    kind: str
    mask_dir: epath.Path
    list_files: tuple[epath.Path, ...] = ()

    def mask_path(self, example_id: str) -> epath.Path:
        return self.mask_dir / f"{example_id}.{self.kind}"

    def read_ids(self) -> list[str]:
        """SBD's ids: train.txt + val.txt, or the names of the SegmentationClassAug PNGs."""
        if self.kind == "mat":
            ids = [i for path in self.list_files for i in read_id_list(path)]
            return list(dict.fromkeys(ids))
        ids = sorted(path.stem for path in self.mask_dir.glob("*.png"))
        if not ids:
            raise ValueError(f"SBD folder {self.mask_dir} holds no PNG mask.")
        return ids

    def identity(self) -> dict[str, Any]:
        """What identifies this source's content cheaply (lists or file names), for config names."""
        if self.kind == "mat":
            return {"kind": "mat", "lists": [file_digest(path) for path in self.list_files]}
        names = "\n".join(sorted(path.name for path in self.mask_dir.glob("*.png")))
        return {"kind": "png", "names": hashlib.sha256(names.encode()).hexdigest()}


def find_voc2012_dir(root: epath.Path) -> epath.Path:
    """The `VOC2012` folder: root itself, root/VOC2012 or root/VOCdevkit/VOC2012.

    Raises:
      FileNotFoundError: naming the places looked at.
    """
    candidates = [root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"]
    for candidate in candidates:
        if (candidate / "JPEGImages").is_dir():
            return candidate
    raise FileNotFoundError(
        "voc2012_aug: no JPEGImages/ folder in any of "
        f"{[os.fspath(c) for c in candidates]}. Expected layout: {_VOC_LAYOUT_HINT}"
    )


def find_sbd(root: epath.Path, voc_dir: epath.Path, sbd_root: str = "") -> SbdSource | None:
    """Finds SBD: `cls/*.mat` with train.txt and val.txt, else SegmentationClassAug PNGs.

    Args:
      root: the voc2012_aug root.
      voc_dir: the VOC2012 folder.
      sbd_root: optional explicit folder (benchmark_RELEASE, its dataset/ or SegmentationClassAug).

    Returns:
      The source, or None when neither is found.
    """
    bases = [epath.Path(sbd_root)] if sbd_root else [root, voc_dir.parent, voc_dir]
    for base in bases:
        for dataset_dir in (base, base / "dataset", base / "benchmark_RELEASE" / "dataset"):
            lists = (dataset_dir / "train.txt", dataset_dir / "val.txt")
            if (dataset_dir / "cls").is_dir() and all(path.is_file() for path in lists):
                return SbdSource(kind="mat", mask_dir=dataset_dir / "cls", list_files=lists)
    if sbd_root:
        png_dirs = [epath.Path(sbd_root), epath.Path(sbd_root) / "SegmentationClassAug"]
    else:
        png_dirs = [voc_dir / "SegmentationClassAug", root / "SegmentationClassAug"]
    for png_dir in png_dirs:
        if png_dir.is_dir() and any(png_dir.glob("*.png")):
            return SbdSource(kind="png", mask_dir=png_dir)
    return None


def compose_train_aug(
    sbd_ids: Sequence[str], voc_train: Sequence[str], voc_val: Sequence[str]
) -> list[str]:
    """The standard train_aug ids: (SBD train + SBD val + VOC train) - VOC val, sorted."""
    return sorted((set(sbd_ids) | set(voc_train)) - set(voc_val))


@dataclasses.dataclass(eq=False, kw_only=True)
class Voc2012AugConfig(ManualDataConfig):
    """voc2012_aug options (see `create_builder`); sbd_root is "" when SBD is looked up in root."""

    sbd_root: str = ""


class Voc2012Aug(ManualDataBuilder, skip_registration=__name__ == "__main__"):
    """PASCAL VOC 2012 segmentation with the SBD augmentation (tfds name "voc2012_aug")."""

    name = "voc2012_aug"

    def _split_generators(self, dl_manager) -> dict[str, Iterator]:
        del dl_manager  # Everything is read from the root the user gives.
        config = self.builder_config
        root = epath.Path(config.root)
        voc_dir = find_voc2012_dir(root)
        lists_dir = voc_dir / "ImageSets" / "Segmentation"
        voc_lists = {
            name: read_id_list(lists_dir / f"{name}.txt")
            for name in ("train", "val", "test")
            if name in config.splits or (name != "test" and "train_aug" in config.splits)
        }
        segmentation_dir = voc_dir / "SegmentationClass"
        generators = {}
        for split in config.splits:
            if split == "train_aug":
                sbd = find_sbd(root, voc_dir, config.sbd_root)
                if sbd is None:
                    raise FileNotFoundError(
                        f"voc2012_aug split 'train_aug' needs SBD, which is not in {root}"
                        + (f" nor {config.sbd_root}" if config.sbd_root else "")
                        + f". Expected layout: {_VOC_LAYOUT_HINT} Or prepare only VOC's splits "
                        "with the builder option splits='train,val'."
                    )
                ids, notes = self._train_aug_ids(sbd, voc_lists["train"], voc_lists["val"])
                fine_masks = set(voc_lists["train"])
                load = self._make_loader(voc_dir, mask_for=lambda i, s=sbd, f=fine_masks: (
                    (segmentation_dir / f"{i}.png", "png") if i in f else (s.mask_path(i), s.kind)
                ))
                source = f"{lists_dir} (train, val) and SBD in {sbd.mask_dir}"
            elif split == "test":
                ids, notes = voc_lists["test"], {"note": "images only: labels 0, masks all 255"}
                load = self._make_loader(voc_dir, mask_for=None)
                source = os.fspath(lists_dir / "test.txt")
            else:
                ids, notes = voc_lists[split], {}
                load = self._make_loader(
                    voc_dir, mask_for=lambda i: (segmentation_dir / f"{i}.png", "png")
                )
                source = os.fspath(lists_dir / f"{split}.txt")
            expected = VOC2012_SPLIT_SIZES[split]
            if len(ids) != expected:
                logging.warning(
                    "voc2012_aug split %r has %d ids; the standard split has %d.",
                    split, len(ids), expected,
                )
            generators[split] = self._generate_split(split, ids, load, source=source, notes=notes)
        return generators

    @staticmethod
    def _train_aug_ids(
        sbd: SbdSource, voc_train: Sequence[str], voc_val: Sequence[str]
    ) -> tuple[list[str], dict[str, Any]]:
        sbd_ids = sbd.read_ids()
        ids = compose_train_aug(sbd_ids, voc_train, voc_val)
        notes = {
            "recipe": "(SBD train + SBD val + VOC train) - VOC val",
            "sbd_ids": len(sbd_ids),
            "sbd_source": sbd.kind,
            "voc_train_ids": len(voc_train),
            "voc_val_ids": len(voc_val),
            "standard_size": VOC2012_SPLIT_SIZES["train_aug"],
        }
        # The count check the README asks users to look at: 10,582 on the real data.
        logging.info(
            "voc2012_aug train_aug: %d ids = (SBD %d ids (%s) + VOC train %d) - VOC val %d; the "
            "standard train_aug has %d.",
            len(ids), len(sbd_ids), sbd.kind, len(voc_train), len(voc_val),
            VOC2012_SPLIT_SIZES["train_aug"],
        )
        return ids, notes

    def _make_loader(
        self,
        voc_dir: epath.Path,
        *,
        mask_for: Callable[[str], tuple[epath.Path, str]] | None,
    ) -> Callable[[str], dict[str, Any]]:
        """Loader of one id; `mask_for(id)` gives (mask file, "png" or "mat"), None for test."""
        num_classes = len(VOC_CLASS_NAMES)

        def load(example_id: str) -> dict[str, Any]:
            image_path = voc_dir / "JPEGImages" / f"{example_id}.jpg"
            image, height, width = read_image(image_path)
            if mask_for is None:
                labels = np.zeros((num_classes,), np.float32)
                mask, mask_path = None, None
            else:
                labels = parse_xml_labels(
                    voc_dir / "Annotations" / f"{example_id}.xml", VOC_CLASS_NAMES
                )
                mask_path, kind = mask_for(example_id)
                reader = read_sbd_mask if kind == "mat" else read_label_png
                mask = reader(mask_path, num_classes)
            return make_record(
                example_id, image=image, height=height, width=width, image_path=image_path,
                labels=labels, mask=mask, mask_path=mask_path,
            )

        return load


def create_builder(
    *,
    data_dir: str,
    root: str = "",
    sbd_root: str = "",
    splits: str | Sequence[str] | None = None,
    on_bad_example: str = "error",
) -> Voc2012Aug:
    """Returns the voc2012_aug builder for the user's VOC 2012 (+ SBD) copy (not prepared yet).

    Args:
      data_dir: tfds data directory where the prepared copy is kept.
      root: folder of the downloaded data (see the module docstring for the layout).
      sbd_root: SBD's folder when it is not inside root (benchmark_RELEASE, its dataset/ folder, or
        a SegmentationClassAug folder).
      splits: splits to prepare ("train_aug,train,val" or a sequence); default: train_aug, train,
        val, and test when ImageSets/Segmentation/test.txt exists.
      on_bad_example: "error" or "skip" (see ManualDataConfig).

    Returns:
      The builder. Its config name is `<root folder>_<hash>`, the hash covering the root path, the
      options and the split lists, so other data or options never reuse a prepared copy.

    Raises:
      ValueError, FileNotFoundError: for a missing root or VOC folder, or a bad option.
    """
    check_policy("on_bad_example", on_bad_example, BAD_EXAMPLE_POLICIES, "voc2012_aug")
    root_path = resolve_root(root, "voc2012_aug", _VOC_LAYOUT_HINT)
    voc_dir = find_voc2012_dir(root_path)
    lists_dir = voc_dir / "ImageSets" / "Segmentation"
    selected = parse_split_names(splits, VOC2012_SPLITS, "voc2012_aug")
    if selected is None:
        selected = ("train_aug", "train", "val")
        if (lists_dir / "test.txt").is_file():
            selected += ("test",)
    sbd_root = os.path.abspath(os.path.expanduser(sbd_root)) if sbd_root else ""
    sbd = find_sbd(root_path, voc_dir, sbd_root) if "train_aug" in selected else None
    digest = fingerprint({
        "root": os.fspath(root_path),
        "splits": selected,
        "on_bad_example": on_bad_example,
        "lists": {
            name: file_digest(lists_dir / f"{name}.txt") for name in ("train", "val", "test")
        },
        "sbd": sbd.identity() if sbd is not None else None,
    })
    config = Voc2012AugConfig(
        name=make_config_name(root_path, digest),
        description=f"VOC 2012 + SBD from {root_path}, splits {list(selected)}.",
        root=os.fspath(root_path),
        class_names=VOC_CLASS_NAMES,
        splits=selected,
        on_bad_example=on_bad_example,
        sbd_root=sbd_root,
    )
    return Voc2012Aug(config=config, data_dir=data_dir, file_format="array_record")
