"""A user's own dataset in VOC layout as the tfds builder "voc_folder".

This module owns the rules of a VOC-layout folder: where images, masks, labels, class names and
split lists are, and what happens when some are absent. Select it with
`--config.data.dataset=voc_folder --config.data.root=DIR`. Expected layout::

    DIR/JPEGImages/<id>.jpg               (.jpeg, .png, .bmp, .tif, .tiff, .webp also read)
    DIR/ImageSets/Segmentation/<split>.txt  one id per line; every such file is a split
    DIR/classes.txt                       optional: foreground class names, one per line, in label
                                          order (mask value i = line i); VOC's 20 when absent
    DIR/SegmentationClass/<id>.png        optional: class masks (palette, grey or VOC-coloured PNG;
                                          0 background, 1..C classes, 255 ignored)
    DIR/SegmentationParts/<id>.png        optional: part maps (grey or palette PNG the mask's size;
                                          0 not an object or unknown, 1 an object's body, 2 its
                                          discriminative part, 255 ignored); eval_cam then reports
                                          how much of bodies and parts the CAMs recover
    and image-level labels from one of (builder option label_source, "auto" picks the first found):
    DIR/labels.csv                        "csv": rows `id,class name,class name,...` (a cell may
                                          also hold several names separated by ";"; a first row
                                          whose first cell is "id" or "image_id" is a header)
    DIR/Annotations/<id>.xml              "xml": VOC XML, every <object> counts (spec §1)
    the masks                             "mask": the classes present in the mask (PSA/IRN's rule)

Rules:
* A split named `test` may lack labels and masks (as VOC's test split): its missing labels are all 0
  and its missing masks all 255. In every other split, an id without labels is a bad example.
* An id without a mask gets an all-255 mask (nothing to score); the count is logged and kept in the
  prepared dataset's metadata, with a warning when only some ids of a split have masks.
* With a `SegmentationParts/` folder, every record carries a part map (`records`); an id without a
  part map file gets an all-0 one (nothing to score); the count is logged and kept in the metadata.
  Without the folder, records have no part map. The folder's presence is part of the config name,
  so adding or removing it prepares a new copy.
* A missing or corrupt image, a mask or part map whose size differs from its image, a mask value
  that is not a class, a part map value not in 0/1/2/255, an unknown class name: a bad example,
  which stops preparation with a message naming the file (on_bad_example="error", the default) or
  is skipped and counted (on_bad_example="skip").
  An empty split list or a split with no example left is always an error.

Check a folder before training (prepares it and prints what was found, skipped, and a preview):

    python -m puzzle_jax.data.cli check-folder --root DIR --data_dir ~/tensorflow_datasets \
        --preview /tmp/sheet.png
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging
from etils import epath

from puzzle_jax.data import manual_builder, readers, records, voc
from puzzle_jax.labels import BadExampleError, read_label_png

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# The optional folder of part maps; its presence decides whether the records carry one.
PARTS_FOLDER = "SegmentationParts"
LABEL_SOURCES = ("auto", "csv", "xml", "mask")
# The split that, as VOC's, may come without labels and masks.
UNLABELLED_SPLIT = "test"
# Names that mean "background" or "void" in other tools' class lists; ours lists foreground only.
_NOT_FOREGROUND_NAMES = {"background", "_background_", "__background__", "__ignore__", "void"}
# 0 is background and 255 ignored, so masks can hold at most 254 classes.
MAX_CLASSES = 254

_FOLDER_LAYOUT_HINT = (
    "DIR/JPEGImages/<id>.jpg, DIR/ImageSets/Segmentation/<split>.txt, optional DIR/classes.txt, "
    "DIR/SegmentationClass/<id>.png and DIR/SegmentationParts/<id>.png, and labels in DIR/labels.csv or "
    "DIR/Annotations/<id>.xml "
    "(see puzzle_jax/data/voc_folder.py)."
)


def read_class_names(root: epath.PathLike) -> tuple[str, ...]:
    """The foreground class names from `root/classes.txt`, or VOC's 20 when it does not exist.

    Blank lines and lines starting with "#" are ignored.

    Raises:
      ValueError: for an empty list, a duplicate, a background/void entry or more than 254 names.
    """
    path = epath.Path(root) / "classes.txt"
    if not path.is_file():
        return voc.VOC_CLASS_NAMES
    names: list[str] = []
    for line_number, line in enumerate(path.read_text().splitlines(), start=1):
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        if name.lower() in _NOT_FOREGROUND_NAMES:
            raise ValueError(
                f"{path} line {line_number}: {name!r} is not a foreground class; classes.txt lists "
                "foreground classes only (mask value 0 is background, 255 ignored): remove it."
            )
        if name in names:
            raise ValueError(f"{path} line {line_number}: class {name!r} is listed twice.")
        names.append(name)
    if not names:
        raise ValueError(f"{path} lists no class name.")
    if len(names) > MAX_CLASSES:
        raise ValueError(f"{path} lists {len(names)} classes; at most {MAX_CLASSES} fit in masks.")
    return tuple(names)


def read_labels_csv(path: epath.PathLike) -> dict[str, tuple[int, list[str]]]:
    """Reads a labels CSV: id -> (line number, class names). Names are checked per example.

    Raises:
      FileNotFoundError: when the file does not exist.
      ValueError: when an id appears twice or the file has no row.
    """
    path = epath.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Labels file {path} does not exist.")
    rows: dict[str, tuple[int, list[str]]] = {}
    reader = csv.reader(io.StringIO(path.read_text()))
    for line_number, cells in enumerate(reader, start=1):
        cells = [cell.strip() for cell in cells]
        if not cells or not cells[0]:
            continue
        if line_number == 1 and cells[0].lower() in ("id", "image_id"):
            continue  # Header.
        example_id = cells[0]
        if example_id in rows:
            raise ValueError(
                f"{path} line {line_number}: id {example_id!r} already has labels on line "
                f"{rows[example_id][0]}."
            )
        names = [name.strip() for cell in cells[1:] for name in cell.split(";") if name.strip()]
        rows[example_id] = (line_number, names)
    if not rows:
        raise ValueError(f"Labels file {path} has no row.")
    return rows


def _csv_labels(
    path: epath.Path, line_number: int, names: Sequence[str], class_names: Sequence[str]
) -> np.ndarray:
    index_of = {name: index for index, name in enumerate(class_names)}
    labels = np.zeros((len(class_names),), np.float32)
    for name in names:
        if name not in index_of:
            raise BadExampleError(
                path,
                f"line {line_number}: unknown class name {name!r}; allowed: {list(class_names)}",
            )
        labels[index_of[name]] = 1.0
    return labels


def resolve_label_source(root: epath.Path, label_source: str) -> str:
    """The label source to use: `label_source`, or for "auto" the first of csv, xml, mask found.

    Raises:
      ValueError: for an unknown value, or when nothing to take labels from exists.
    """
    manual_builder.check_policy("label_source", label_source, LABEL_SOURCES, "voc_folder")
    found = {
        "csv": (root / "labels.csv").is_file(),
        "xml": (root / "Annotations").is_dir(),
        "mask": (root / "SegmentationClass").is_dir(),
    }
    if label_source == "auto":
        for source in ("csv", "xml", "mask"):
            if found[source]:
                return source
        raise ValueError(
            f"voc_folder: {root} has no labels.csv, Annotations/ or SegmentationClass/ to take "
            f"image-level labels from. Expected layout: {_FOLDER_LAYOUT_HINT}"
        )
    if not found[label_source]:
        where = {"csv": "labels.csv", "xml": "Annotations/", "mask": "SegmentationClass/"}
        raise ValueError(
            f"voc_folder: label_source={label_source!r} but {root / where[label_source]} does not "
            "exist."
        )
    return label_source


def find_split_lists(root: epath.Path) -> dict[str, epath.Path]:
    """split name -> list file, for every `ImageSets/Segmentation/*.txt`.

    Raises:
      FileNotFoundError: when there is none.
      ValueError: for a file name that is not a valid split name.
    """
    lists_dir = root / "ImageSets" / "Segmentation"
    files = sorted(lists_dir.glob("*.txt")) if lists_dir.is_dir() else []
    if not files:
        raise FileNotFoundError(
            f"voc_folder: no split list in {lists_dir}; write one file per split (e.g. train.txt, "
            "val.txt) with one image id per line."
        )
    return {manual_builder.check_split_name(path.stem, path): path for path in files}


def index_images(image_dir: epath.Path) -> dict[str, list[epath.Path]]:
    """id -> image files named `<id>.<image extension>` (more than one is a bad example)."""
    if not image_dir.is_dir():
        raise FileNotFoundError(
            f"voc_folder: image folder {image_dir} does not exist. Expected layout: "
            f"{_FOLDER_LAYOUT_HINT}"
        )
    images: dict[str, list[epath.Path]] = {}
    for path in image_dir.iterdir():
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            images.setdefault(path.stem, []).append(path)
    return images


@dataclasses.dataclass(eq=False, kw_only=True)
class VocFolderConfig(manual_builder.ManualDataConfig):
    """voc_folder options (see `create_builder`); label_source is resolved (never "auto")."""

    label_source: str = "xml"


class VocFolder(manual_builder.ManualDataBuilder):
    """A user's dataset in VOC layout (tfds name "voc_folder")."""

    name = "voc_folder"

    def _split_generators(self, dl_manager) -> dict[str, Iterator]:
        del dl_manager  # Everything is read from the root the user gives.
        config = self.builder_config
        root = epath.Path(config.root)
        split_lists = find_split_lists(root)
        images = index_images(root / "JPEGImages")
        mask_dir = root / "SegmentationClass"
        mask_ids = (
            {path.stem for path in mask_dir.glob("*.png")} if mask_dir.is_dir() else set()
        )
        parts_dir = root / PARTS_FOLDER
        parts_ids = (
            {path.stem for path in parts_dir.glob("*.png")} if config.parts else set()
        )
        csv_rows = read_labels_csv(root / "labels.csv") if config.label_source == "csv" else {}
        generators = {}
        for split in config.splits:
            list_path = split_lists[split]
            ids = readers.read_id_list(list_path)
            with_mask = sum(example_id in mask_ids for example_id in ids)
            if 0 < with_mask < len(ids):
                logging.warning(
                    "voc_folder split %r: %d of %d ids have no mask in %s; they get all-255 masks "
                    "(not scored).", split, len(ids) - with_mask, len(ids), mask_dir,
                )
            notes = {"label_source": config.label_source, "ids_without_mask": len(ids) - with_mask}
            if config.parts:
                with_parts = sum(example_id in parts_ids for example_id in ids)
                if with_parts < len(ids):
                    logging.warning(
                        "voc_folder split %r: %d of %d ids have no part map in %s; they get all-0 part "
                        "maps (not scored).", split, len(ids) - with_parts, len(ids), parts_dir,
                    )
                notes["ids_without_parts"] = len(ids) - with_parts
            load = self._make_loader(split, root, images, mask_ids, parts_ids, csv_rows)
            generators[split] = self._generate_split(
                split, ids, load, source=os.fspath(list_path), notes=notes
            )
        return generators

    def _make_loader(
        self,
        split: str,
        root: epath.Path,
        images: Mapping[str, list[epath.Path]],
        mask_ids: set[str],
        parts_ids: set[str],
        csv_rows: Mapping[str, tuple[int, list[str]]],
    ):
        config = self.builder_config
        class_names = config.class_names
        num_classes = len(class_names)
        labels_optional = split == UNLABELLED_SPLIT

        def load(example_id: str) -> dict[str, Any]:
            candidates = images.get(example_id, [])
            if not candidates:
                raise BadExampleError(
                    root / "JPEGImages" / f"{example_id}.jpg",
                    f"image file is missing (no {example_id}.<{'|'.join(IMAGE_EXTENSIONS)}> in "
                    "JPEGImages)",
                )
            if len(candidates) > 1:
                raise BadExampleError(
                    candidates[0],
                    f"id {example_id!r} has several images: {sorted(p.name for p in candidates)}",
                )
            image_path = candidates[0]
            image, height, width = readers.read_image(image_path)
            mask_path = root / "SegmentationClass" / f"{example_id}.png"
            mask = read_label_png(mask_path, num_classes) if example_id in mask_ids else None
            labels = self._labels(example_id, root, mask, csv_rows, labels_optional)
            parts_path = root / PARTS_FOLDER / f"{example_id}.png"
            parts = None
            if example_id in parts_ids:
                parts = records.read_parts_png(parts_path)
            elif config.parts:
                parts = np.full((height, width), records.PART_NONE, np.uint8)
            return manual_builder.make_record(
                example_id, image=image, height=height, width=width, image_path=image_path,
                labels=labels, mask=mask, mask_path=mask_path, parts=parts, parts_path=parts_path,
            )

        return load

    def _labels(
        self,
        example_id: str,
        root: epath.Path,
        mask: np.ndarray | None,
        csv_rows: Mapping[str, tuple[int, list[str]]],
        optional: bool,
    ) -> np.ndarray:
        """The example's image-level labels from the configured source (zeros where optional)."""
        config = self.builder_config
        class_names = config.class_names
        if config.label_source == "csv":
            csv_path = root / "labels.csv"
            if example_id in csv_rows:
                line_number, names = csv_rows[example_id]
                return _csv_labels(csv_path, line_number, names, class_names)
            problem = f"has no row for id {example_id!r}"
            missing_path = csv_path
        elif config.label_source == "xml":
            xml_path = root / "Annotations" / f"{example_id}.xml"
            if not optional or xml_path.exists():
                return readers.parse_xml_labels(xml_path, class_names)
            problem, missing_path = "annotation file is missing", xml_path
        else:
            if mask is not None:
                return readers.labels_from_mask(mask, len(class_names))
            problem = "mask file is missing (label_source='mask' takes labels from it)"
            missing_path = root / "SegmentationClass" / f"{example_id}.png"
        if optional:
            return np.zeros((len(class_names),), np.float32)
        raise BadExampleError(missing_path, problem)


def create_builder(
    *,
    data_dir: str,
    root: str = "",
    label_source: str = "auto",
    splits: str | Sequence[str] | None = None,
    on_bad_example: str = "error",
) -> VocFolder:
    """Returns the voc_folder builder for a VOC-layout folder (not prepared yet).

    Args:
      data_dir: tfds data directory where the prepared copy is kept.
      root: the folder (layout: module docstring).
      label_source: "auto", "csv", "xml" or "mask" (see the module docstring).
      splits: splits to prepare (names of list files, "train,val" or a sequence); default all.
      on_bad_example: "error" or "skip" (see manual_builder.ManualDataConfig).

    Returns:
      The builder; its config name hashes the root, the options, the split lists, classes.txt,
      labels.csv and whether `SegmentationParts/` exists, so editing those prepares a new copy
      (edited images, masks or part maps do not: delete the prepared copy,
      `data_dir/voc_folder/<config name>/`, to re-read them).

    Raises:
      ValueError, FileNotFoundError: for a missing root, split list or label source, or a bad
        option or class list.
    """
    dataset = "voc_folder"
    manual_builder.check_policy(
        "on_bad_example", on_bad_example, manual_builder.BAD_EXAMPLE_POLICIES, dataset
    )
    root_path = manual_builder.resolve_root(root, dataset, _FOLDER_LAYOUT_HINT)
    class_names = read_class_names(root_path)
    source = resolve_label_source(root_path, label_source)
    split_lists = find_split_lists(root_path)
    selected = manual_builder.parse_split_names(
        splits, tuple(split_lists), dataset
    ) or tuple(split_lists)
    # Whether the records carry part maps: a prepared copy of the folder without them never serves it with them.
    has_parts = (root_path / PARTS_FOLDER).is_dir()
    fingerprinted: dict[str, Any] = {
        "root": os.fspath(root_path),
        "splits": selected,
        "label_source": source,
        "on_bad_example": on_bad_example,
        "class_names": class_names,
        "lists": {name: manual_builder.file_digest(split_lists[name]) for name in selected},
        "labels_csv": (
            manual_builder.file_digest(root_path / "labels.csv") if source == "csv" else None
        ),
    }
    if has_parts:
        # Only when present, so the names (and prepared copies) of folders without parts are those they had.
        fingerprinted["parts"] = True
    digest = manual_builder.fingerprint(fingerprinted)
    config = VocFolderConfig(
        name=manual_builder.make_config_name(root_path, digest),
        description=(
            f"VOC-layout folder {root_path}, splits {list(selected)}, labels from {source}"
            f"{', part maps' if has_parts else ''}."
        ),
        root=os.fspath(root_path),
        class_names=class_names,
        splits=selected,
        on_bad_example=on_bad_example,
        label_source=source,
        parts=has_parts,
    )
    return VocFolder(config=config, data_dir=data_dir, file_format="array_record")
