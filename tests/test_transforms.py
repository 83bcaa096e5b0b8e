"""Tests for puzzle_jax.data.transforms against spec §4, written out independently here."""

import numpy as np
import pytest
import torch
from PIL import Image

from puzzle_jax.data import transforms

# Spec §4 / torchvision's ImageNet statistics, restated here rather than imported.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def torch_normalize(image: np.ndarray) -> np.ndarray:
    """Direct torch transcription of the authors' normalisation: (RGB / 255 - mean) / std."""
    tensor = torch.from_numpy(np.array(image, copy=True)).float() / 255.0
    return ((tensor - torch.tensor(MEAN)) / torch.tensor(STD)).numpy()


def random_image(rng, height, width):
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def random_mask(rng, height, width):
    return rng.integers(0, 6, size=(height, width), dtype=np.uint8)


def find_window(haystack: np.ndarray, needle: np.ndarray) -> list[tuple[int, int]]:
    """All (top, left) where needle equals haystack[top:top+h, left:left+w] (brute force)."""
    height, width = needle.shape[:2]
    return [
        (top, left)
        for top in range(haystack.shape[0] - height + 1)
        for left in range(haystack.shape[1] - width + 1)
        if np.array_equal(haystack[top : top + height, left : left + width], needle)
    ]


def test_normalize_matches_torch_transcription():
    image = random_image(np.random.default_rng(0), 7, 9)
    image[0, 0] = (0, 0, 0)
    image[0, 1] = (255, 255, 255)
    result = transforms.normalize_image(image)
    assert result.dtype == np.float32
    np.testing.assert_allclose(result, torch_normalize(image), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(result[0, 0], [-m / s for m, s in zip(MEAN, STD)], rtol=1e-6)
    np.testing.assert_allclose(result[0, 1], [(1 - m) / s for m, s in zip(MEAN, STD)], rtol=1e-6)


@pytest.mark.parametrize(
    "height,width,long_side", [(30, 50, 80), (50, 30, 40), (33, 33, 17), (10, 97, 64)]
)
def test_rescale_long_side_keeps_aspect_and_uses_pil_bicubic_and_nearest(height, width, long_side):
    rng = np.random.default_rng(1)
    image, mask = random_image(rng, height, width), random_mask(rng, height, width)
    out_image, out_mask = transforms.rescale_long_side(image, mask, long_side)
    assert max(out_image.shape[:2]) == long_side
    short_expected = round(min(height, width) * long_side / max(height, width))
    assert min(out_image.shape[:2]) == short_expected
    assert (out_image.shape[0] >= out_image.shape[1]) == (height >= width)
    new_height, new_width = out_image.shape[:2]
    expected_image = np.asarray(
        Image.fromarray(image).resize((new_width, new_height), Image.BICUBIC)
    )
    np.testing.assert_array_equal(out_image, expected_image)
    # Nearest neighbour written out: output pixel centre mapped back to the input grid.
    rows = np.floor((np.arange(new_height) + 0.5) * height / new_height).astype(int)
    cols = np.floor((np.arange(new_width) + 0.5) * width / new_width).astype(int)
    np.testing.assert_array_equal(out_mask, mask[rows][:, cols])


def test_random_rescale_draws_integer_long_side_in_inclusive_range():
    image = random_image(np.random.default_rng(2), 20, 30)
    long_sides = set()
    for seed in range(300):
        out, _ = transforms.random_rescale_long_side(
            image, None, min_long_side=24, max_long_side=28, rng=np.random.default_rng(seed)
        )
        assert out.shape[0] == round(20 * out.shape[1] / 30)
        long_sides.add(out.shape[1])
    assert long_sides == {24, 25, 26, 27, 28}


def test_random_rescale_rejects_bad_range():
    image = random_image(np.random.default_rng(0), 8, 8)
    with pytest.raises(ValueError, match=r"\(30, 20\)"):
        transforms.random_rescale_long_side(
            image, None, min_long_side=30, max_long_side=20, rng=np.random.default_rng(0)
        )


def test_horizontal_flip_is_exact_mirror_about_half_the_time():
    rng = np.random.default_rng(3)
    image, mask = random_image(rng, 6, 11), random_mask(rng, 6, 11)
    flipped = 0
    for seed in range(400):
        out_image, out_mask = transforms.random_horizontal_flip(
            image, mask, rng=np.random.default_rng(seed)
        )
        if np.array_equal(out_image, image):
            np.testing.assert_array_equal(out_mask, mask)
        else:
            np.testing.assert_array_equal(out_image, image[:, ::-1])
            np.testing.assert_array_equal(out_mask, mask[:, ::-1])
            flipped += 1
    assert 0.4 < flipped / 400 < 0.6


def test_crop_of_larger_image_is_a_window_at_random_offsets():
    rng = np.random.default_rng(4)
    image = transforms.normalize_image(random_image(rng, 40, 50))
    mask = random_mask(rng, 40, 50)
    offsets = set()
    for seed in range(30):
        out_image, out_mask, box = transforms.random_crop(
            image, mask, crop_size=32, rng=np.random.default_rng(seed)
        )
        assert out_image.shape == (32, 32, 3) and out_mask.shape == (32, 32)
        assert box.tolist() == [0, 0, 32, 32], "the whole canvas holds image pixels"
        (top, left), = find_window(image, out_image)
        np.testing.assert_array_equal(out_mask, mask[top : top + 32, left : left + 32])
        offsets.add((top, left))
    assert len(offsets) > 10
    assert all(0 <= top <= 8 and 0 <= left <= 18 for top, left in offsets)


def test_smaller_image_is_pasted_at_random_offset_on_zero_canvas_and_mask_255():
    rng = np.random.default_rng(5)
    image = transforms.normalize_image(random_image(rng, 10, 20))
    mask = random_mask(rng, 10, 20)
    offsets = set()
    for seed in range(40):
        out_image, out_mask, box = transforms.random_crop(
            image, mask, crop_size=32, rng=np.random.default_rng(seed)
        )
        (top, left), = find_window(out_image, image)
        assert box.tolist() == [top, left, 10, 20]
        np.testing.assert_array_equal(out_mask[top : top + 10, left : left + 20], mask)
        outside = np.ones((32, 32), bool)
        outside[top : top + 10, left : left + 20] = False
        assert np.all(out_image[outside] == 0.0)
        assert np.all(out_mask[outside] == 255)
        offsets.add((top, left))
    assert len(offsets) > 10, "the paste position must be random, not always the corner"
    assert all(0 <= top <= 22 and 0 <= left <= 12 for top, left in offsets)


def test_crop_handles_one_side_longer_and_one_shorter():
    rng = np.random.default_rng(6)
    image = transforms.normalize_image(random_image(rng, 45, 12))
    mask = random_mask(rng, 45, 12)
    for seed in range(10):
        out_image, out_mask, box = transforms.random_crop(
            image, mask, crop_size=32, rng=np.random.default_rng(seed)
        )
        # Some 32-row window of the image's full width sits somewhere in the canvas's columns.
        matches = [
            (row, column)
            for row in range(45 - 32 + 1)
            for column in range(32 - 12 + 1)
            if np.array_equal(out_image[:, column : column + 12], image[row : row + 32])
        ]
        assert len(matches) == 1
        row, column = matches[0]
        assert box.tolist() == [0, column, 32, 12]
        np.testing.assert_array_equal(out_mask[:, column : column + 12], mask[row : row + 32])
        assert np.all(np.delete(out_mask, np.s_[column : column + 12], axis=1) == 255)
        assert np.all(np.delete(out_image, np.s_[column : column + 12], axis=1) == 0.0)


def test_train_transform_composes_rescale_flip_normalize_then_pad():
    """Image smaller than the crop after rescale: the output must be the rescaled, maybe flipped,
    normalised image on a zero canvas (zero AFTER normalisation, i.e. the mean colour)."""
    rng = np.random.default_rng(7)
    image, mask = random_image(rng, 20, 30), random_mask(rng, 20, 30)
    resized = np.asarray(Image.fromarray(image).resize((36, 24), Image.BICUBIC))
    resized_mask = np.asarray(Image.fromarray(mask).resize((36, 24), Image.NEAREST))
    flips = set()
    for seed in range(20):
        out_image, out_mask = transforms.train_transform(
            image, mask, crop_size=48, rescale_range=(36, 36), rng=np.random.default_rng(seed)
        )
        assert out_image.shape == (48, 48, 3) and out_image.dtype == np.float32
        assert out_mask.shape == (48, 48) and out_mask.dtype == np.uint8
        for flip, candidate, candidate_mask in (
            (False, resized, resized_mask),
            (True, resized[:, ::-1], resized_mask[:, ::-1]),
        ):
            found = find_window(out_image, torch_normalize(candidate))
            if found:
                (top, left), = found
                window = out_mask[top : top + 24, left : left + 36]
                np.testing.assert_array_equal(window, candidate_mask)
                flips.add(flip)
                break
        else:
            pytest.fail(f"seed {seed}: the transformed image is not the resized image on a canvas")
        assert np.count_nonzero(np.abs(out_image).sum(-1)) <= 24 * 36
        assert np.count_nonzero(out_mask == 255) >= 48 * 48 - 24 * 36
    assert flips == {False, True}


def test_train_transform_value_range_and_determinism():
    rng = np.random.default_rng(8)
    image = random_image(rng, 90, 70)
    low = np.array([-m / s for m, s in zip(MEAN, STD)], np.float32)
    high = np.array([(1 - m) / s for m, s in zip(MEAN, STD)], np.float32)
    outputs = []
    for seed in (0, 0, 1):
        out, none_mask = transforms.train_transform(
            image, crop_size=64, rescale_range=(50, 120), rng=np.random.default_rng(seed)
        )
        assert none_mask is None
        assert out.shape == (64, 64, 3)
        assert np.all(out >= low - 1e-5) and np.all(out <= high + 1e-5)
        outputs.append(out)
    np.testing.assert_array_equal(outputs[0], outputs[1])
    assert not np.array_equal(outputs[0], outputs[2])


def test_train_crop_is_the_uint8_crop_that_train_transform_normalises():
    """train_crop stops before the normalisation: the resized (maybe flipped) uint8 image sits at
    the returned box on a zero canvas, and it draws the random numbers train_transform draws."""
    rng = np.random.default_rng(10)
    for height, width, crop, scale in ((20, 30, 48, (36, 36)), (60, 80, 32, (70, 90)), (40, 12, 32, (45, 45))):
        image, mask = random_image(rng, height, width), random_mask(rng, height, width)
        for seed in range(8):
            crop_image, crop_mask, box = transforms.train_crop(
                image, mask, crop_size=crop, rescale_range=scale, rng=np.random.default_rng(seed)
            )
            assert crop_image.dtype == np.uint8 and crop_image.shape == (crop, crop, 3)
            assert box.dtype == np.int32 and box.shape == (4,)
            top, left, box_height, box_width = box.tolist()
            outside = np.ones((crop, crop), bool)
            outside[top : top + box_height, left : left + box_width] = False
            assert np.all(crop_image[outside] == 0) and np.all(crop_mask[outside] == 255)
            # The same draws: normalising the box of the uint8 crop gives train_transform's output.
            expected = np.zeros((crop, crop, 3), np.float32)
            expected[~outside] = torch_normalize(crop_image)[~outside]
            normalised, normalised_mask = transforms.train_transform(
                image, mask, crop_size=crop, rescale_range=scale, rng=np.random.default_rng(seed)
            )
            np.testing.assert_array_equal(normalised, expected)
            np.testing.assert_array_equal(normalised_mask, crop_mask)


def test_train_crop_box_locates_the_resized_image():
    rng = np.random.default_rng(11)
    image = random_image(rng, 20, 30)
    resized = np.asarray(Image.fromarray(image).resize((36, 24), Image.BICUBIC))
    for seed in range(10):
        crop_image, _, box = transforms.train_crop(
            image, crop_size=48, rescale_range=(36, 36), rng=np.random.default_rng(seed)
        )
        top, left, height, width = box.tolist()
        assert (height, width) == (24, 36)
        window = crop_image[top : top + 24, left : left + 36]
        assert np.array_equal(window, resized) or np.array_equal(window, resized[:, ::-1])


def test_train_crop_rejects_float_images():
    with pytest.raises(ValueError, match="uint8"):
        transforms.train_crop(
            np.zeros((8, 8, 3), np.float32), crop_size=8, rescale_range=(8, 8), rng=np.random.default_rng(0)
        )


def test_normalize_crops_on_device_matches_the_host_normalisation():
    """normalize_crops (JAX) = the torch transcription inside each box, zero outside, exactly."""
    import jax

    rng = np.random.default_rng(12)
    images = rng.integers(0, 256, size=(5, 16, 20, 3), dtype=np.uint8)
    boxes = np.array([[0, 0, 16, 20], [3, 4, 5, 7], [0, 9, 16, 11], [10, 0, 6, 20], [15, 19, 1, 1]], np.int32)
    out = np.asarray(jax.jit(transforms.normalize_crops)(images, boxes))
    assert out.dtype == np.float32 and out.shape == images.shape
    for image, (top, left, height, width), result in zip(images, boxes, out):
        expected = np.zeros(image.shape, np.float32)
        window = (slice(top, top + height), slice(left, left + width))
        expected[window] = torch_normalize(image)[window]
        np.testing.assert_array_equal(result, expected)  # bit for bit, as on the host


@pytest.mark.parametrize(
    "pad_to,pad_multiple,expected",
    [
        (None, None, (21, 34)),
        ((32, 40), None, (32, 40)),
        (None, 16, (32, 48)),
        ((40, 40), 16, (48, 48)),
    ],
)
def test_eval_transform_pads_bottom_right(pad_to, pad_multiple, expected):
    rng = np.random.default_rng(9)
    image, mask = random_image(rng, 21, 34), random_mask(rng, 21, 34)
    out_image, out_mask = transforms.eval_transform(
        image, mask, pad_to=pad_to, pad_multiple=pad_multiple
    )
    assert out_image.shape == expected + (3,) and out_mask.shape == expected
    np.testing.assert_allclose(out_image[:21, :34], torch_normalize(image), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(out_mask[:21, :34], mask)
    assert np.all(out_image[21:] == 0) and np.all(out_image[:, 34:] == 0)
    assert np.all(out_mask[21:] == 255) and np.all(out_mask[:, 34:] == 255)


def test_eval_transform_rejects_pad_smaller_than_image():
    image = random_image(np.random.default_rng(0), 21, 34)
    with pytest.raises(ValueError, match=r"\(20, 40\).*\(21, 34\)"):
        transforms.eval_transform(image, pad_to=(20, 40))


def test_resize_image_is_pil_bicubic_to_the_requested_size():
    image = random_image(np.random.default_rng(10), 21, 34)
    resized = transforms.resize_image(image, 30, 17)
    assert resized.shape == (30, 17, 3) and resized.dtype == np.uint8
    expected = np.asarray(Image.fromarray(image).resize((17, 30), Image.BICUBIC))
    np.testing.assert_array_equal(resized, expected)
    np.testing.assert_array_equal(transforms.resize_image(image, 21, 34), image)
