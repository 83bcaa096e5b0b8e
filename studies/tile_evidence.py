"""How strongly a trained classifier sees each true class in the 2x2 tiles that Puzzle-CAM trains on.

Why it exists: in the Puzzle-CAM-vs-CAM study (``studies/puzzle_vs_cam.py``, ``studies/RESULTS.md``) Puzzle-CAM beats
plain CAM on the demo data and loses on the ``parts`` data (``studies/parts_dataset.py``), whose object bodies only
tell the group of three sibling classes (a faint tint tells the class) while a small emblem tells the class. The
hypothesis: a tile that shows an object's body but not its discriminative part carries little evidence for the
object's class on the parts data and a lot on the demo; Puzzle-CAM's tile losses (the merged tile maps' class loss
and the L1 pull of the full image's maps towards them) then teach the full-image CAMs to switch the body off on the
parts data (the maps shrink onto the emblem) and to spread over it on the demo. This script measures the first half.

For each image of a split (at its own size, normalised as inference does, zero-padded to a multiple of
``cam.grid x output_stride`` as ``objectives.create_puzzle_objective`` pads, and cut into ``cam.grid x cam.grid``
tiles with ``puzzle.tile``: exactly the tiles the puzzle branch feeds the classifier) it takes the classifier's class
probabilities (sigmoid of the logits, the global average of the class maps) of the whole padded image and of each
tile. The class mask and the part map (``data.records``: 1 body, 2 discriminative part) are padded and tiled the same
way (padding is no object). For each true class c of the image, a tile is

* ``part``: at least ``MIN_PART_SHARE`` of its pixels are c's discriminative part;
* ``body_only``: no pixel of c's part and at least ``MIN_BODY_SHARE`` of its pixels are c's body;
* ``absent``: no pixel of class c;

other tiles are not counted. Per category: the (image, class, tile) cases, the mean probability of the true class,
the share above 0.5, and the mean of the highest probability among the classes not in the image (what a body-only
tile is mistaken for); the whole image's numbers for comparison. Run from the repository root::

    python -m studies.tile_evidence --workdir RUN_DIR [--model EXPORT_DIR] [--split SPLIT] [--limit N]
        [--out FILE.json] [--devices N]

``RUN_DIR`` is a pipeline workdir (e.g. ``runs/study/parts/base/cl_seed0``); its recorded config (``config.txt``)
names the dataset, the grid and, by default, the split (``infer.split``). ``--model`` defaults to
``RUN_DIR/train_cam/model``; it may be another classifier export, a stage name of the workdir (``pretrain``), or
``init_from`` (the export ``train_cam`` started from: the study's shared ``<dataset>/pretrain_<hash>/pretrain/model``).
Writes ``RUN_DIR/tile_evidence.json`` (``tile_evidence-<model>.json`` for another ``--model``) and prints a table.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import yaml

from puzzle_jax import batched_inference, checkpointing, fileio, pipeline, progress, puzzle, sharding
from puzzle_jax.data import datasets
from puzzle_jax.data.records import PART_BODY, PART_DISCRIMINATIVE

# A tile holds an object's discriminative part when at least this share of its pixels are that part: one stray pixel
# of an emblem's edge is no evidence, while a whole emblem is only a few percent of a tile.
MIN_PART_SHARE = 0.01
# A tile without the part shows the object's body when at least this share of its pixels are body: a sliver of body
# along a tile's border is too little to carry evidence either way.
MIN_BODY_SHARE = 0.05
CATEGORIES = ("part", "body_only", "absent")
# What the whole image is reported as, beside the categories.
FULL_IMAGE = "full_image"
# A true-class probability above this counts as the class being seen.
PRESENT_PROBABILITY = 0.5


# --------------------------------------------------------------------------------------------------
# The pure part: tiling the label maps, categorising tiles, accumulating the statistics.
# --------------------------------------------------------------------------------------------------


def tile_map(label_map: np.ndarray, grid: int, multiple: int) -> np.ndarray:
    """An ``(H, W)`` label map zero-padded (bottom and right) to multiples of ``multiple`` and cut into ``grid x grid``
    tiles in ``puzzle.tile``'s order: ``(grid * grid, H' / grid, W' / grid)``.

    The same functions pad and tile the images (``pad_to_multiple``'s zero fill is background in a class mask and
    ``PART_NONE`` in a part map), so tile k of the map covers exactly the pixels of the classifier's tile k.
    """
    padded, _ = puzzle.pad_to_multiple(np.asarray(label_map)[None, :, :, None], multiple)
    return puzzle.tile(padded, grid)[..., 0]


def tile_category(mask_tile: np.ndarray, part_tile: np.ndarray, class_value: int) -> str | None:
    """The category (``CATEGORIES``) of one tile for the class whose mask value is ``class_value``, or None.

    Shares are of all the tile's pixels, padding and void included.
    """
    of_class = mask_tile == class_value
    if not of_class.any():
        return "absent"
    pixels = mask_tile.size
    part = np.count_nonzero(of_class & (part_tile == PART_DISCRIMINATIVE))
    if part >= MIN_PART_SHARE * pixels:
        return "part"
    body = np.count_nonzero(of_class & (part_tile == PART_BODY))
    if part == 0 and body >= MIN_BODY_SHARE * pixels:
        return "body_only"
    return None


class TileEvidence:
    """Accumulates the statistics of ``CATEGORIES`` and of the whole images over a split, image by image."""

    def __init__(self) -> None:
        names = (*CATEGORIES, FULL_IMAGE)
        self._true = {name: [] for name in names}
        self._top_other = {name: [] for name in names}
        self.images = 0

    def add(
        self,
        image_probabilities: np.ndarray,
        tile_probabilities: np.ndarray,
        labels: np.ndarray,
        mask_tiles: np.ndarray,
        part_tiles: np.ndarray,
    ) -> None:
        """Adds one image.

        Args:
          image_probabilities: ``(C,)`` class probabilities of the whole (padded) image.
          tile_probabilities: ``(T, C)`` of its tiles, in ``puzzle.tile``'s order.
          labels: ``(C,)`` multi-hot image-level labels; class index j is mask value j + 1.
          mask_tiles: ``(T, h, w)`` class mask tiles (``tile_map``).
          part_tiles: ``(T, h, w)`` part map tiles.
        """
        image_probabilities = np.asarray(image_probabilities, np.float64)
        tile_probabilities = np.asarray(tile_probabilities, np.float64)
        present = np.asarray(labels) > 0
        if tile_probabilities.shape[0] != mask_tiles.shape[0] or mask_tiles.shape != part_tiles.shape:
            raise ValueError(
                f"{tile_probabilities.shape[0]} tiles of probabilities for mask tiles {mask_tiles.shape} and part "
                f"tiles {part_tiles.shape}."
            )
        self.images += 1
        # Classes not in the image: how high the classifier puts any of them (none when every class is present).
        others = ~present

        def top_other(probabilities):
            return float(probabilities[others].max()) if others.any() else None

        for class_index in np.flatnonzero(present):
            self._add_case(FULL_IMAGE, image_probabilities[class_index], top_other(image_probabilities))
            for tile in range(mask_tiles.shape[0]):
                category = tile_category(mask_tiles[tile], part_tiles[tile], class_index + 1)
                if category is not None:
                    probabilities = tile_probabilities[tile]
                    self._add_case(category, probabilities[class_index], top_other(probabilities))

    def _add_case(self, name: str, true_probability: float, top_other: float | None) -> None:
        self._true[name].append(float(true_probability))
        if top_other is not None:
            self._top_other[name].append(top_other)

    def result(self) -> dict[str, Any]:
        """``{"images": ..., "categories": {name: stats}, "full_image": stats}``; stats: ``cases``,
        ``mean_true_probability``, ``share_above_half``, ``mean_top_other_probability`` (over the cases whose image
        lacks some class; ``cases_with_other_classes`` of them), None where there are no cases."""

        def stats(name):
            true, other = np.asarray(self._true[name]), np.asarray(self._top_other[name])
            return {
                "cases": int(true.size),
                "mean_true_probability": float(true.mean()) if true.size else None,
                "share_above_half": float((true > PRESENT_PROBABILITY).mean()) if true.size else None,
                "mean_top_other_probability": float(other.mean()) if other.size else None,
                "cases_with_other_classes": int(other.size),
            }

        return {
            "images": self.images,
            "categories": {name: stats(name) for name in CATEGORIES},
            FULL_IMAGE: stats(FULL_IMAGE),
        }


def format_table(result: Mapping[str, Any], title: str) -> str:
    """The result as a small text table."""

    def shown(value, percent=False):
        if value is None:
            return "n/a"
        return f"{100 * value:.1f}%" if percent else f"{value:.3f}"

    lines = [title, f"{'':<12}{'cases':>7}  {'P(true)':>8}  {'P>0.5':>7}  {'max P(other)':>12}"]
    rows = [(FULL_IMAGE.replace("_", " "), result[FULL_IMAGE])]
    rows += [(name, result["categories"][name]) for name in CATEGORIES]
    for name, stats in rows:
        lines.append(
            f"{name:<12}{stats['cases']:>7}  {shown(stats['mean_true_probability']):>8}  "
            f"{shown(stats['share_above_half'], True):>7}  {shown(stats['mean_top_other_probability']):>12}"
        )
    lines.append(
        f"(tiles: part >= {MIN_PART_SHARE:.0%} of the tile is the class's part; body_only: none of its part, >= "
        f"{MIN_BODY_SHARE:.0%} its body; absent: no pixel of the class)"
    )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# The run: config, dataset, model, inference.
# --------------------------------------------------------------------------------------------------


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a pipeline workdir was last run with (``pipeline.Workdir.config_file``, written as YAML by
    ``pipeline.run_stages``), as a ConfigDict.

    Raises:
      FileNotFoundError: the workdir has no recorded config.
    """
    path = pipeline.Workdir(workdir).config_file()
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} does not exist: --workdir must be a pipeline workdir that has run (python -m puzzle_jax.main "
            "--workdir=... records its config there), e.g. runs/study/parts/base/cl_seed0."
        )
    with open(path) as handle:
        # FullLoader: the config holds tuples (!!python/tuple) but nothing that runs code.
        return ml_collections.ConfigDict(yaml.load(handle, Loader=yaml.FullLoader))


def resolve_model(workdir: str, config, model: str | None) -> str:
    """The classifier export to score: ``train_cam``'s by default, a stage name's of this workdir, ``init_from``
    (the export train_cam started from) or a folder.

    Raises:
      FileNotFoundError: the folder is not an export, naming how to get one.
    """
    layout = pipeline.Workdir(workdir)
    if model is None:
        path = layout.exported_model("train_cam")
    elif model == "init_from":
        if not config.train_cam.init_from:
            raise FileNotFoundError(f"--model init_from: {layout.config_file()} has an empty train_cam.init_from.")
        path = os.path.expanduser(layout.resolve_init_from(config.train_cam.init_from))
    else:
        path = os.path.expanduser(layout.resolve_init_from(model))
    if not checkpointing.is_exported_model(path):
        raise FileNotFoundError(
            f"{path} is not an exported classifier (no finished training stage wrote it): run the workdir's train_cam "
            "stage to the end, or give --model an exported classifier folder (e.g. <dataset>/pretrain_<hash>/"
            "pretrain/model of the study), a stage name of this workdir, or init_from."
        )
    return path


def load_split_with_parts(config, split: str):
    """The split's records with their masks and part maps, as the evaluating stages read them.

    Raises:
      ValueError: the dataset declares no part maps.
    """
    source, info = datasets.load_split_from_config(config.data, split, field="--split")
    if "parts" not in info.tfds_info.features:
        raise ValueError(
            f"Dataset {config.data.dataset!r} (root {config.data.root!r}) has no part maps, which this measure needs: "
            "use the built-in puzzle_demo or a voc_folder dataset with SegmentationParts/ (e.g. the study's parts "
            "data, python -m studies.parts_dataset)."
        )
    return source, info


class _Probabilities:
    """An image's ``(1 + T, C)`` probabilities (whole image, then its tiles), kept with its record."""

    def __init__(self, record: Mapping[str, Any]):
        self.record = record
        self.probabilities = None

    def add(self, outputs: np.ndarray, input_size: tuple[int, int]) -> None:
        del input_size  # the whole padded input is what training feeds the classifier
        self.probabilities = outputs[0]

    def result(self) -> tuple[Mapping[str, Any], np.ndarray]:
        return self.record, self.probabilities


def iterate_probabilities(
    model, records, *, grid: int, output_stride: int, num_devices: int = 0, images_per_call: int = 8
) -> Iterator[tuple[str, tuple[Mapping[str, Any], np.ndarray]]]:
    """``(index, (record, probabilities (1 + grid**2, C)))`` of every record, in completion order: one call of the
    batched inference engine computes an image's whole-image and tile probabilities.

    The engine pads each image (uint8, normalised on the device with zeros outside the image, as inference does) to
    multiples of ``grid * output_stride``: the zero padding of ``objectives.create_puzzle_objective``.
    """
    mesh = sharding.create_local_mesh(num_devices)

    def probabilities(classifier, images):
        logits, _ = classifier(images)
        tile_logits, _ = classifier(puzzle.tile(images, grid))
        tile_logits = tile_logits.reshape(images.shape[0], grid * grid, -1)
        return jax.nn.sigmoid(jnp.concatenate([logits[:, None], tile_logits], axis=1).astype(np.float32))

    forward = batched_inference.create_forward(model, probabilities, mesh)
    return batched_inference.iterate_batched(
        forward,
        ((str(index), record) for index, record in enumerate(records)),
        prepare=lambda record: [(record["image"],)],
        create_accumulator=_Probabilities,
        group_size=1,
        images_per_call=images_per_call,
        pad_multiple=grid * output_stride,
        batch_multiple=mesh.devices.size,
        host_threads=1,  # preparing an input is a reference to the decoded image: nothing to run ahead
    )


def measure(
    model, model_config: Mapping[str, Any], records: Iterable[Mapping[str, Any]], *, grid: int, total: int | None,
    num_devices: int = 0, show_progress: bool = True,
) -> dict[str, Any]:
    """The ``TileEvidence`` result of a classifier on records with ``image``, ``labels``, ``mask`` and ``parts``
    (``total`` of them, for the progress line)."""
    output_stride = int(model_config["output_stride"])
    multiple = grid * output_stride
    evidence = TileEvidence()
    results = iterate_probabilities(model, records, grid=grid, output_stride=output_stride, num_devices=num_devices)
    for _, (record, probabilities) in progress.track(
        results, description="tile_evidence", total=total, enabled=show_progress
    ):
        if record["parts"].shape != record["mask"].shape:
            raise ValueError(f"Image {record['id']}: part map {record['parts'].shape} != mask {record['mask'].shape}.")
        evidence.add(
            probabilities[0], probabilities[1:], record["labels"],
            tile_map(record["mask"], grid, multiple), tile_map(record["parts"], grid, multiple),
        )
    return evidence.result()


def default_out(workdir: str, model: str | None) -> str:
    """``RUN_DIR/tile_evidence.json`` for train_cam's export; another model's result gets its own file."""
    if model is None:
        return os.path.join(workdir, "tile_evidence.json")
    parts = [part for part in os.path.normpath(model).split(os.sep) if part not in ("", ".", "..", "model")]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(parts[-2:]) or "model")
    return os.path.join(workdir, f"tile_evidence-{name}.json")


def run(
    workdir: str, *, model: str | None = None, split: str | None = None, limit: int = 0, out: str | None = None,
    num_devices: int = 0,
) -> dict[str, Any]:
    """Measures, prints and writes the tile evidence of a workdir's classifier (see the module docstring)."""
    config = load_run_config(workdir)
    model_path = resolve_model(workdir, config, model)
    split = split or config.infer.split
    source, info = load_split_with_parts(config, split)
    classifier, model_config = checkpointing.load_exported(model_path, family="classifier")
    if int(model_config["num_classes"]) != info.num_classes:
        raise ValueError(
            f"{model_path} classifies {model_config['num_classes']} classes; dataset {config.data.dataset!r} has "
            f"{info.num_classes}: give --model a classifier trained on this dataset."
        )
    count = min(limit, len(source)) if limit > 0 else len(source)
    # Decoded one by one as the engine asks for them: a split's masks need not all be in memory at once.
    records = (source[index] for index in range(count))
    grid = int(config.cam.grid)
    result = measure(classifier, model_config, records, grid=grid, total=count, num_devices=num_devices)
    out = out or default_out(workdir, model)
    payload = {
        **result,
        "workdir": os.path.abspath(workdir),
        "model": os.path.abspath(model_path),
        "dataset": config.data.dataset,
        "split": split,
        "split_images": len(source),
        "grid": grid,
        "pad_multiple": grid * int(model_config["output_stride"]),
        "min_part_share": MIN_PART_SHARE,
        "min_body_share": MIN_BODY_SHARE,
    }
    print(format_table(result, f"Tile evidence of {model_path} on {config.data.dataset} {split} "
                               f"({count} images, {grid}x{grid} tiles of the padded image)"), flush=True)
    fileio.write_json(out, payload)
    print(f"written: {out}", flush=True)
    return payload


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m studies.tile_evidence", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="a pipeline workdir (its config.txt names the dataset)")
    parser.add_argument(
        "--model", help="classifier export: a folder, a stage name of the workdir, or init_from (default: train_cam's)"
    )
    parser.add_argument("--split", help="split to measure (default: the workdir's infer.split)")
    parser.add_argument("--limit", type=int, default=0, help="only the first N images (0 = all)")
    parser.add_argument("--out", help="JSON file (default: RUN_DIR/tile_evidence.json)")
    parser.add_argument("--devices", type=int, default=0, help="devices each call is split over (0 = all)")
    args = parser.parse_args(argv)
    if args.limit < 0:
        parser.error("--limit must be >= 0")
    try:
        run(args.workdir, model=args.model, split=args.split, limit=args.limit, out=args.out,
            num_devices=args.devices)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
