"""Segments any images with an exported model: ``python -m puzzle_jax.predict --model DIR --images DIR_OR_FILES ...
--out DIR [--crf]``.

* A **segmenter** (``train_seg/model``): multi-scale + flip logits, softmax, optionally the dense CRF
  (``seg_inference``, as ``infer_seg``); writes ``<out>/<name>.png`` (class ids in the VOC palette) and
  ``<out>/<name>_overlay.jpg``.
* A **CAM classifier** (``train_cam/model``): the classes it finds (sigmoid of the logits above ``--class-threshold``),
  their multi-scale CAMs (``cam_inference``, as ``infer_cam``) and labels at a background threshold
  (``--cam-threshold``); writes ``<name>.npz`` (``cam_files``), ``<name>.png`` and ``<name>_overlay.jpg``.

Every readable image of ``--images`` (files, or the images of a folder, not recursive) is checked before any work,
and unreadable ones are named together. Outputs are written atomically; an image whose outputs exist is skipped, so
an interrupted run resumes. Runs on any JAX device; each call is split over the process's devices.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image

from puzzle_jax import (
    cam_files,
    cam_inference,
    checkpointing,
    fileio,
    labels,
    per_image,
    seg_inference,
    sharding,
)
from puzzle_jax.evaluation import miou
from puzzle_jax.viz import overlays

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# Families predict can run, and what it makes of them.
SUPPORTED_FAMILIES = ("segmentation", "classifier")
# Images classified per batch of the classifier's two passes (its CAMs need the predicted classes first).
CLASSIFIER_CHUNK = 32


def list_images(inputs: Sequence[str]) -> list[tuple[str, str]]:
    """``(name, path)`` of every image to segment: the files given, and the image files of the folders given (sorted).

    Raises:
      FileNotFoundError: a path that does not exist, or no image at all.
      ValueError: two images with one output name (the same file stem), or unreadable images (each named with the
        reason).
    """
    paths: list[str] = []
    for entry in inputs:
        if os.path.isdir(entry):
            found = sorted(
                os.path.join(entry, name)
                for name in os.listdir(entry)
                if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")
            )
            paths.extend(found)
        elif os.path.isfile(entry):
            paths.append(entry)
        else:
            raise FileNotFoundError(f"{entry}: no such file or folder.")
    if not paths:
        raise FileNotFoundError(f"No image files ({', '.join(IMAGE_EXTENSIONS)}) in {list(inputs)}.")
    names: dict[str, str] = {}
    for path in paths:
        name = os.path.splitext(os.path.basename(path))[0]
        if name in names:
            raise ValueError(f"{names[name]} and {path} would write the same outputs ({name}.*): rename one.")
        names[name] = path
    unreadable = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception as error:  # PIL raises many types for bad files; each is named below.
            unreadable.append(f"{path}: {type(error).__name__}: {error}")
    if unreadable:
        raise ValueError(f"{len(unreadable)} unreadable image(s):\n  " + "\n  ".join(unreadable))
    return list(names.items())


def read_image(path: str) -> np.ndarray:
    """The image as uint8 RGB ``(H, W, 3)`` (greyscale, palette and alpha images converted)."""
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except Exception as error:
        raise ValueError(f"{path}: cannot read the image ({type(error).__name__}: {error}).") from error


def _write_outputs(out_dir: str, name: str, image: np.ndarray, label_map: np.ndarray) -> None:
    overlay = overlays.label_overlay(image, label_map)
    with fileio.atomic_path(os.path.join(out_dir, f"{name}_overlay.jpg")) as temporary:
        Image.fromarray(overlay).save(temporary, format="JPEG", quality=90)
    # The label map last: its presence marks the image as done.
    labels.write_label_png(os.path.join(out_dir, f"{name}.png"), label_map)


def _pending(images: Sequence[tuple[str, str]], out_dir: str) -> list[tuple[str, str]]:
    return [(name, path) for name, path in images if not os.path.exists(os.path.join(out_dir, f"{name}.png"))]


def predict_segmenter(
    model, images: Sequence[tuple[str, str]], out_dir: str, *, scales, flip, crf_iterations, workers, options
) -> int:
    """Writes the label PNG and overlay of every image; returns the number written."""
    mesh = sharding.create_local_mesh(options.devices)
    forward = seg_inference.create_forward(model, mesh)
    decoded: dict[str, np.ndarray] = {}

    def stream() -> Iterator[tuple[str, np.ndarray]]:
        for name, path in images:
            decoded[name] = read_image(path)
            yield name, decoded[name]

    probabilities = seg_inference.iterate_probabilities(
        forward,
        stream(),
        scales=scales,
        flip=flip,
        pad_multiple=options.pad_multiple,
        images_per_call=options.images_per_call,
        batch_multiple=mesh.devices.size,
        max_pixels_per_call=options.max_pixels_per_call,
    )
    written = 0
    labelled = seg_inference.label_maps(
        probabilities, crf_iterations=crf_iterations, backend=per_image.HostBackend(workers=workers)
    )
    for name, label_map in labelled:
        _write_outputs(out_dir, name, decoded.pop(name), label_map)
        written += 1
        print(f"{name}: {os.path.join(out_dir, name + '.png')}", flush=True)
    return written


def predict_classifier(
    model, model_config, images: Sequence[tuple[str, str]], out_dir: str, *, scales, flip, options
) -> int:
    """Writes the CAM file, label PNG and overlay of every image; returns the number written."""
    output_stride = int(model_config["output_stride"])
    mesh = sharding.create_local_mesh(options.devices)
    forward = cam_inference.create_forward(model, mesh)
    written = 0
    for start in range(0, len(images), CLASSIFIER_CHUNK):
        chunk = images[start : start + CLASSIFIER_CHUNK]
        records = [{"id": name, "image": read_image(path)} for name, path in chunk]
        num_classes = int(model_config["num_classes"])
        logits, _ = cam_inference.classify(
            model,
            [{**record, "labels": np.zeros(num_classes, np.float32)} for record in records],
            output_stride=output_stride,
            pad_multiple=options.pad_multiple,
            images_per_call=options.images_per_call,
            num_devices=options.devices,
        )
        present = 1.0 / (1.0 + np.exp(-logits)) > options.class_threshold
        by_name = {record["id"]: record["image"] for record in records}
        cams = cam_inference.iterate_cams(
            forward,
            ((record["id"], record["image"], found) for record, found in zip(records, present)),
            scales=scales,
            flip=flip,
            pad_multiple=options.pad_multiple,
            output_stride=output_stride,
            images_per_call=options.images_per_call,
            batch_multiple=mesh.devices.size,
            max_pixels_per_call=options.max_pixels_per_call,
        )
        for name, payload in cams:
            cam_files.write_cam_file(os.path.join(out_dir, f"{name}.npz"), **payload)
            label_map = miou.cams_to_labels(payload["hr_cam"], payload["keys"], options.cam_threshold)
            _write_outputs(out_dir, name, by_name[name], label_map.astype(np.uint8))
            classes = ", ".join(str(key) for key in payload["keys"][1:]) or "none"
            print(f"{name}: classes {classes} -> {os.path.join(out_dir, name + '.png')}", flush=True)
            written += 1
    return written


def _parse_scales(text: str) -> tuple[float, ...]:
    try:
        scales = tuple(float(value) for value in text.split(",") if value.strip())
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"--scales {text!r}: comma-separated numbers, e.g. 0.5,1,1.5,2") from error
    if not scales or min(scales) <= 0:
        raise argparse.ArgumentTypeError(f"--scales {text!r}: at least one scale, all positive.")
    return scales


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m puzzle_jax.predict",
        description="Segment images with an exported segmenter (train_seg/model) or CAM classifier (train_cam/model).",
    )
    parser.add_argument("--model", required=True, help="an exported model folder (<workdir>/train_seg/model, ...)")
    parser.add_argument("--images", required=True, nargs="+", help="image files and/or folders of images")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--crf", action="store_true", help="segmenter: refine with the dense CRF (spec §9)")
    parser.add_argument("--crf-iterations", type=int, default=10, help="mean-field steps of --crf (default 10)")
    parser.add_argument("--scales", type=_parse_scales, default=(0.5, 1.0, 1.5, 2.0), help="default 0.5,1,1.5,2")
    parser.add_argument("--no-flip", action="store_true", help="do not add the flipped image's outputs")
    parser.add_argument(
        "--class-threshold", type=float, default=0.5, help="classifier: class probability that counts as present"
    )
    parser.add_argument("--cam-threshold", type=float, default=0.2, help="classifier: background score of the CAMs")
    parser.add_argument("--devices", type=int, default=0, help="devices each call is split over (0 = all)")
    parser.add_argument("--images-per-call", type=int, default=8, help="inputs per device call")
    parser.add_argument("--pad-multiple", type=int, default=64, help="inputs are padded to a multiple of this side")
    parser.add_argument(
        "--max-pixels-per-call",
        type=int,
        default=32_000_000,
        help="padded input pixels per device call (bounds memory; a larger image stops with its name); 0 = no limit",
    )
    parser.add_argument("--workers", type=int, default=0, help="CRF worker processes (0 = the CPU cores)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    options = build_parser().parse_args(argv)
    try:
        images = list_images(options.images)
        model_config = checkpointing.load_model_config(options.model)
        family = model_config.get("family", "classifier")
        if family not in SUPPORTED_FAMILIES:
            raise ValueError(
                f"{options.model} holds a model of the {family} family; predict takes a segmenter "
                "(train_seg/model) or a CAM classifier (train_cam/model)."
            )
        model, model_config = checkpointing.load_exported(options.model, family=family)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    os.makedirs(options.out, exist_ok=True)
    pending = _pending(images, options.out)
    if len(pending) < len(images):
        print(f"{len(images) - len(pending)} image(s) already done in {options.out}: skipped.", flush=True)
    scales, flip = options.scales, not options.no_flip
    if family == "segmentation":
        written = predict_segmenter(
            model,
            pending,
            options.out,
            scales=scales,
            flip=flip,
            crf_iterations=options.crf_iterations if options.crf else 0,
            workers=options.workers,
            options=options,
        )
    else:
        written = predict_classifier(
            model, model_config, pending, options.out, scales=scales, flip=flip, options=options
        )
    print(f"{written} image(s) written to {options.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
