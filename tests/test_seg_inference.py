"""Tests of the segmenter's multi-scale inference against a direct transcription of the authors' procedure (spec §9:
each scale and its flip, logits resized bilinearly with align_corners=False by torch, summed, softmax), of its labels
with and without the CRF, and of the resumable writer."""

import os

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from PIL import Image

from puzzle_jax import labels, per_image, seg_inference
from puzzle_jax.refine import crf

NUM_CLASSES = 3


class PixelwiseSegmenter(nnx.Module):
    """Logits that are a fixed affine function of each pixel's normalised colour: what it gives for a pixel does not
    depend on the padding, so the engine's result must equal the unpadded reference exactly (up to rounding)."""

    def __init__(self):
        self.weights = nnx.Param(jnp.asarray([[1.5, -0.5, 0.3], [-1.0, 2.0, 0.1], [0.2, 0.4, -1.8]], jnp.float32))
        self.bias = nnx.Param(jnp.asarray([0.1, -0.2, 0.3], jnp.float32))

    def __call__(self, images):
        return images @ self.weights[...] + self.bias[...]


def _normalised(image):
    mean = np.array([0.485, 0.456, 0.406]) * 255
    std = np.array([0.229, 0.224, 0.225]) * 255
    return (image.astype(np.float64) - mean) / std


def _reference_probabilities(image, scales, flip):
    """The authors' loop: PIL bicubic per scale, logits, flipped logits flipped back, torch bilinear to (H, W)."""
    model = PixelwiseSegmenter()
    weights, bias = np.asarray(model.weights[...], np.float64), np.asarray(model.bias[...], np.float64)
    height, width = image.shape[:2]
    total = 0.0
    for scale in scales:
        size = (round(width * scale), round(height * scale))
        scaled = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BICUBIC))
        inputs = [scaled, scaled[:, ::-1]] if flip else [scaled]
        for index, array in enumerate(inputs):
            logits = _normalised(array) @ weights + bias
            if index == 1:
                logits = logits[:, ::-1]
            tensor = torch.tensor(np.ascontiguousarray(logits).transpose(2, 0, 1)[None])
            resized = F.interpolate(tensor, (height, width), mode="bilinear", align_corners=False)
            total = total + resized[0].numpy().transpose(1, 2, 0)
    exponentials = np.exp(total - total.max(-1, keepdims=True))
    return exponentials / exponentials.sum(-1, keepdims=True)


def _images(count=3, seed=0):
    rng = np.random.default_rng(seed)
    shapes = [(37, 52), (48, 48), (21, 70)][:count]
    return [(f"image{index}", rng.integers(0, 256, (*shape, 3)).astype(np.uint8)) for index, shape in enumerate(shapes)]


@pytest.mark.parametrize("flip", [True, False])
def test_probabilities_match_the_authors_procedure(flip):
    forward = seg_inference.create_forward(PixelwiseSegmenter())
    images = _images()
    scales = (0.5, 1.0, 1.5, 2.0)
    results = dict(
        seg_inference.iterate_probabilities(
            forward, images, scales=scales, flip=flip, pad_multiple=32, images_per_call=3, host_threads=2
        )
    )
    assert set(results) == {image_id for image_id, _ in images}
    for image_id, image in images:
        probabilities = results[image_id]["probabilities"]
        assert probabilities.shape == (*image.shape[:2], NUM_CLASSES) and probabilities.dtype == np.float32
        np.testing.assert_array_equal(results[image_id]["image"], image)
        np.testing.assert_allclose(probabilities, _reference_probabilities(image, scales, flip), atol=2e-5)


def test_a_scale_that_would_round_a_side_to_zero_keeps_one_pixel():
    forward = seg_inference.create_forward(PixelwiseSegmenter())
    image = np.random.default_rng(1).integers(0, 256, (1, 9, 3)).astype(np.uint8)
    ((_, payload),) = seg_inference.iterate_probabilities(
        forward, [("thin", image)], scales=(0.5, 1.0), flip=True, pad_multiple=16, images_per_call=1
    )
    assert payload["probabilities"].shape == (1, 9, NUM_CLASSES)
    assert np.all(np.isfinite(payload["probabilities"]))


def _probability_stream(seed=2):
    rng = np.random.default_rng(seed)
    regions = np.zeros((30, 40), np.int64)
    regions[:, 20:] = 1
    regions[15:, 30:] = 2
    image = np.clip(
        np.array([[30, 60, 90], [200, 40, 40], [40, 200, 40]])[regions] + rng.integers(-8, 9, (30, 40, 3)), 0, 255
    )
    logits = 2.0 * np.eye(3)[regions] + rng.normal(0, 1.2, (30, 40, 3))
    return image.astype(np.uint8), seg_inference.softmax(logits.astype(np.float32)), regions


def test_labels_are_the_argmax_without_crf_and_the_crf_labels_with_it():
    image, probabilities, regions = _probability_stream()
    stream = [("a", {"image": image, "probabilities": probabilities})]
    one_process = per_image.HostBackend(workers=1)
    ((_, plain),) = seg_inference.label_maps(iter(stream), crf_iterations=0, backend=one_process)
    np.testing.assert_array_equal(plain, probabilities.argmax(-1))
    ((_, refined),) = seg_inference.label_maps(iter(stream), crf_iterations=5, backend=one_process)
    np.testing.assert_array_equal(refined, crf.refine_probabilities(image, probabilities, iterations=5))
    assert refined.dtype == np.uint8 and (refined == regions).mean() > (plain == regions).mean()


def test_write_segmentation_writes_palette_pngs_and_resumes(tmp_path):
    images = _images()
    source = [{"id": image_id, "image": image} for image_id, image in images]
    infer = ml_collections.ConfigDict(dict(pad_multiple=32, images_per_call=2, host_threads=1, max_pixels_per_call=0))
    options = dict(
        scales=(1.0,), flip=True, crf_iterations=0, backend=per_image.HostBackend(workers=1), infer=infer, num_devices=1
    )
    output_dir = str(tmp_path / "predictions")
    counts = seg_inference.write_segmentation(PixelwiseSegmenter(), source, output_dir, **options)
    assert counts == {"written": 3, "skipped_existing": 0}
    for image_id, image in images:
        label_map = labels.read_label_png(os.path.join(output_dir, f"{image_id}.png"), NUM_CLASSES - 1)
        np.testing.assert_array_equal(label_map, _reference_probabilities(image, (1.0,), True).argmax(-1))
    os.remove(os.path.join(output_dir, "image1.png"))
    counts = seg_inference.write_segmentation(PixelwiseSegmenter(), source, output_dir, **options)
    assert counts == {"written": 1, "skipped_existing": 2}
