"""Standalone evaluator: ``python -m puzzle_jax.evaluate --pred DIR --gt DIR [--ids FILE] [--allow-missing]
[--sweep | --threshold T] [--parts DIR] [--json F]``.

Scores a folder of predictions against a folder of ground-truth label PNGs, matched by file name stem. The images
scored are those of ``--ids`` (a split list such as VOC's ``ImageSets/Segmentation/train.txt``), else every ground-
truth PNG; only their files ``<id>.npz`` / ``<id>.png`` are read (hidden files, e.g. a killed writer's temporary, and
other files are not). An image without a prediction is an error naming the count and the first ids, unless
``--allow-missing``, which scores the others and prints the count:

* ``.npz`` CAM files (``cam_files``: ``keys`` and ``hr_cam``, or a random walk's ``rw``): a background
  channel at the threshold is added and the argmax taken; ``--sweep`` tries every threshold of ``--thresholds``
  (the authors' 0.05..0.75 by default) and reports the best. With ``--parts DIR`` (part maps ``<stem>.png``, grey or
  palette PNGs of 0 not an object or unknown, 1 an object's body, 2 its discriminative part, 255 ignored; see
  ``data.records``), it also reports how much of the objects' bodies and discriminative parts the CAMs recover at
  the best threshold; a prediction without a part map adds nothing to that.
* ``.png`` label maps (pseudo labels, segmentation outputs): scored as they are. Pixels predicted as 255 (uncertain)
  are not standard: both policies are reported, the VOC devkit's (counted as wrong) as the headline and ToCo's
  (ignored) beside it, and the policy is printed.

One confusion matrix over the whole folder (every class including background; GT 255 ignored), accumulated in
int64 with vectorised counting. mIoU is the mean over classes present in the GT or the prediction (a class absent
from both is reported as absent, not as 0; on VOC train/val every class is present, so this equals the authors'
number).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator, Sequence

import numpy as np

from puzzle_jax import fileio, progress
from puzzle_jax.data import records, voc
from puzzle_jax.evaluation import cam_scoring, miou, report
from puzzle_jax.labels import read_label_png


def _stems(directory: str, extension: str) -> dict[str, str]:
    # Hidden files (an atomic writer's temporary, editors' and systems' files) are never predictions.
    return {
        os.path.splitext(name)[0]: os.path.join(directory, name)
        for name in sorted(os.listdir(directory))
        if name.endswith(extension) and not name.startswith(".")
    }


def read_ids(path: str) -> list[str]:
    """The ids of a split list: the first word of each non-empty line (VOC's ``ImageSets`` format)."""
    try:
        with open(path) as handle:
            ids = [line.split()[0] for line in handle if line.strip()]
    except OSError as error:
        raise FileNotFoundError(f"{path}: cannot read the id list ({error}).") from error
    if not ids:
        raise ValueError(f"{path}: the id list is empty.")
    return ids


def _first(ids: Sequence[str], count: int = 5) -> str:
    return ", ".join(ids[:count]) + (", ..." if len(ids) > count else "")


def evaluate_folders(
    prediction_dir: str,
    ground_truth_dir: str,
    *,
    class_names: Sequence[str],
    thresholds: Sequence[float] | None,
    show_progress: bool = True,
    parts_dir: str | None = None,
    ids: Sequence[str] | None = None,
    allow_missing: bool = False,
) -> dict:
    """Scores the predictions in ``prediction_dir`` against the PNGs of the same name in ``ground_truth_dir``.

    Args:
      prediction_dir: ``.npz`` CAM files or ``.png`` label maps (not both).
      ground_truth_dir: label PNGs (palette, grey or VOC-coloured; 255 = void).
      class_names: all class names, background first.
      thresholds: background thresholds for CAM files (one value = a fixed threshold); unused for PNGs.
      show_progress: draw a progress bar.
      parts_dir: for CAM files, optional part maps ``<stem>.png`` (``records.read_parts_png``); predictions
        without one add nothing to the part recall.
      ids: the images to score (a split); None = every ground-truth PNG. Only their predictions are read.
      allow_missing: score the images that have a prediction when some have none (else an error).

    Returns:
      ``miou`` (percent), ``per_class_iou`` (percent, None for absent classes), ``num_images`` (scored),
      ``num_missing`` and ``missing_ids`` (the first 20 images without a prediction), for CAMs also
      ``best_threshold`` and the per-threshold mIoU (and with ``parts_dir`` the part recall entries of
      ``report.parts_for_json``), for PNGs also ``miou_ignoring_predicted_void``.

    Raises:
      FileNotFoundError: a folder is missing, holds no prediction, a prediction has no ground truth, images have
        no prediction (without ``allow_missing``; the count and the first ids named), or no prediction has a part
        map in ``parts_dir``.
      ValueError: unreadable files, size mismatches, mixed prediction types or part values outside 0/1/2/255, naming
        the file; ``parts_dir`` with label PNG predictions.
    """
    for directory in (prediction_dir, ground_truth_dir) + ((parts_dir,) if parts_dir is not None else ()):
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"{directory}: no such folder.")
    cam_predictions, png_predictions = _stems(prediction_dir, ".npz"), _stems(prediction_dir, ".png")
    if cam_predictions and png_predictions:
        raise ValueError(f"{prediction_dir} holds both .npz CAMs and .png labels; give a folder with one kind.")
    predictions = cam_predictions or png_predictions
    if not predictions:
        raise FileNotFoundError(f"{prediction_dir}: no .npz or .png predictions found.")
    extension = ".npz" if cam_predictions else ".png"
    ground_truths = _stems(ground_truth_dir, ".png")
    if ids is not None:
        expected = list(dict.fromkeys(ids))
        predictions = {stem: path for stem, path in predictions.items() if stem in set(expected)}
        without_ground_truth = [stem for stem in expected if stem not in ground_truths]
    else:
        expected = sorted(ground_truths)
        without_ground_truth = sorted(set(predictions) - set(ground_truths))
    if without_ground_truth:
        what = "listed id(s)" if ids is not None else f"prediction(s) of {prediction_dir}"
        raise FileNotFoundError(
            f"{len(without_ground_truth)} {what} have no ground truth in {ground_truth_dir} (first: "
            f"{_first([stem + '.png' for stem in without_ground_truth])})."
        )
    missing = [stem for stem in expected if stem not in predictions]
    if missing and not allow_missing:
        raise FileNotFoundError(
            f"{len(missing)} of {len(expected)} images have no prediction in {prediction_dir} (first: "
            f"{_first([stem + extension for stem in missing])}). Finish the stage that writes them; to score only "
            "the ones found, pass --allow-missing"
            + ("" if ids is not None else "; to score one split of a larger ground-truth folder, pass --ids FILE")
            + "."
        )
    if not predictions:
        raise FileNotFoundError(f"{prediction_dir}: none of the {len(expected)} images has a prediction.")
    missing_summary = {"num_missing": len(missing), "missing_ids": missing[:20]}
    num_classes = len(class_names)
    stems = sorted(predictions)
    if parts_dir is not None and not cam_predictions:
        raise ValueError(f"--parts applies to CAM predictions (.npz); {prediction_dir} holds label PNGs.")
    part_maps = _stems(parts_dir, ".png") if parts_dir is not None else {}
    if parts_dir is not None and not set(part_maps) & set(predictions):
        raise FileNotFoundError(f"{parts_dir}: no part map <stem>.png matches a prediction of {prediction_dir}.")
    if cam_predictions:

        def pairs() -> Iterator[cam_scoring.ScoredImage]:
            for stem in stems:
                ground_truth = read_label_png(ground_truths[stem], num_classes - 1)
                parts = records.read_parts_png(part_maps[stem]) if stem in part_maps else None
                if parts is not None and parts.shape != ground_truth.shape:
                    raise ValueError(
                        f"{part_maps[stem]}: part map of size {parts.shape} differs from its ground truth "
                        f"{ground_truths[stem]} {ground_truth.shape}."
                    )
                yield cam_scoring.ScoredImage(predictions[stem], ground_truth, ground_truths[stem], parts)

        result = cam_scoring.sweep_cam_files(
            pairs(),
            num_classes=num_classes,
            thresholds=thresholds if thresholds is not None else miou.DEFAULT_THRESHOLDS,
            total=len(stems),
            show_progress=show_progress,
        )
        return {
            "miou": result["miou"],
            "best_threshold": result["best_threshold"],
            "per_class_iou": report.ious_for_json(result["per_class_iou"]),
            "thresholds": result["thresholds"],
            "per_threshold_miou": result["per_threshold_miou"],
            "num_images": result["num_images"],
            "prediction_kind": "cam",
            **missing_summary,
            **report.parts_for_json(result),
        }
    confusion = np.zeros((num_classes, num_classes + 1), np.int64)
    for stem in progress.track(stems, description="evaluate", enabled=show_progress):
        ground_truth = read_label_png(ground_truths[stem], num_classes - 1)
        prediction = read_label_png(predictions[stem], num_classes - 1)
        if prediction.shape != ground_truth.shape:
            raise ValueError(
                f"{predictions[stem]}: size {prediction.shape} differs from its ground truth {ground_truth.shape}."
            )
        confusion += miou.confusion_matrix(prediction, ground_truth, num_classes)
    return {**report.label_summary(confusion, len(predictions)), "prediction_kind": "label", **missing_summary}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m puzzle_jax.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pred", required=True, help="folder of .npz CAMs or .png label maps")
    parser.add_argument("--gt", required=True, help="folder of ground-truth label PNGs (255 = void)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--sweep", action="store_true", help="CAMs: sweep the background threshold (the default)")
    group.add_argument("--threshold", type=float, help="CAMs: one fixed background threshold")
    parser.add_argument("--thresholds", default="0.05,0.75,0.05", help="sweep as start,stop,step (stop included)")
    parser.add_argument("--classes", help="text file of foreground class names, one per line (default: VOC's 20)")
    parser.add_argument(
        "--parts",
        help="CAMs: folder of part maps <stem>.png (0 none, 1 body, 2 discriminative part, 255 ignored); reports how "
        "much of bodies and parts the CAMs recover",
    )
    parser.add_argument(
        "--ids",
        help="text file of the image ids to score, one per line (e.g. VOC2012/ImageSets/Segmentation/train.txt); "
        "default: every PNG of --gt",
    )
    parser.add_argument(
        "--allow-missing",
        action="store_true",
        help="score the images that have a prediction and print how many have none (default: an error)",
    )
    parser.add_argument("--json", help="also write the result to this JSON file")
    options = parser.parse_args(argv)
    names = voc.VOC_CLASS_NAMES
    if options.classes:
        with open(options.classes) as handle:
            names = tuple(line.strip() for line in handle if line.strip())
    class_names = ["background", *names]
    thresholds = (
        [options.threshold]
        if options.threshold is not None
        else miou.threshold_range(*(float(part) for part in options.thresholds.split(","))).tolist()
    )
    try:
        result = evaluate_folders(
            options.pred, options.gt, class_names=class_names, thresholds=thresholds, parts_dir=options.parts,
            ids=read_ids(options.ids) if options.ids else None, allow_missing=options.allow_missing,
        )
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if result["num_missing"]:
        print(
            f"warning: {result['num_missing']} of {result['num_missing'] + result['num_images']} images have no "
            f"prediction in {options.pred} (first: {_first(result['missing_ids'])}); scored the "
            f"{result['num_images']} found (--allow-missing).",
            file=sys.stderr,
        )
    if result["prediction_kind"] == "cam":
        print(report.format_sweep_table(class_names, result))
    else:
        print(report.format_label_table(class_names, result))
    if options.json:
        fileio.write_json(options.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
