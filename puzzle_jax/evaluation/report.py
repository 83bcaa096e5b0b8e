"""Printed tables of evaluation results (per-class IoU and the threshold sweep)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def format_sweep_table(class_names: Sequence[str], result: dict, *, title: str = "CAM mIoU") -> str:
    """Formats a ``ThresholdSweep.result()`` as a per-class table followed by the per-threshold mIoU.

    Args:
      class_names: names of all classes, background first.
      result: the sweep result (``per_class_iou`` and ``miou`` in percent).
      title: heading line.
    """
    width = max(len(name) for name in list(class_names) + ["mIoU"]) + 2
    lines = [
        f"{title}: {result['miou']:.2f}% at background threshold {result['best_threshold']:.2f} "
        f"({result['num_images']} images)"
    ]
    lines.append(f"{'class':<{width}}{'IoU %':>8}")
    for name, iou in zip(class_names, result["per_class_iou"]):
        shown = "absent" if iou is None or np.isnan(iou) else f"{iou:.2f}"
        lines.append(f"{name:<{width}}{shown:>8}")
    lines.append(f"{'mIoU':<{width}}{result['miou']:>8.2f}")
    lines.append(
        "threshold sweep: "
        + "  ".join(f"{t:.2f}:{m:.1f}" for t, m in zip(result["thresholds"], result["per_threshold_miou"]))
    )
    return "\n".join(lines)
