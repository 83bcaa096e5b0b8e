"""MS COCO 2014 as the tfds builder "coco2014": semantic masks rendered from instance annotations.

This module owns COCO's 80 categories and their class ids, the decoding of COCO segmentations
without pycocotools (polygons, uncompressed and compressed RLE), the rendering of one semantic mask
from an image's instances, and the builder.

Expected layout of `root`::

    root/train2014/COCO_train2014_<12 digits>.jpg
    root/val2014/COCO_val2014_<12 digits>.jpg
    root/annotations/instances_train2014.json
    root/annotations/instances_val2014.json

Records (layout of `records`): `id` is the file name without extension; `labels` (80,) marks the
categories of all the image's annotations (crowd ones included: the class is in the image); `mask`
holds 0 background and 1..80 for the categories in increasing category-id order (1 person ...
80 toothbrush).

How the mask is rendered (`render_semantic_mask`), the rules of the field's COCO conversions:

* polygons are sampled at pixel centres (pixel (row i, column j) is inside when (j + 0.5, i + 0.5)
  is inside the polygon, even-odd rule), as pycocotools does up to its 1/5-pixel quantisation; the
  polygons of one instance are united;
* crowd regions (`iscrowd` 1, RLE) are painted first: 255 (ignored) with crowd="ignore", the
  default, or their class with crowd="class";
* instances are then painted from the largest (in rendered pixels) to the smallest, so where they
  overlap the smaller one, usually the one in front (a person on a horse), stays visible; equal
  areas keep the annotation order.

Images without any annotation (702 in train2014, 367 in val2014) are skipped and counted by default
(images_without_annotations="skip", giving the field's 82,081 train and 40,137 val images), or kept
as all-background images with no label ("background").
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging
from etils import epath

from puzzle_jax.data import manual_builder, readers
from puzzle_jax.labels import IGNORE_LABEL, BadExampleError

# COCO 2014's 80 categories as (category id, name), in increasing id order: class id = position + 1.
COCO_CATEGORIES: tuple[tuple[int, str], ...] = (
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"),
    (7, "train"), (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"),
    (13, "stop sign"), (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"),
    (18, "dog"), (19, "horse"), (20, "sheep"), (21, "cow"), (22, "elephant"), (23, "bear"),
    (24, "zebra"), (25, "giraffe"), (27, "backpack"), (28, "umbrella"), (31, "handbag"),
    (32, "tie"), (33, "suitcase"), (34, "frisbee"), (35, "skis"), (36, "snowboard"),
    (37, "sports ball"), (38, "kite"), (39, "baseball bat"), (40, "baseball glove"),
    (41, "skateboard"), (42, "surfboard"), (43, "tennis racket"), (44, "bottle"),
    (46, "wine glass"), (47, "cup"), (48, "fork"), (49, "knife"), (50, "spoon"), (51, "bowl"),
    (52, "banana"), (53, "apple"), (54, "sandwich"), (55, "orange"), (56, "broccoli"),
    (57, "carrot"), (58, "hot dog"), (59, "pizza"), (60, "donut"), (61, "cake"), (62, "chair"),
    (63, "couch"), (64, "potted plant"), (65, "bed"), (67, "dining table"), (70, "toilet"),
    (72, "tv"), (73, "laptop"), (74, "mouse"), (75, "remote"), (76, "keyboard"),
    (77, "cell phone"), (78, "microwave"), (79, "oven"), (80, "toaster"), (81, "sink"),
    (82, "refrigerator"), (84, "book"), (85, "clock"), (86, "vase"), (87, "scissors"),
    (88, "teddy bear"), (89, "hair drier"), (90, "toothbrush"),
)
COCO_CLASS_NAMES: tuple[str, ...] = tuple(name for _, name in COCO_CATEGORIES)
CLASS_OF_CATEGORY: Mapping[int, int] = {
    category_id: index + 1 for index, (category_id, _) in enumerate(COCO_CATEGORIES)
}

# split -> (image folder, annotation file), relative to root.
COCO2014_SPLITS: Mapping[str, tuple[str, str]] = {
    "train": ("train2014", "annotations/instances_train2014.json"),
    "val": ("val2014", "annotations/instances_val2014.json"),
}
# Images with at least one annotation: the split sizes of the field (ToCo, CoSA lists).
COCO2014_ANNOTATED_IMAGES: Mapping[str, int] = {"train": 82081, "val": 40137}

IMAGES_WITHOUT_ANNOTATIONS = ("skip", "background")
CROWD_RULES = ("ignore", "class")

_COCO_LAYOUT_HINT = (
    "ROOT/{train2014,val2014}/*.jpg and ROOT/annotations/instances_{train,val}2014.json "
    "(see puzzle_jax/data/coco.py)."
)


# --------------------------------------------------------------------------------------------------
# Segmentations: compressed RLE strings, RLE, polygons.
# --------------------------------------------------------------------------------------------------


def decode_rle_string(counts: str | bytes) -> list[int]:
    """Decodes COCO's compressed RLE string into run lengths.

    The format (pycocotools `rleToString`): each run length is written as 5-bit groups, least
    significant first, one character (value + 48) per group, bit 0x20 meaning "another group
    follows" and bit 0x10 of the last group the sign; from the fourth run on, the value written is
    the difference to the run two places before.

    Args:
      counts: the `counts` string of a compressed RLE.

    Returns:
      The run lengths (alternately background and foreground, starting with background).

    Raises:
      ValueError: for a character outside the format or a string that ends inside a number.
    """
    data = counts.encode("ascii") if isinstance(counts, str) else bytes(counts)
    runs: list[int] = []
    position = 0
    while position < len(data):
        value = 0
        shift = 0
        while True:
            if position >= len(data):
                raise ValueError("compressed RLE string ends inside a run length")
            group = data[position] - 48
            if not 0 <= group < 64:
                raise ValueError(
                    f"compressed RLE string has character {chr(data[position])!r} at {position}; "
                    "allowed: ASCII 48..111"
                )
            position += 1
            value |= (group & 0x1F) << shift
            shift += 5
            if not group & 0x20:
                if group & 0x10:  # Negative: sign-extend from the last group's top bit.
                    value -= 1 << shift
                break
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def rle_to_mask(counts: str | bytes | Sequence[int], height: int, width: int) -> np.ndarray:
    """Decodes an RLE (compressed string or list of run lengths) into a bool (height, width) mask.

    Runs go down the columns (column-major, as COCO), starting with a background run.

    Raises:
      ValueError: for negative runs or runs that do not cover height x width pixels exactly.
    """
    runs = decode_rle_string(counts) if isinstance(counts, (str, bytes)) else list(counts)
    runs_array = np.asarray(runs, np.int64)
    if runs_array.ndim != 1 or (runs_array.size and runs_array.min() < 0):
        raise ValueError("RLE counts must be a flat list of non-negative run lengths")
    total = int(runs_array.sum())
    if total != height * width:
        raise ValueError(
            f"RLE runs cover {total} pixels but the mask is {height}x{width} = {height * width}"
        )
    values = (np.arange(runs_array.size) % 2).astype(bool)
    return np.repeat(values, runs_array).reshape(width, height).T


def polygons_to_mask(polygons: Sequence[Sequence[float]], height: int, width: int) -> np.ndarray:
    """Rasterises COCO polygons ([x1, y1, x2, y2, ...] in pixels) into a bool (height, width) mask.

    A pixel is inside when its centre is inside a polygon (even-odd rule); the polygons are united.
    A scanline fill in NumPy rather than cv2.fillPoly: OpenCV also fills every pixel the outline
    touches, which makes a 4 x 3 box 5 x 4 pixels, while pycocotools samples pixel centres.

    Raises:
      ValueError: for a polygon with an odd number of coordinates.
    """
    mask = np.zeros((height, width), bool)
    for polygon in polygons:
        coordinates = np.asarray(polygon, np.float64)
        if coordinates.ndim != 1 or coordinates.size % 2:
            raise ValueError(f"polygon has {coordinates.size} coordinates; expected x, y pairs")
        if coordinates.size < 6:
            continue  # Fewer than three vertices enclose no pixel centre.
        x0, y0 = coordinates[0::2], coordinates[1::2]
        x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
        # Rows whose centre r + 0.5 lies in [min y, max y) of an edge: half-open, so a vertex on a
        # row centre is crossed once; horizontal edges cross nothing.
        first_row = np.clip(np.ceil(np.minimum(y0, y1) - 0.5), 0, height).astype(np.int64)
        stop_row = np.clip(np.ceil(np.maximum(y0, y1) - 0.5), 0, height).astype(np.int64)
        rows_per_edge = np.maximum(stop_row - first_row, 0)
        if not rows_per_edge.any():
            continue
        edge = np.repeat(np.arange(x0.size), rows_per_edge)
        starts = np.cumsum(rows_per_edge) - rows_per_edge
        row = first_row[edge] + np.arange(edge.size) - starts[edge]
        slope = (x1[edge] - x0[edge]) / (y1[edge] - y0[edge])
        crossing_x = x0[edge] + (row + 0.5 - y0[edge]) * slope
        # A crossing flips every pixel whose centre j + 0.5 lies to its right.
        first_flipped = np.clip(np.floor(crossing_x - 0.5) + 1, 0, width).astype(np.int64)
        top, bottom = int(row.min()), int(row.max()) + 1
        flips = np.zeros((bottom - top, width + 1), np.int32)
        np.add.at(flips, (row - top, first_flipped), 1)
        mask[top:bottom] |= (np.cumsum(flips, axis=1)[:, :width] % 2).astype(bool)
    return mask


def segmentation_to_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """bool (height, width) mask of one annotation's `segmentation` (polygons or RLE).

    Raises:
      ValueError: for an unknown segmentation type or an RLE whose size is not (height, width).
    """
    if isinstance(segmentation, list):
        return polygons_to_mask(segmentation, height, width)
    if isinstance(segmentation, dict) and "counts" in segmentation:
        size = [int(side) for side in segmentation.get("size", (height, width))]
        if size != [height, width]:
            raise ValueError(f"RLE size {size} differs from the image size {[height, width]}")
        return rle_to_mask(segmentation["counts"], height, width)
    raise ValueError(
        f"segmentation of type {type(segmentation).__name__} is neither polygons nor an RLE"
    )


def render_semantic_mask(
    annotations: Sequence[Mapping[str, Any]],
    height: int,
    width: int,
    *,
    crowd: str = "ignore",
    class_of_category: Mapping[int, int] = CLASS_OF_CATEGORY,
) -> np.ndarray:
    """Renders an image's instance annotations into one semantic mask (rules: module docstring).

    Args:
      annotations: COCO annotations of one image (`category_id`, `segmentation`, `iscrowd`).
      height: image height.
      width: image width.
      crowd: "ignore" (crowd regions 255) or "class" (crowd regions get their class).
      class_of_category: COCO category id -> class id 1..C.

    Returns:
      uint8 (height, width): 0 background, 1..C classes, 255 crowd regions with crowd="ignore".

    Raises:
      ValueError: for an unknown category id or a malformed segmentation.
    """
    manual_builder.check_policy("crowd", crowd, CROWD_RULES, "coco2014")
    mask = np.zeros((height, width), np.uint8)
    instances = []
    for annotation in annotations:
        category = annotation.get("category_id")
        if category not in class_of_category:
            raise ValueError(
                f"annotation {annotation.get('id')} has unknown category_id {category!r}; allowed: "
                f"{sorted(class_of_category)}"
            )
        region = segmentation_to_mask(annotation.get("segmentation"), height, width)
        class_id = class_of_category[category]
        if annotation.get("iscrowd", 0):
            mask[region] = IGNORE_LABEL if crowd == "ignore" else class_id
        else:
            instances.append((region, class_id))
    # Largest first, so that smaller instances end on top; sorted() is stable for equal areas.
    for region, class_id in sorted(instances, key=lambda item: -int(item[0].sum())):
        mask[region] = class_id
    return mask


def labels_of_annotations(
    annotations: Sequence[Mapping[str, Any]],
    class_of_category: Mapping[int, int] = CLASS_OF_CATEGORY,
) -> np.ndarray:
    """float32 (C,) multi-hot of the categories of all annotations (crowd ones included)."""
    labels = np.zeros((len(class_of_category),), np.float32)
    for annotation in annotations:
        labels[class_of_category[annotation["category_id"]] - 1] = 1.0
    return labels


# --------------------------------------------------------------------------------------------------
# The builder.
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CocoIndex:
    """What the builder keeps of an instances JSON file.

    Attributes:
      images: image id -> (file name, height, width).
      annotations: image id -> its annotations (only category_id, iscrowd, segmentation, id).
    """

    images: Mapping[int, tuple[str, int, int]]
    annotations: Mapping[int, list[dict[str, Any]]]


def load_instances(path: epath.PathLike) -> CocoIndex:
    """Reads an instances JSON file and checks its categories against COCO_CATEGORIES.

    Raises:
      FileNotFoundError: when the file does not exist.
      ValueError: for invalid JSON, other categories, duplicate image ids or annotations of unknown
        images (the message names the file).
    """
    path = epath.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"COCO annotation file {path} does not exist.")
    try:
        with path.open("rb") as file:
            content = json.load(file)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error}).") from error
    categories = sorted((int(c["id"]), str(c["name"])) for c in content.get("categories", []))
    if tuple(categories) != COCO_CATEGORIES:
        differences = sorted(set(categories) ^ set(COCO_CATEGORIES))[:10]
        raise ValueError(
            f"{path}: its categories are not COCO 2014's 80 (first differences (id, name): "
            f"{differences}); use the voc_folder dataset for other classes."
        )
    images: dict[int, tuple[str, int, int]] = {}
    for image in content.get("images", []):
        if image["id"] in images:
            raise ValueError(f"{path}: image id {image['id']} appears twice.")
        images[image["id"]] = (str(image["file_name"]), int(image["height"]), int(image["width"]))
    annotations: dict[int, list[dict[str, Any]]] = {}
    for annotation in content.get("annotations", []):
        if annotation["image_id"] not in images:
            raise ValueError(
                f"{path}: annotation {annotation.get('id')} refers to image id "
                f"{annotation['image_id']}, which is not in its images."
            )
        annotations.setdefault(annotation["image_id"], []).append({
            key: annotation.get(key) for key in ("id", "category_id", "iscrowd", "segmentation")
        })
    if not images:
        raise ValueError(f"{path}: lists no image.")
    return CocoIndex(images=images, annotations=annotations)


@dataclasses.dataclass(eq=False, kw_only=True)
class Coco2014Config(manual_builder.ManualDataConfig):
    """coco2014 options (see `create_builder`)."""

    images_without_annotations: str = "skip"
    crowd: str = "ignore"


class Coco2014(manual_builder.ManualDataBuilder):
    """MS COCO 2014 with semantic masks rendered from its instances (tfds name "coco2014")."""

    name = "coco2014"

    def _split_generators(self, dl_manager) -> dict[str, Iterator]:
        del dl_manager  # Everything is read from the root the user gives.
        root = epath.Path(self.builder_config.root)
        generators = {}
        for split in self.builder_config.splits:
            image_folder, annotation_file = COCO2014_SPLITS[split]
            image_dir, json_path = root / image_folder, root / annotation_file
            # Checked now, before any split is written; the JSON itself is read lazily, one split
            # at a time (train2014's takes gigabytes of memory while it is indexed).
            for needed, kind in ((image_dir, "image folder"), (json_path, "annotation file")):
                if not needed.exists():
                    raise FileNotFoundError(
                        f"coco2014 split {split!r}: {kind} {needed} does not exist. Expected "
                        f"layout: {_COCO_LAYOUT_HINT}"
                    )
            generators[split] = self._generate_coco_split(split, image_dir, json_path)
        return generators

    def _generate_coco_split(
        self, split: str, image_dir: epath.Path, json_path: epath.Path
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        config = self.builder_config
        index = load_instances(json_path)
        by_id: dict[str, int] = {}
        without_annotations = 0
        for image_id, (file_name, _, _) in index.images.items():
            if image_id not in index.annotations:
                without_annotations += 1
                if config.images_without_annotations == "skip":
                    continue
            example_id = os.path.splitext(file_name)[0]
            if example_id in by_id:
                raise ValueError(f"{json_path}: file name {file_name} appears twice.")
            by_id[example_id] = image_id
        example_ids = sorted(by_id)
        if not example_ids:
            raise ValueError(
                f"coco2014 split {split!r} is empty: {json_path} has no annotated image."
            )
        notes = {
            "images_in_json": len(index.images),
            "images_without_annotations": without_annotations,
            "images_without_annotations_rule": config.images_without_annotations,
            "crowd": config.crowd,
        }
        logging.info(
            "coco2014 %s: %d images in %s, %d without annotations (%s); the field uses %d.",
            split, len(index.images), json_path, without_annotations,
            config.images_without_annotations, COCO2014_ANNOTATED_IMAGES[split],
        )

        def load(example_id: str) -> dict[str, Any]:
            file_name, height, width = index.images[by_id[example_id]]
            annotations = index.annotations.get(by_id[example_id], [])
            image_path = image_dir / file_name
            image, image_height, image_width = readers.read_image(image_path)
            if (image_height, image_width) != (height, width):
                raise BadExampleError(
                    image_path,
                    f"image is {image_height}x{image_width} (HxW) but {json_path} says "
                    f"{height}x{width}",
                )
            try:
                mask = render_semantic_mask(annotations, height, width, crowd=config.crowd)
            except ValueError as error:
                raise BadExampleError(json_path, f"image {file_name}: {error}") from error
            return manual_builder.make_record(
                example_id, image=image, height=height, width=width, image_path=image_path,
                labels=labels_of_annotations(annotations), mask=mask, mask_path=json_path,
            )

        yield from self._generate_split(
            split, example_ids, load, source=os.fspath(json_path), notes=notes
        )


def _file_identity(path: epath.Path) -> list[Any] | None:
    """(size, modification time) of a large file: a cheap stand-in for its content's hash."""
    if not path.is_file():
        return None
    status = path.stat()
    return [status.length, status.mtime]


def create_builder(
    *,
    data_dir: str,
    root: str = "",
    splits: str | Sequence[str] | None = None,
    images_without_annotations: str = "skip",
    crowd: str = "ignore",
    on_bad_example: str = "error",
) -> Coco2014:
    """Returns the coco2014 builder for the user's COCO 2014 copy (not prepared yet).

    Args:
      data_dir: tfds data directory where the prepared copy is kept.
      root: folder of the downloaded data (layout: module docstring).
      splits: splits to prepare ("train,val" or a sequence); default both.
      images_without_annotations: "skip" (counted in the metadata) or "background".
      crowd: "ignore" (crowd regions 255) or "class".
      on_bad_example: "error" or "skip" (see manual_builder.ManualDataConfig).

    Returns:
      The builder; its config name hashes the root, the options and the annotation files' sizes and
      modification times.

    Raises:
      ValueError, FileNotFoundError: for a missing root or a bad option.
    """
    dataset = "coco2014"
    manual_builder.check_policy(
        "on_bad_example", on_bad_example, manual_builder.BAD_EXAMPLE_POLICIES, dataset
    )
    manual_builder.check_policy(
        "images_without_annotations", images_without_annotations, IMAGES_WITHOUT_ANNOTATIONS,
        dataset,
    )
    manual_builder.check_policy("crowd", crowd, CROWD_RULES, dataset)
    root_path = manual_builder.resolve_root(root, dataset, _COCO_LAYOUT_HINT)
    selected = manual_builder.parse_split_names(
        splits, tuple(COCO2014_SPLITS), dataset
    ) or tuple(COCO2014_SPLITS)
    digest = manual_builder.fingerprint({
        "root": os.fspath(root_path),
        "splits": selected,
        "images_without_annotations": images_without_annotations,
        "crowd": crowd,
        "on_bad_example": on_bad_example,
        "annotations": {
            split: _file_identity(root_path / COCO2014_SPLITS[split][1]) for split in selected
        },
    })
    config = Coco2014Config(
        name=manual_builder.make_config_name(root_path, digest),
        description=f"COCO 2014 from {root_path}, splits {list(selected)}.",
        root=os.fspath(root_path),
        class_names=COCO_CLASS_NAMES,
        splits=selected,
        on_bad_example=on_bad_example,
        images_without_annotations=images_without_annotations,
        crowd=crowd,
    )
    return Coco2014(config=config, data_dir=data_dir, file_format="array_record")
