"""Tests of multi-scale + flip CAM computation against a torch transcription of the authors' inference (spec §5)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from puzzle_jax import cam_inference
from puzzle_jax.data import transforms

STRIDE = 16
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def _normalised_cell_sums(images: np.ndarray) -> np.ndarray:
    """A fake 'network' with output stride 16: per-cell sums of the first 3 channels, class k = channel k.

    Zero padding leaves cell sums unchanged, so its maps on a padded input equal its maps on the unpadded one.
    """
    n, h, w, c = images.shape
    ph, pw = math.ceil(h / STRIDE) * STRIDE, math.ceil(w / STRIDE) * STRIDE
    padded = np.zeros((n, ph, pw, c), np.float32)
    padded[:, :h, :w] = images
    sums = padded.reshape(n, ph // STRIDE, STRIDE, pw // STRIDE, STRIDE, c).sum(axis=(2, 4))
    return np.maximum(sums - 20.0, 0.0)  # ReLU, with an offset so that some cells are zero


def _cell_sums(images: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """``_normalised_cell_sums`` as a ``create_forward`` function: uint8 images and their boxes, normalised as the
    device does."""
    assert images.dtype == np.uint8 and boxes.shape == (len(images), 4)
    return _normalised_cell_sums(np.asarray(transforms.normalize_crops(images, boxes)))


def _torch_reference(image: np.ndarray, labels: np.ndarray, scales, flip=True):
    """The authors' inference_classification.py loop, transcribed (NCHW torch, PIL bicubic resize)."""
    height, width = image.shape[:2]
    strided_size = (math.ceil(height / 4), math.ceil(width / 4))
    up_size = (math.ceil(height / 16) * 16, math.ceil(width / 16) * 16)
    strided, high = [], []
    for scale in scales:
        size = (round(width * scale), round(height * scale))
        resized = np.asarray(Image.fromarray(image).resize(size, Image.BICUBIC), np.float32)
        normalised = (resized / 255.0 - MEAN) / STD
        x = torch.from_numpy(normalised.astype(np.float32)).permute(2, 0, 1)[None]
        batch = torch.cat([x, x.flip(-1)]) if flip else x
        maps = torch.from_numpy(_normalised_cell_sums(batch.permute(0, 2, 3, 1).numpy())).permute(0, 3, 1, 2)
        maps = maps[0:1] + maps[1:2].flip(-1) if flip else maps[0:1]
        strided.append(F.interpolate(maps, strided_size, mode="bilinear", align_corners=False)[0])
        high.append(F.interpolate(maps, up_size, mode="bilinear", align_corners=False)[0, :, :height, :width])
    keys = np.nonzero(labels)[0]
    strided = torch.stack(strided).sum(0)[keys]
    high = torch.stack(high).sum(0)[keys]
    strided = strided / (F.adaptive_max_pool2d(strided, (1, 1)) + 1e-5)
    high = high / (F.adaptive_max_pool2d(high, (1, 1)) + 1e-5)
    return np.pad(keys + 1, (1, 0)), strided.numpy(), high.numpy()


@pytest.mark.parametrize("height,width", [(48, 64), (37, 53)])
def test_cams_equal_the_torch_transcription(height, width):
    rng = np.random.default_rng(height)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    image[: height // 2, : width // 3] = 250  # a bright region so the maps have structure
    labels = np.array([1.0, 0.0, 1.0])
    scales = (1.0, 0.5, 1.5)
    result = cam_inference.compute_cams(
        _cell_sums, image, labels, scales=scales, flip=True, pad_multiple=64, output_stride=STRIDE
    )
    keys, strided, high = _torch_reference(image, labels, scales)
    np.testing.assert_array_equal(result["keys"], keys)
    assert result["cam"].shape == (2, math.ceil(height / 4), math.ceil(width / 4))
    assert result["hr_cam"].shape == (2, height, width)
    np.testing.assert_allclose(result["cam"], strided, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(result["hr_cam"], high, rtol=1e-4, atol=1e-5)
    assert result["hr_cam"].max() <= 1.0 and result["hr_cam"].max() > 0.99


def test_flip_is_added_back_in_place():
    image = np.zeros((32, 64, 3), np.uint8)
    image[:, :16] = 255  # bright on the left only
    result = cam_inference.compute_cams(
        _cell_sums,
        image,
        np.array([1.0, 0, 0]),
        scales=(1.0,),
        flip=True,
        pad_multiple=16,
        output_stride=STRIDE,
    )
    # Flipped-back maps land on the left again, so the right half stays dark.
    assert result["hr_cam"][0, :, :16].mean() > 0.5
    assert result["hr_cam"][0, :, 40:].max() < 1e-6


def test_resize_image_uses_pil_bicubic():
    image = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(image).resize((45, 30), Image.BICUBIC))
    np.testing.assert_array_equal(transforms.resize_image(image, 30, 45), expected)


def test_batched_bucketed_sharded_inference_equals_per_image_inference():
    """iterate_cams (inputs of equal padded size batched across images, each call split over 8 devices) gives the
    per-image compute_cams payloads of a real (tiny) classifier."""
    import jax
    from flax import nnx

    from puzzle_jax import models, sharding

    model = models.create_classifier("resnet_tiny", 4, bn_mode="global", rngs=nnx.Rngs(0))
    # Non-trivial running statistics, so eval-mode BN is not the identity.
    stats = nnx.state(model, nnx.BatchStat)
    nnx.update(model, jax.tree.map(lambda value: value * 0.5 + 0.1, stats))
    single = cam_inference.create_forward(model)
    sharded = cam_inference.create_forward(model, sharding.create_mesh(8))
    rng = np.random.default_rng(3)
    records = []
    for index, (height, width) in enumerate([(40, 56), (64, 48), (41, 57), (64, 64), (33, 70)]):
        labels = np.zeros(4, np.float32)
        labels[[index % 4, (index + 2) % 4]] = 1
        records.append((f"im{index}", rng.integers(0, 256, (height, width, 3), dtype=np.uint8), labels))
    settings = dict(scales=(1.0, 0.5, 1.5), flip=True, pad_multiple=32, output_stride=16)
    batched = dict(cam_inference.iterate_cams(sharded, records, images_per_call=3, batch_multiple=8, **settings))
    assert sorted(batched) == [record[0] for record in records]
    for image_id, image, labels in records:
        expected = cam_inference.compute_cams(single, image, labels, **settings)
        np.testing.assert_array_equal(batched[image_id]["keys"], expected["keys"])
        np.testing.assert_allclose(batched[image_id]["cam"], expected["cam"], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(batched[image_id]["hr_cam"], expected["hr_cam"], rtol=1e-4, atol=1e-5)


def test_host_threads_do_not_change_the_cams():
    rng = np.random.default_rng(5)
    records = []
    for index, (height, width) in enumerate([(40, 56), (64, 48), (41, 57), (64, 64), (33, 70), (50, 50)]):
        labels = np.zeros(3, np.float32)
        labels[index % 3] = 1
        records.append((f"im{index}", rng.integers(0, 256, (height, width, 3), dtype=np.uint8), labels))
    settings = dict(scales=(1.0, 0.5, 1.5), flip=True, pad_multiple=32, output_stride=STRIDE, images_per_call=2)
    serial = dict(cam_inference.iterate_cams(_cell_sums, records, host_threads=1, **settings))
    threaded = dict(cam_inference.iterate_cams(_cell_sums, records, host_threads=3, **settings))
    assert sorted(serial) == sorted(threaded) == sorted(record[0] for record in records)
    for image_id, payload in serial.items():
        for key in ("keys", "cam", "hr_cam"):
            np.testing.assert_array_equal(threaded[image_id][key], payload[key])


def test_inputs_reach_the_network_as_uint8_with_their_boxes():
    """Each call's batch: the scaled image and its flip at the top left of a zero-box canvas of the bucket size; the
    padding and the unused slots normalise to exact zeros, whatever a reused batch held before."""
    calls = []

    def recording_forward(images, boxes):
        calls.append((images.copy(), boxes.copy()))
        return _cell_sums(images, boxes)

    rng = np.random.default_rng(7)
    records = [(f"im{index}", rng.integers(0, 256, (40, 56), dtype=np.uint8)[..., None].repeat(3, -1), np.ones(3))
               for index in range(3)]
    settings = dict(scales=(1.0,), flip=True, pad_multiple=32, output_stride=STRIDE)
    list(cam_inference.iterate_cams(recording_forward, records, images_per_call=2, host_threads=1, **settings))
    assert len(calls) == 2  # two images, then one image and an unused slot pair
    for images, _ in calls:
        assert images.dtype == np.uint8 and images.shape == (4, 64, 64, 3)
    first_images, first_boxes = calls[0]
    np.testing.assert_array_equal(first_boxes, [[0, 0, 40, 56]] * 4)
    np.testing.assert_array_equal(first_images[0, :40, :56], records[0][1])
    np.testing.assert_array_equal(first_images[1, :40, :56], records[0][1][:, ::-1])
    np.testing.assert_array_equal(first_images[2, :40, :56], records[1][1])
    second_images, second_boxes = calls[1]
    np.testing.assert_array_equal(second_boxes, [[0, 0, 40, 56]] * 2 + [[0, 0, 0, 0]] * 2)
    np.testing.assert_array_equal(second_images[0, :40, :56], records[2][1])
    normalised = np.asarray(transforms.normalize_crops(second_images, second_boxes))
    assert not normalised[2:].any() and not normalised[:2, 40:].any() and not normalised[:2, :, 56:].any()


def test_a_call_in_flight_keeps_its_inputs_until_its_maps_are_fetched():
    """The next call is dispatched before the previous call's maps are fetched; a forward that reads its inputs only
    when fetched (as a device still computing may) must see them unchanged."""

    class LazyMaps:
        def __init__(self, images, boxes):
            self.images, self.boxes = images, boxes  # the caller's buffers, not copies

        def __array__(self, dtype=None, copy=None):
            return _cell_sums(self.images, self.boxes)

    rng = np.random.default_rng(11)
    records = [(f"im{index}", rng.integers(0, 256, (40, 56, 3), dtype=np.uint8), np.ones(3)) for index in range(5)]
    # One scale, one image per call: consecutive calls use the same size bucket, whose buffers get reused.
    settings = dict(scales=(1.0,), flip=True, pad_multiple=32, output_stride=STRIDE, images_per_call=1,
                    host_threads=1)
    eager = dict(cam_inference.iterate_cams(_cell_sums, records, **settings))
    lazy = dict(cam_inference.iterate_cams(lambda images, boxes: LazyMaps(images, boxes), records, **settings))
    assert sorted(lazy) == sorted(eager) == [record[0] for record in records]
    for image_id, payload in eager.items():
        for key in ("keys", "cam", "hr_cam"):
            np.testing.assert_array_equal(lazy[image_id][key], payload[key])


def test_create_forward_rejects_float_images():
    from flax import nnx

    from puzzle_jax import models

    forward = cam_inference.create_forward(models.create_classifier("resnet_tiny", 2, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="uint8"):
        forward(np.zeros((1, 32, 32, 3), np.float32), np.zeros((1, 4), np.int32))


def test_an_image_without_labels_gets_empty_maps():
    image = np.random.default_rng(1).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    result = cam_inference.compute_cams(
        _cell_sums, image, np.zeros(3), scales=(1.0, 0.5), flip=True, pad_multiple=32, output_stride=STRIDE
    )
    np.testing.assert_array_equal(result["keys"], [0])
    assert result["cam"].shape == (0, 10, 14)
    assert result["hr_cam"].shape == (0, 37, 53)


def test_classify_gives_the_classifiers_own_logits_on_unpadded_images():
    """Images whose sides are multiples of the bucket are not padded: the logits are the model's own, whatever the
    batching; labels come back in record order."""
    import jax
    from flax import nnx

    from puzzle_jax import models

    model = models.create_classifier("resnet_tiny", 3, bn_mode="global", rngs=nnx.Rngs(0))
    nnx.update(model, jax.tree.map(lambda value: value * 0.5 + 0.1, nnx.state(model, nnx.BatchStat)))
    model.eval()
    rng = np.random.default_rng(4)
    records = [
        {"image": rng.integers(0, 256, size, dtype=np.uint8), "labels": np.eye(3, dtype=np.float32)[index % 3]}
        for index, size in enumerate([(64, 64, 3), (64, 128, 3), (64, 64, 3), (128, 64, 3), (64, 64, 3)])
    ]
    logits, labels = cam_inference.classify(model, records, output_stride=16, images_per_call=2)
    assert logits.shape == labels.shape == (5, 3)
    for record, row, label_row in zip(records, logits, labels, strict=True):
        normalised = transforms.normalize_image(record["image"])[None]
        expected = np.asarray(model(normalised)[0])[0]
        np.testing.assert_allclose(row, expected, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(label_row, record["labels"])


def test_an_image_one_pixel_high_gets_cams_of_its_own_size():
    """Issue 17: scale 0.5 rounded its height to 0 and PIL failed without naming the image. Each side is kept at
    one pixel (the torch transcription with that size as the scaled input), and the CAMs have the image's size."""
    rng = np.random.default_rng(11)
    image = rng.integers(0, 256, (1, 37, 3), dtype=np.uint8)
    image[:, :10] = 255
    labels = np.array([1.0, 1.0, 0.0])
    ((image_id, result),) = cam_inference.iterate_cams(
        _cell_sums, [("thin", image, labels)], scales=(0.5, 1.0), flip=True, pad_multiple=64,
        output_stride=STRIDE, images_per_call=2,
    )
    assert image_id == "thin"
    assert result["hr_cam"].shape == (2, 1, 37) and result["cam"].shape == (2, 1, 10)
    # The reference: the authors' arithmetic on the image at scale 1.0 and at the clamped 1x18 for scale 0.5.
    inputs = [image, np.asarray(Image.fromarray(image).resize((18, 1), Image.BICUBIC))]
    np.testing.assert_allclose(result["hr_cam"], _torch_high_of_inputs(inputs, labels, 1, 37), rtol=1e-4, atol=1e-5)


def _torch_high_of_inputs(inputs, labels, height, width):
    """The full-resolution CAMs of ``_torch_reference`` from already resized uint8 inputs."""
    up_size = (math.ceil(height / 16) * 16, math.ceil(width / 16) * 16)
    high = []
    for resized in inputs:
        normalised = (resized.astype(np.float32) / 255.0 - MEAN) / STD
        x = torch.from_numpy(normalised.astype(np.float32)).permute(2, 0, 1)[None]
        maps = torch.from_numpy(_normalised_cell_sums(torch.cat([x, x.flip(-1)]).permute(0, 2, 3, 1).numpy()))
        maps = maps.permute(0, 3, 1, 2)
        maps = maps[0:1] + maps[1:2].flip(-1)
        high.append(F.interpolate(maps, up_size, mode="bilinear", align_corners=False)[0, :, :height, :width])
    high = torch.stack(high).sum(0)[np.nonzero(labels)[0]]
    return (high / (F.adaptive_max_pool2d(high, (1, 1)) + 1e-5)).numpy()


def test_a_pixel_budget_leaves_the_cams_unchanged():
    rng = np.random.default_rng(12)
    sizes = [(60, 50), (20, 30), (33, 41)]
    records = [(str(i), rng.integers(0, 256, (*size, 3), np.uint8), np.array([1.0, 0.0, 1.0]))
               for i, size in enumerate(sizes)]
    settings = dict(scales=(0.5, 1.0), flip=True, pad_multiple=16, output_stride=STRIDE, images_per_call=3)
    unbudgeted = dict(cam_inference.iterate_cams(_cell_sums, records, **settings))
    # The largest input (60x50, padded to 64x64) runs alone within the budget; smaller buckets hold 2 or more.
    budgeted = dict(cam_inference.iterate_cams(_cell_sums, records, max_pixels_per_call=2 * 64 * 64, **settings))
    for image_id, payload in unbudgeted.items():
        np.testing.assert_array_equal(budgeted[image_id]["keys"], payload["keys"])
        for field in ("cam", "hr_cam"):
            # Equal up to float32 rounding: the calls' order, hence the order an image's scales are summed in, differs.
            np.testing.assert_allclose(budgeted[image_id][field], payload[field], rtol=1e-6, atol=1e-7)
