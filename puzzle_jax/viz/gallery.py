"""HTML galleries, worst image first: the CAMs of one run (or two, side by side), and the refinement chain.

``write_gallery`` / ``write_cam_gallery`` (``eval_cam``): for each image the image, its ground truth in the VOC palette,
the label map the CAMs give at the background threshold, and one heat-map overlay per ground-truth class, with the
image's IoU. Images are listed worst IoU first so a researcher sees at once where the CAMs fail. With a second run's
CAMs of the same images (``compare_*``) each image gets a second row, the side-by-side "Puzzle-CAM vs plain CAM" view of
the paper's Figure 3.

``write_chain_gallery`` (``pseudo_labels``): one row per image with each step of the refinement chain beside the ground
truth: CAM labels at a threshold, affinity labels (255 in the void colour), random-walk labels at the pseudo labels'
threshold (before the CRF) and the pseudo labels, each with its IoU; worst pseudo-label IoU first. A step whose folder
does not exist (a workdir without that stage) has no column.

Per-image IoU: the mean over the classes in the image's ground truth or prediction; a predicted 255 counts as wrong
(VOC devkit, as the stages' mIoU).

Layout of ``output_dir``::

    index.html             # self-contained (inline CSS), relative links only
    images/<id>_image.png, <id>_gt.png, <id>_pred.png, <id>_cam<k>.png,
           <id>_compare_pred.png, <id>_compare_cam<k>.png          (CAM gallery)
           <id>_cam_labels.png, <id>_affinity_labels.png, <id>_rw_labels.png, <id>_pseudo_labels.png  (chain)
"""

from __future__ import annotations

import dataclasses
import html
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import cv2
import numpy as np

from puzzle_jax import cam_files, fileio
from puzzle_jax.evaluation import miou
from puzzle_jax.labels import IGNORE_LABEL, read_label_png, voc_palette
from puzzle_jax.refine import label_folders
from puzzle_jax.viz import overlays, palette

IMAGES_DIR = "images"
INDEX_NAME = "index.html"
BACKGROUND_NAME = "background"

_CSS = """
body { font-family: sans-serif; margin: 1.5em; background: #fafafa; color: #222; }
h1 { font-size: 1.4em; }
section { background: #fff; border: 1px solid #ddd; border-radius: 6px; margin: 1em 0; padding: 0.6em 1em; }
section h2 { font-size: 1.05em; margin: 0.2em 0 0.4em 0; }
.run { display: flex; flex-wrap: wrap; align-items: flex-start; gap: 0.6em; margin: 0.3em 0; }
.run-name { width: 7em; font-weight: bold; align-self: center; }
figure { margin: 0; text-align: center; }
figure img { height: 160px; image-rendering: pixelated; border: 1px solid #ccc; display: block; }
figcaption { font-size: 0.8em; margin-top: 0.2em; max-width: 200px; }
.legend span.swatch { display: inline-block; width: 0.9em; height: 0.9em; border: 1px solid #888;
  vertical-align: middle; margin: 0 0.2em 0 0.8em; }
.bad { color: #b00; } .good { color: #070; } .muted { color: #777; }
"""


@dataclasses.dataclass(frozen=True)
class _RunView:
    """One run's CAMs of one image and what the gallery derives from them."""

    cams: np.ndarray  # (K, H, W) float, at the ground truth's size.
    foreground_keys: np.ndarray  # (K,) label ids (1-based; 0 is background).
    prediction: np.ndarray  # (H, W) int64 label map at the threshold.
    iou: float  # Mean IoU of the image in percent over classes in GT or prediction; NaN if none.


def _class_name(label: int, class_names: Sequence[str]) -> str:
    if label == 0:
        return BACKGROUND_NAME
    if label == IGNORE_LABEL:
        return "void"
    if 1 <= label <= len(class_names):
        return class_names[label - 1]
    return f"class {label}"


def _safe_id(image_id: str) -> str:
    """A file-name stem for an image id (ids such as COCO paths may hold slashes)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", str(image_id)) or "image"


def _resize_cams(cams: np.ndarray, height: int, width: int) -> np.ndarray:
    """Brings (K, h, w) CAMs to (K, H, W) bilinearly, so strided CAMs can be scored against full-size GT."""
    if cams.shape[1:] == (height, width):
        return cams
    if not cams.shape[0]:
        return np.zeros((0, height, width), cams.dtype)
    return np.stack([cv2.resize(cam, (width, height), interpolation=cv2.INTER_LINEAR) for cam in cams])


def _foreground_keys(keys: np.ndarray, num_maps: int) -> np.ndarray:
    """Drops the authors' leading background 0 from ``keys`` (``cams_to_labels`` accepts both layouts)."""
    keys = np.asarray(keys, dtype=np.int64).reshape(-1)
    if keys.shape[0] == num_maps + 1 and keys[0] == 0:
        return keys[1:]
    return keys


def _image_iou(prediction: np.ndarray, ground_truth: np.ndarray, num_classes: int, **policy: str) -> float:
    """An image's IoU in percent: the mean over classes in its GT or prediction (``mean_iou`` leaves out, as NaN,
    classes absent from both); NaN if no pixel is scored. ``policy``: ``invalid_predictions`` of ``mean_iou``."""
    return float(miou.mean_iou(miou.confusion_matrix(prediction, ground_truth, num_classes), **policy))


def _run_view(cams: Any, keys: Any, threshold: float, ground_truth: np.ndarray, num_classes: int) -> _RunView:
    cams = np.asarray(cams, dtype=np.float32)
    if cams.ndim != 3:
        raise ValueError(f"cams must have shape (K, H, W), got {cams.shape}.")
    cams = _resize_cams(cams, *ground_truth.shape)
    prediction = miou.cams_to_labels(cams, keys, threshold)
    return _RunView(
        cams=cams,
        foreground_keys=_foreground_keys(keys, cams.shape[0]),
        prediction=prediction,
        iou=_image_iou(prediction, ground_truth, num_classes),
    )


def _claim_stem(stems: dict[str, str], image_id: str) -> str:
    """The picture-name stem of ``image_id``, recorded in ``stems``; two ids may not share one."""
    stem = _safe_id(image_id)
    if stem in stems:
        raise ValueError(f"Image ids {stems[stem]!r} and {image_id!r} map to the same file name {stem!r}.")
    stems[stem] = image_id
    return stem


def _spread(source: Sequence[Mapping[str, Any]], count: int) -> list[Mapping[str, Any]]:
    """``count`` records spread evenly over ``source`` (first and last included), in split order."""
    count = max(0, min(int(count), len(source)))
    return [source[int(index)] for index in np.linspace(0, len(source) - 1, count).round().astype(int)]


def _selection(drawn: int, total: int | None, order: str) -> str:
    """What a gallery shows: the whole split, or a sample of it (not its worst images), and in which order."""
    if total is None:
        return f"{drawn} images, {order}"
    if drawn >= total:
        return f"All {total} images of the split, {order}"
    return (
        f"A sample of {drawn} of the split's {total} images, spread evenly over it in split order (not the split's "
        f"worst images), {order}"
    )


def _format_iou(iou: float) -> str:
    return "n/a" if math.isnan(iou) else f"{iou:.1f}%"


def _figure(source: str, caption: str) -> str:
    return (
        f'<figure><img src="{html.escape(source, quote=True)}" alt="{html.escape(caption, quote=True)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _write_run_row(
    output_dir: str,
    stem: str,
    prefix: str,
    run_label: str,
    image: np.ndarray,
    view: _RunView,
    class_names: Sequence[str],
) -> str:
    """Writes one run's prediction and CAM overlays of an image; returns the HTML row showing them."""
    figures = []
    relative = f"{IMAGES_DIR}/{stem}_{prefix}pred.png"
    fileio.write_rgb_png(os.path.join(output_dir, relative), palette.colorize_labels(view.prediction))
    figures.append(_figure(relative, f"{run_label}: label map"))
    for cam, key in zip(view.cams, view.foreground_keys):
        relative = f"{IMAGES_DIR}/{stem}_{prefix}cam{int(key)}.png"
        fileio.write_rgb_png(os.path.join(output_dir, relative), overlays.cam_overlay(image, cam))
        figures.append(_figure(relative, f"{run_label}: CAM {_class_name(int(key), class_names)}"))
    name = f"{html.escape(run_label)}<br><span>IoU {_format_iou(view.iou)}</span>"
    return f'<div class="run"><div class="run-name">{name}</div>{"".join(figures)}</div>'


def _legend(class_names: Sequence[str]) -> str:
    colours = voc_palette()
    labels = list(range(len(class_names) + 1)) + [IGNORE_LABEL]
    items = []
    for label in labels:
        red, green, blue = (int(value) for value in colours[label])
        items.append(
            f'<span class="swatch" style="background: rgb({red},{green},{blue})"></span>'
            f"{html.escape(_class_name(label, class_names))}"
        )
    return f'<p class="legend">Colours:{"".join(items)}</p>'


def _input_figures(
    output_dir: str,
    stem: str,
    image_id: str,
    image: np.ndarray,
    ground_truth: np.ndarray,
    class_names: Sequence[str],
) -> tuple[str, str]:
    """Writes an image and its ground truth (VOC palette); returns their figures' HTML and the GT classes' names."""
    image_path = f"{IMAGES_DIR}/{stem}_image.png"
    fileio.write_rgb_png(os.path.join(output_dir, image_path), np.asarray(image).astype(np.uint8))
    gt_path = f"{IMAGES_DIR}/{stem}_gt.png"
    fileio.write_rgb_png(os.path.join(output_dir, gt_path), palette.colorize_labels(ground_truth))
    gt_classes = [int(label) for label in np.unique(ground_truth) if 0 < label <= len(class_names)]
    gt_caption = ", ".join(_class_name(label, class_names) for label in gt_classes) or "background only"
    return _figure(image_path, f"image {image_id}") + _figure(gt_path, f"ground truth: {gt_caption}"), gt_caption


def _write_index(output_dir: str, title: str, summary: str, sections: Sequence[str], class_names: Sequence[str]) -> str:
    """Writes ``index.html`` (title, summary, colour legend, one ``<section>`` per image) atomically, last, so its
    presence means the gallery is complete; returns its path."""
    page = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p>{html.escape(summary)}</p>{_legend(class_names)}"
        + "\n".join(sections)
        + "</body></html>\n"
    )
    index_path = os.path.join(output_dir, INDEX_NAME)
    with fileio.atomic_path(index_path) as temporary, open(temporary, "w", encoding="utf-8") as handle:
        handle.write(page)
    return index_path


def _sort_key(item: tuple[str, _RunView, Any]) -> tuple[bool, float, str]:
    image_id, view, _ = item
    # NaN IoU (no scored pixel at all) goes last: there is nothing to learn from it.
    return (math.isnan(view.iou), view.iou if not math.isnan(view.iou) else 0.0, image_id)


def write_gallery(
    output_dir: str,
    entries: Sequence[Mapping[str, Any]],
    *,
    class_names: Sequence[str],
    title: str,
    compare_name: str | None = None,
    run_name: str = "CAM",
    split_size: int | None = None,
) -> str:
    """Writes the PNGs and ``index.html`` of a CAM gallery, worst image first.

    Args:
      output_dir: folder to write into (created if missing); ``index.html`` is written last, so its presence means
        the gallery is complete.
      entries: one dict per image with ``id`` (str), ``image`` ((H, W, 3) uint8), ``ground_truth`` ((H, W) labels,
        255 void), ``cams`` ((K, H, W) float max-normalised CAMs of the GT classes; another spatial size is resized
        bilinearly), ``keys`` (the ``infer_cam`` layout ``[0, c1 + 1, ...]`` of K + 1 ids, or K 1-based ids),
        ``threshold`` (background score) and optionally ``compare_cams`` / ``compare_keys``: a second run's CAMs of
        the same image, scored at the same threshold.
      class_names: the C foreground class names in label order (background excluded, as
        ``datasets.DatasetInfo.class_names``); label ``k`` is ``class_names[k - 1]``.
      title: page title.
      compare_name: name of the second run, shown beside its row (default ``"compare"`` when entries carry compare
        CAMs).
      run_name: name of the main run, shown beside its row.
      split_size: the number of images of the split the entries were drawn from, for the header (which then says
        whether they are all of it or a sample); None: not said.

    Returns:
      The path of ``index.html``.

    Raises:
      ValueError: on malformed entries or duplicate ids.
    """
    num_classes = len(class_names) + 1
    os.makedirs(os.path.join(output_dir, IMAGES_DIR), exist_ok=True)
    any_compare = any(entry.get("compare_cams") is not None for entry in entries)
    compare_label = compare_name if compare_name is not None else "compare"
    show_compare = compare_name is not None or any_compare

    stems: dict[str, str] = {}
    scored = []
    for entry in entries:
        image_id = str(entry["id"])
        stem = _claim_stem(stems, image_id)
        image = np.asarray(entry["image"])
        ground_truth = np.asarray(entry["ground_truth"])
        if ground_truth.shape != image.shape[:2]:
            raise ValueError(f"{image_id}: ground_truth shape {ground_truth.shape} differs from image {image.shape}.")
        threshold = float(entry["threshold"])
        view = _run_view(entry["cams"], entry["keys"], threshold, ground_truth, num_classes)
        compare_view = None
        if entry.get("compare_cams") is not None:
            if entry.get("compare_keys") is None:
                raise ValueError(f"{image_id}: compare_cams given without compare_keys.")
            compare_view = _run_view(entry["compare_cams"], entry["compare_keys"], threshold, ground_truth, num_classes)
        scored.append((image_id, view, (stem, image, ground_truth, threshold, compare_view)))

    sections = []
    run_ious, compare_ious = [], []
    for rank, (image_id, view, (stem, image, ground_truth, threshold, compare_view)) in enumerate(
        sorted(scored, key=_sort_key), start=1
    ):
        run_ious.append(view.iou)
        input_figures, gt_caption = _input_figures(output_dir, stem, image_id, image, ground_truth, class_names)

        heading = f"#{rank} {html.escape(image_id)} &mdash; {html.escape(run_name)} IoU {_format_iou(view.iou)}"
        if compare_view is not None:
            compare_ious.append(compare_view.iou)
            heading += f" | {html.escape(compare_label)} IoU {_format_iou(compare_view.iou)}"
            delta = view.iou - compare_view.iou
            if not math.isnan(delta):
                # Green where the main run beats the compare run on this image, red where it loses.
                css = "good" if delta > 0 else "bad" if delta < 0 else "muted"
                heading += f' <span class="{css}">({delta:+.1f})</span>'
        rows = [
            f'<div class="run"><div class="run-name">input</div>{input_figures}</div>',
            _write_run_row(output_dir, stem, "", run_name, image, view, class_names),
        ]
        if compare_view is not None:
            rows.append(_write_run_row(output_dir, stem, "compare_", compare_label, image, compare_view, class_names))
        elif show_compare:
            rows.append(
                f'<div class="run"><div class="run-name">{html.escape(compare_label)}</div>'
                '<p class="muted">no CAMs for this image</p></div>'
            )
        sections.append(
            f"<section><h2>{heading}</h2>"
            f'<p class="muted">classes: {html.escape(gt_caption)}; background threshold {threshold:g}</p>'
            + "".join(rows)
            + "</section>"
        )

    summary = (
        f"{_selection(len(scored), split_size, 'sorted worst IoU first')}. IoU: mean over the classes in the image's "
        "GT or prediction."
    )
    finite = [iou for iou in run_ious if not math.isnan(iou)]
    if finite:
        summary += f" Mean per-image IoU, {run_name}: {np.mean(finite):.1f}%"
        compare_finite = [iou for iou in compare_ious if not math.isnan(iou)]
        if compare_finite:
            summary += f"; {compare_label}: {np.mean(compare_finite):.1f}%"
        summary += "."
    return _write_index(output_dir, title, summary, sections, class_names)


def write_cam_gallery(
    output_dir: str,
    source: Sequence[Mapping[str, Any]],
    cam_dir: str,
    *,
    count: int,
    class_names: Sequence[str],
    threshold: float,
    title: str,
    run_name: str,
    compare_dir: str | None = None,
    compare_name: str | None = None,
) -> str:
    """``write_gallery`` for ``count`` images spread evenly over a split (``image``, ``mask``, ``id`` records), with
    their CAM files (``cam_files``, ``hr_cam``) from ``cam_dir`` and optionally another run's from ``compare_dir``.

    Returns:
      The path of ``index.html``.
    """
    entries = []
    for record in _spread(source, count):
        cams = cam_files.read_cam_file(cam_files.path_of(cam_dir, record["id"]))
        entry = {
            "id": record["id"],
            "image": record["image"],
            "ground_truth": record["mask"],
            "cams": cams["hr_cam"],
            "keys": cams["keys"],
            "threshold": threshold,
        }
        if compare_dir is not None:
            other = cam_files.read_cam_file(cam_files.path_of(compare_dir, record["id"]))
            entry.update(compare_cams=other["hr_cam"], compare_keys=other["keys"])
        entries.append(entry)
    return write_gallery(
        output_dir, entries, class_names=class_names, title=title, compare_name=compare_name, run_name=run_name,
        split_size=len(source),
    )


@dataclasses.dataclass(frozen=True)
class _ChainStep:
    """One column of the chain gallery: a label map per image, read from one stage's folder."""

    name: str  # The column's caption ("pseudo labels").
    suffix: str  # Its pictures are images/<stem>_<suffix>.png.
    path_of: Callable[[str], str]  # image id -> the image's file in the stage's folder.
    read: Callable[[str, tuple[int, int]], np.ndarray]  # (file, GT (H, W)) -> (H, W) label map, 255 void.


def _score_map_step(name: str, suffix: str, score_dir: str, field: str, threshold: float) -> _ChainStep:
    """Labels from CAM-format files (``cam_files``): ``field``'s maps (brought to the ground truth's size bilinearly,
    as the CAM gallery does) with a background channel at ``threshold``, argmax (``miou.cams_to_labels``; no CRF)."""

    def read(path: str, shape: tuple[int, int]) -> np.ndarray:
        contents = cam_files.read_cam_file(path, (field,))
        return miou.cams_to_labels(_resize_cams(contents[field], *shape), contents["keys"], threshold)

    return _ChainStep(name, suffix, lambda image_id: cam_files.path_of(score_dir, image_id), read)


def _label_png_step(name: str, suffix: str, label_dir: str, num_foreground: int) -> _ChainStep:
    """Labels from a folder of label PNGs (``label_folders``' layout, ``labels.write_label_png``'s format)."""

    def read(path: str, shape: tuple[int, int]) -> np.ndarray:
        label_map = read_label_png(path, num_foreground)
        if label_map.shape != shape:
            raise ValueError(f"{path}: size {label_map.shape} differs from its image's ground truth {shape}.")
        return label_map

    return _ChainStep(name, suffix, lambda image_id: label_folders.label_path(label_dir, image_id), read)


def _is_folder(directory: str | None) -> bool:
    return bool(directory) and os.path.isdir(directory)


@dataclasses.dataclass(frozen=True)
class _StepView:
    """One step's labels of one image and their scores."""

    prediction: np.ndarray  # (H, W) labels, 255 void.
    iou: float  # Percent, predicted 255 counted as wrong; NaN if no pixel is scored.
    iou_ignoring_void: float  # Percent, predicted 255 left out.
    void_share: float  # Fraction of the image's pixels predicted 255.


def _step_view(prediction: np.ndarray, ground_truth: np.ndarray, num_classes: int) -> _StepView:
    return _StepView(
        prediction=prediction,
        iou=_image_iou(prediction, ground_truth, num_classes),
        iou_ignoring_void=_image_iou(prediction, ground_truth, num_classes, invalid_predictions="ignore"),
        void_share=float(np.mean(prediction == IGNORE_LABEL)) if prediction.size else 0.0,
    )


def _step_caption(name: str, view: _StepView) -> str:
    caption = f"{name}: IoU {_format_iou(view.iou)}"
    if view.void_share > 0:
        caption += f"; {100 * view.void_share:.0f}% void (IoU ignoring void {_format_iou(view.iou_ignoring_void)})"
    return caption


def _chain_steps(
    cam_dir: str | None,
    cam_threshold: float,
    affinity_label_dir: str | None,
    random_walk_dir: str | None,
    rw_threshold: float,
    pseudo_label_dir: str | None,
    num_foreground: int,
) -> list[_ChainStep]:
    """The chain's columns whose folder exists, in chain order."""
    steps = []
    if _is_folder(cam_dir):
        name = f"CAM labels (threshold {cam_threshold:g})"
        steps.append(_score_map_step(name, "cam_labels", cam_dir, "hr_cam", cam_threshold))
    if _is_folder(affinity_label_dir):
        steps.append(_label_png_step("affinity labels", "affinity_labels", affinity_label_dir, num_foreground))
    if _is_folder(random_walk_dir):
        name = f"random-walk labels (threshold {rw_threshold:g})"
        steps.append(_score_map_step(name, "rw_labels", random_walk_dir, "rw", rw_threshold))
    if _is_folder(pseudo_label_dir):
        steps.append(_label_png_step("pseudo labels", "pseudo_labels", pseudo_label_dir, num_foreground))
    return steps


@dataclasses.dataclass(frozen=True)
class _ChainRow:
    """One image of the chain gallery."""

    image_id: str
    stem: str
    record: Mapping[str, Any]
    views: list[_StepView | None]  # One per step; None where the image has no file in the step's folder.

    def sort_key(self) -> tuple[bool, float, str]:
        # The last step is what the chain delivers; an image without its labels (or without a scored pixel) goes last.
        iou = self.views[-1].iou if self.views and self.views[-1] is not None else math.nan
        return (math.isnan(iou), 0.0 if math.isnan(iou) else iou, self.image_id)


def _chain_section(
    output_dir: str, rank: int, row: _ChainRow, steps: Sequence[_ChainStep], class_names: Sequence[str]
) -> str:
    """Writes one image's pictures; returns its ``<section>``."""
    ground_truth = np.asarray(row.record["mask"])
    figures, gt_caption = _input_figures(
        output_dir, row.stem, row.image_id, row.record["image"], ground_truth, class_names
    )
    for step, view in zip(steps, row.views):
        if view is None:
            figures += f'<figure><figcaption class="muted">{html.escape(step.name)}: no file</figcaption></figure>'
            continue
        relative = f"{IMAGES_DIR}/{row.stem}_{step.suffix}.png"
        fileio.write_rgb_png(os.path.join(output_dir, relative), palette.colorize_labels(view.prediction))
        figures += _figure(relative, _step_caption(step.name, view))
    heading = f"#{rank} {html.escape(row.image_id)}"
    if steps and row.views[-1] is not None:
        heading += f" &mdash; {html.escape(steps[-1].name)} IoU {_format_iou(row.views[-1].iou)}"
    return (
        f'<section><h2>{heading}</h2><p class="muted">classes: {html.escape(gt_caption)}</p>'
        f'<div class="run">{figures}</div></section>'
    )


def _chain_summary(rows: Sequence[_ChainRow], steps: Sequence[_ChainStep], split_size: int) -> str:
    if not steps:
        selection = _selection(len(rows), split_size, "in split order")
        return f"{selection}; no step of the refinement chain has an output folder yet."
    means = []
    for index, step in enumerate(steps):
        ious = [row.views[index].iou for row in rows if row.views[index] is not None]
        ious = [iou for iou in ious if not math.isnan(iou)]
        means.append(f"{step.name} {np.mean(ious):.1f}%" if ious else f"{step.name} n/a")
    return (
        f"{_selection(len(rows), split_size, f'sorted worst {steps[-1].name} IoU first')}. IoU: mean over the "
        "classes in the image's GT or "
        f"prediction, predicted void counted as wrong. Mean per-image IoU: {'; '.join(means)}."
    )


def write_chain_gallery(
    output_dir: str,
    source: Sequence[Mapping[str, Any]],
    *,
    count: int,
    class_names: Sequence[str],
    cam_dir: str | None,
    cam_threshold: float,
    affinity_label_dir: str | None,
    random_walk_dir: str | None,
    rw_threshold: float,
    pseudo_label_dir: str | None,
    title: str,
) -> str:
    """Writes a gallery of the refinement chain: each step's labels beside the ground truth, worst image first.

    One row per image of ``count`` images spread evenly over ``source``: the image, its ground truth, then one column
    per step whose folder exists, in chain order: CAM labels (``cam_dir``'s ``hr_cam`` at ``cam_threshold``), affinity
    labels (255 in the void colour), random-walk labels (``random_walk_dir``'s ``rw`` at ``rw_threshold``, before the
    pseudo labels' CRF) and pseudo labels, each captioned with the image's IoU. Rows are sorted by the last step's IoU
    (the pseudo labels' when they exist), worst first; an image without a file in a present folder shows a note in
    that cell.

    Args:
      output_dir: folder to write into (created if missing); ``index.html`` is written last.
      source: the split's records (``id``, ``image`` (H, W, 3) uint8, ``mask`` (H, W) labels, 255 void).
      count: images to draw (at most the split's size).
      class_names: the C foreground class names in label order (background excluded).
      cam_dir: ``infer_cam``'s CAM files (``<id>.npz``); None or a missing folder: no CAM column.
      cam_threshold: background score of the CAM labels.
      affinity_label_dir: ``aff_labels``' PNGs; None or missing: no column.
      random_walk_dir: ``infer_rw``'s files (``rw``); None or missing: no column.
      rw_threshold: background score of the random-walk labels (``refine.rw_threshold``).
      pseudo_label_dir: ``pseudo_labels``' PNGs; None or missing: no column.
      title: page title.

    Returns:
      The path of ``index.html``.

    Raises:
      ValueError: an unreadable file or one whose size differs from its image's ground truth (the file named), or
        two ids with one file name.
    """
    steps = _chain_steps(
        cam_dir, cam_threshold, affinity_label_dir, random_walk_dir, rw_threshold, pseudo_label_dir, len(class_names)
    )
    return _write_steps_gallery(output_dir, source, count, class_names, steps, title)


def write_segmentation_gallery(
    output_dir: str,
    source: Sequence[Mapping[str, Any]],
    *,
    count: int,
    class_names: Sequence[str],
    prediction_dir: str,
    label_source: str,
    title: str,
) -> str:
    """Writes a gallery of the segmenter's predictions beside the ground truth, worst image first.

    One row per image of ``count`` images spread evenly over ``source`` (a sample of the split, sorted worst first):
    the image, its ground truth and the prediction (``prediction_dir/<id>.png``), captioned with the image's IoU and
    named after the labels the segmenter learned from (``label_source``, e.g. "pseudo labels").

    Args:
      output_dir, source, count, class_names, title: as in ``write_chain_gallery``.
      prediction_dir: the ``infer_seg`` folder of label PNGs.
      label_source: what the segmenter was trained on, for the column's caption.

    Returns:
      The path of ``index.html``.
    """
    name = f"segmenter trained on {label_source}"
    steps = [_label_png_step(name, "segmentation", prediction_dir, len(class_names))]
    return _write_steps_gallery(output_dir, source, count, class_names, steps, title)


def _write_steps_gallery(
    output_dir: str,
    source: Sequence[Mapping[str, Any]],
    count: int,
    class_names: Sequence[str],
    steps: Sequence[_ChainStep],
    title: str,
) -> str:
    """One row per image (``_spread``), one column per step beside the image and its ground truth, worst last-step
    IoU first; ``index.html``'s path."""
    os.makedirs(os.path.join(output_dir, IMAGES_DIR), exist_ok=True)
    stems: dict[str, str] = {}
    rows = []
    for record in _spread(source, count):
        image_id = str(record["id"])
        ground_truth = np.asarray(record["mask"])
        views = []
        for step in steps:
            path = step.path_of(image_id)
            label_map = step.read(path, ground_truth.shape) if os.path.exists(path) else None
            views.append(None if label_map is None else _step_view(label_map, ground_truth, len(class_names) + 1))
        rows.append(_ChainRow(image_id, _claim_stem(stems, image_id), record, views))
    rows.sort(key=_ChainRow.sort_key)
    sections = [_chain_section(output_dir, rank, row, steps, class_names) for rank, row in enumerate(rows, start=1)]
    return _write_index(output_dir, title, _chain_summary(rows, steps, len(source)), sections, class_names)
