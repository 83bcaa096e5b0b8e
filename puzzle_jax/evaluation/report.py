"""Printed tables and JSON summaries of evaluation results (per-class IoU, the threshold sweep and its part recall)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from puzzle_jax.evaluation import miou


def ious_for_json(values) -> list:
    """Per-class IoUs with NaN (a class absent from both GT and prediction) as None: JSON has no NaN."""
    return [None if value is None or np.isnan(value) else float(value) for value in values]


def parts_for_json(result: dict) -> dict:
    """The part recall entries of a ``ThresholdSweep.result()``, JSON-ready (NaN, a part without pixels, as None);
    empty when the sweep had no part maps.

    Returns:
      ``part_recall`` ({"body": fraction, "part": fraction} at the best threshold), ``per_threshold_part_recall``
      (per part, threshold -> fraction), ``part_pixels`` and ``num_images_with_parts``.
    """
    if "part_recall" not in result:
        return {}
    thresholds = list(map(str, result["thresholds"]))
    return {
        "part_recall": dict(zip(result["part_recall"], ious_for_json(result["part_recall"].values()))),
        "per_threshold_part_recall": {
            name: dict(zip(thresholds, ious_for_json(values)))
            for name, values in result["per_threshold_part_recall"].items()
        },
        "part_pixels": dict(result["part_pixels"]),
        "num_images_with_parts": result["num_images_with_parts"],
    }


def threshold_decimals(thresholds: Sequence[float]) -> int:
    """The decimals that print every threshold of a sweep exactly (at least 2, at most 6), so that a fine sweep
    (e.g. 0.001 steps) does not print as repeated 0.00, 0.01, ..."""
    for decimals in range(2, 7):
        if all(abs(round(t, decimals) - t) < 1e-9 for t in thresholds):
            return decimals
    return 6


def threshold_text(threshold: float) -> str:
    """One threshold printed with the decimals it needs (at least 2)."""
    return f"{threshold:.{threshold_decimals([threshold])}f}"


def format_part_recall(result: dict) -> str | None:
    """The line that reports a sweep's part recall at its best threshold; None when it had no part maps."""
    if "part_recall" not in result:
        return None

    def shown(name: str) -> str:
        value = result["part_recall"][name]
        return "n/a" if value is None or np.isnan(value) else f"{100.0 * value:.1f}%"

    pixels = result["part_pixels"]
    decimals = threshold_decimals(result["thresholds"])
    return (
        f"object recall at threshold {result['best_threshold']:.{decimals}f}: body {shown('body')}, "
        f"discriminative part {shown('part')} (of {pixels['body']} body and {pixels['part']} part pixels in "
        f"{result['num_images_with_parts']} images with part maps)"
    )


def _per_class_lines(class_names: Sequence[str], per_class_iou, miou: float) -> list[str]:
    width = max(len(name) for name in list(class_names) + ["mIoU"]) + 2
    lines = [f"{'class':<{width}}{'IoU %':>8}"]
    for name, iou in zip(class_names, per_class_iou):
        shown = "absent" if iou is None or np.isnan(iou) else f"{iou:.2f}"
        lines.append(f"{name:<{width}}{shown:>8}")
    lines.append(f"{'mIoU':<{width}}{miou:>8.2f}")
    return lines


def format_sweep_table(class_names: Sequence[str], result: dict, *, title: str = "CAM mIoU") -> str:
    """Formats a ``ThresholdSweep.result()`` as a per-class table followed by the per-threshold mIoU, the part
    recall at the best threshold (when the sweep had part maps) and a warning when the best threshold is at an end
    of the sweep.

    Args:
      class_names: names of all classes, background first.
      result: the sweep result (``per_class_iou`` and ``miou`` in percent).
      title: heading line.
    """
    decimals = threshold_decimals(result["thresholds"])
    lines = [
        f"{title}: {result['miou']:.2f}% at background threshold {result['best_threshold']:.{decimals}f} "
        f"({result['num_images']} images)",
        *_per_class_lines(class_names, result["per_class_iou"], result["miou"]),
    ]
    lines.append(
        "threshold sweep: "
        + "  ".join(f"{t:.{decimals}f}:{m:.1f}" for t, m in zip(result["thresholds"], result["per_threshold_miou"]))
    )
    part_recall = format_part_recall(result)
    if part_recall is not None:
        lines.append(part_recall)
    edge = sweep_edge(result)
    if edge is not None:
        lines.append(
            f"warning: the best threshold is the {edge} one swept, so the best may lie beyond the sweep: extend it "
            "(config eval.threshold_range, or the evaluator's --thresholds)."
        )
    return "\n".join(lines)


def sweep_edge(result: dict) -> str | None:
    """``"lowest"`` or ``"highest"`` when a sweep's best threshold is at an end of its range (the range is then too
    narrow to be sure of the best), else None."""
    thresholds = result["thresholds"]
    if len(thresholds) < 2:
        return None
    if result["best_threshold"] == thresholds[0]:
        return "lowest"
    if result["best_threshold"] == thresholds[-1]:
        return "highest"
    return None


def sweep_summary(class_names: Sequence[str], result: dict) -> dict:
    """The JSON summary of a ``ThresholdSweep.result()``: ``miou``, ``best_threshold``, ``per_class_iou`` and
    ``per_threshold_miou`` keyed by class name and threshold (absent classes as None), whether the best threshold
    is at an end of the sweep (``sweep_edge``), ``num_images``, and when the sweep had part maps the part recall
    (``parts_for_json``)."""
    return {
        "miou": result["miou"],
        "best_threshold": result["best_threshold"],
        "per_class_iou": dict(zip(class_names, ious_for_json(result["per_class_iou"]))),
        "per_threshold_miou": dict(zip(map(str, result["thresholds"]), result["per_threshold_miou"])),
        "best_threshold_at_sweep_edge": sweep_edge(result),
        "num_images": result["num_images"],
        **parts_for_json(result),
    }


def label_summary(confusion: np.ndarray, num_images: int) -> dict:
    """The JSON-ready scores of label maps that may hold 255 (uncertain) from their ``(C, C + 1)`` confusion matrix
    (``miou.confusion_matrix``): both policies for predicted 255 and the authors' FP / FN (``format_label_table``).
    """
    false_positive, false_negative = miou.false_positive_negative_rates(confusion)
    return {
        "miou": float(miou.mean_iou(confusion)),
        "per_class_iou": ious_for_json(100.0 * miou.iou_from_confusion(confusion)),
        "miou_ignoring_predicted_void": float(miou.mean_iou(confusion, invalid_predictions="ignore")),
        "predicted_void_pixels": int(np.asarray(confusion)[:, -1].sum()),
        "false_positive": float(false_positive),
        "false_negative": float(false_negative),
        "num_images": int(num_images),
    }


def format_label_table(class_names: Sequence[str], result: dict, *, title: str = "Label mIoU") -> str:
    """Formats the result of scoring label maps, with the policy for pixels predicted as 255 spelled out."""
    lines = [
        f"{title}: {result['miou']:.2f}% ({result['num_images']} images)",
        *_per_class_lines(class_names, result["per_class_iou"], result["miou"]),
    ]
    lines.append(
        f"pixels predicted as 255: {result['predicted_void_pixels']}; counted as wrong above (VOC devkit); "
        f"ignoring them instead (ToCo): mIoU {result['miou_ignoring_predicted_void']:.2f}%"
    )
    lines.append(f"FP {result['false_positive']:.3f}  FN {result['false_negative']:.3f} (authors' figures)")
    return "\n".join(lines)


def refinement_chain(
    cam_summary: dict | None, walk_summary: dict | None, pseudo_summary: dict, *, rw_threshold: float
) -> list[tuple[str, float | None, str]]:
    """The rows of the refinement chain (the paper's Table 2) from the stages' summaries (``eval_cam``, ``infer_rw``,
    ``pseudo_labels``; None for a stage without one): ``(step, mIoU % or None, how it was scored)``."""

    def at_threshold(summary: dict, threshold: float) -> float | None:
        for swept, value in summary["per_threshold_miou"].items():
            if abs(float(swept) - threshold) < 1e-9:
                return value
        return None

    rows = []
    if cam_summary is not None:
        rows.append(
            ("CAM", cam_summary["miou"], f"best background threshold {threshold_text(cam_summary['best_threshold'])}")
        )
    if walk_summary is not None and "miou" in walk_summary:
        rows.append(
            (
                "+ random walk",
                walk_summary["miou"],
                f"best background threshold {threshold_text(walk_summary['best_threshold'])}",
            )
        )
        rows.append(
            (
                "+ random walk",
                at_threshold(walk_summary, rw_threshold),
                f"at rw_threshold {threshold_text(rw_threshold)}",
            )
        )
    if "miou" in pseudo_summary:
        rows.append(
            (
                "+ dCRF (pseudo labels)",
                pseudo_summary["miou"],
                f"at rw_threshold {threshold_text(rw_threshold)}; predicted 255 counted as wrong "
                f"(ignored: {pseudo_summary['miou_ignoring_predicted_void']:.2f}%)",
            )
        )
    return rows


def pipeline_chain(
    cam_summary: dict | None,
    walk_summary: dict | None,
    pseudo_summary: dict | None,
    segmentation_summary: dict,
    *,
    rw_threshold: float,
    label_split: str,
    segmentation_split: str,
) -> list[tuple[str, float | None, str]]:
    """The whole pipeline's rows: ``refinement_chain`` (scored on ``label_split``) and the segmenter's mIoU (scored
    on ``segmentation_split``, trained on ``segmentation_summary["labels"]``)."""
    rows = [
        (step, value, f"{label_split}; {how}")
        for step, value, how in refinement_chain(
            cam_summary, walk_summary, pseudo_summary or {}, rw_threshold=rw_threshold
        )
    ]
    labels = str(segmentation_summary.get("labels", "?")).replace("_", " ")
    rows.append(("segmentation", segmentation_summary["miou"], f"{segmentation_split}; trained on {labels}"))
    return rows


def format_chain_table(
    rows: Sequence[tuple[str, float | None, str]], *, title: str = "Refinement chain (mIoU %)"
) -> str:
    """Formats ``refinement_chain``'s (or ``pipeline_chain``'s) rows: step, mIoU and how it was scored."""
    width = max([len(step) for step, _, _ in rows] + [4]) + 2
    lines = [title, f"{'step':<{width}}{'mIoU':>8}  scored"]
    for step, value, how in rows:
        shown = "n/a" if value is None else f"{value:.2f}"
        lines.append(f"{step:<{width}}{shown:>8}  {how}")
    return "\n".join(lines)
