"""Tests of the training objectives: Puzzle-CAM is the sum of the spec's terms (checked against an independent
computation), plain CAM runs no tiled pass, padding, and the loader's uint8 crops normalised like the host's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import default
from puzzle_jax import objectives

NUM_CLASSES = 4


class _CountingCamModel(nnx.Module):
    """A linear CAM model (stride-4 conv + 1x1 head, no BN) that counts its calls, for exact expectations."""

    def __init__(self):
        rngs = nnx.Rngs(0)
        self.model = nnx.Conv(3, 6, (4, 4), strides=(4, 4), use_bias=True, rngs=rngs)
        self.classifier = nnx.Conv(6, NUM_CLASSES, (1, 1), use_bias=False, rngs=rngs)
        self.calls = []

    def __call__(self, images):
        self.calls.append(images.shape)
        maps = self.classifier(jnp.tanh(self.model(images)))
        return maps.mean(axis=(1, 2)), maps


def _cam_config(**overrides):
    """The default config's Puzzle-CAM settings (the paper's), with ``overrides``."""
    cam = default.get_config().cam
    cam.update(overrides)
    return cam


def _soft_margin(logits, labels):
    logits = np.asarray(logits, np.float64)
    log_sigmoid = -np.log1p(np.exp(-logits))
    log_one_minus = -np.log1p(np.exp(logits))
    return -np.mean(labels * log_sigmoid + (1 - labels) * log_one_minus)


def _batch(size=32, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.array([[1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]], np.float32)
    return {"image": rng.normal(size=(3, size, size, 3)).astype(np.float32), "labels": labels}


def test_puzzle_objective_is_the_sum_of_the_spec_terms():
    model = _CountingCamModel()
    batch = _batch()
    total_steps, step = 100, 20
    objective = objectives.create_puzzle_objective(_cam_config(), total_steps, output_stride=4)
    loss, metrics = objective(model, batch, jnp.asarray(step))

    # Independent expectation: the full pass, the four quadrants of each image as separate images.
    logits, maps = (np.asarray(a, np.float64) for a in model(jnp.asarray(batch["image"])))
    quadrant_maps = np.zeros_like(maps)
    half_image, half_map = 16, maps.shape[1] // 2
    for row in range(2):
        for column in range(2):
            quadrant = batch["image"][
                :,
                row * half_image : (row + 1) * half_image,
                column * half_image : (column + 1) * half_image,
            ]
            _, quadrant_map = model(jnp.asarray(quadrant))
            quadrant_maps[
                :,
                row * half_map : (row + 1) * half_map,
                column * half_map : (column + 1) * half_map,
            ] = np.asarray(quadrant_map)
    labels = batch["labels"]
    class_loss = _soft_margin(logits, labels)
    puzzle_class_loss = _soft_margin(quadrant_maps.mean(axis=(1, 2)), labels)
    masked = np.abs(maps - quadrant_maps) * labels[:, None, None, :]
    reconstruction = masked.mean()  # mean over all B*h*w*C elements (masking)
    alpha = min(4.0 * step / (total_steps * 0.5), 4.0)
    expected = class_loss + puzzle_class_loss + alpha * reconstruction
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["reconstruction_loss"]), reconstruction, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["alpha"]), alpha, rtol=1e-6)


def test_plain_cam_option_runs_no_tiled_pass():
    model = _CountingCamModel()
    objective = objectives.create_puzzle_objective(_cam_config(loss_option="cl"), 10, output_stride=4)
    loss, metrics = objective(model, _batch(), jnp.asarray(0))
    assert model.calls == [(3, 32, 32, 3)]
    assert set(metrics) == {"class_loss"}
    np.testing.assert_allclose(float(loss), float(metrics["class_loss"]))


def test_sizes_not_divisible_by_grid_times_stride_are_padded():
    model = _CountingCamModel()
    objective = objectives.create_puzzle_objective(_cam_config(), 10, output_stride=4)
    loss, _ = objective(model, _batch(size=36), jnp.asarray(0))  # 36 is not a multiple of 2 x 4
    assert np.isfinite(float(loss))
    assert model.calls == [(3, 40, 40, 3), (12, 20, 20, 3)]


@pytest.mark.parametrize("objective_name", ["puzzle", "classification"])
def test_objectives_normalise_the_loaders_uint8_crops_like_the_host(objective_name):
    """A loader batch (uint8 crops + boxes) gives the loss of its host-normalised float batch."""
    from puzzle_jax.data import transforms

    rng = np.random.default_rng(3)
    crops = rng.integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    boxes = np.array([[0, 0, 32, 32], [4, 0, 20, 32], [0, 6, 32, 19]], np.int32)
    normalised = np.zeros(crops.shape, np.float32)
    for crop, (top, left, height, width), out in zip(crops, boxes, normalised):
        out[top : top + height, left : left + width] = transforms.normalize_image(
            crop[top : top + height, left : left + width]
        )
    labels = _batch()["labels"]
    if objective_name == "puzzle":
        objective = objectives.create_puzzle_objective(_cam_config(), 10, output_stride=4)
    else:
        objective = objectives.create_classification_objective()
    loader_loss, _ = jax.jit(lambda batch: objective(_CountingCamModel(), batch, jnp.asarray(3)))(
        {"image": crops, "image_box": boxes, "labels": labels}
    )
    host_loss, _ = jax.jit(lambda batch: objective(_CountingCamModel(), batch, jnp.asarray(3)))(
        {"image": normalised, "labels": labels}
    )
    assert float(loader_loss) == float(host_loss)
    with pytest.raises(ValueError, match="image_box"):
        objective(_CountingCamModel(), {"image": crops, "labels": labels}, jnp.asarray(3))


def test_bad_cam_settings_name_the_field():
    with pytest.raises(ValueError, match="cam.loss_option"):
        objectives.create_puzzle_objective(_cam_config(loss_option="cl_pcl_re_conf2"), 10, 16)
    with pytest.raises(ValueError, match="cam.level"):
        objectives.create_puzzle_objective(_cam_config(level="pixels"), 10, 16)


def test_batch_images_needs_the_box_of_uint8_crops_and_rejects_integers():
    crops = np.zeros((2, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="image_box"):
        objectives.batch_images({"image": crops})
    with pytest.raises(ValueError, match="int32"):
        objectives.batch_images({"image": crops.astype(np.int32)})
    images = np.ones((2, 8, 8, 3), np.float32)
    assert objectives.batch_images({"image": images}) is images


# --- AffinityNet (spec §8) ---------------------------------------------------------------------------------------


def _spec_affinity_loss(affinities, bg_positive, fg_positive, negative):
    """Spec §8's loss in float64 numpy, sums over everything, as the authors' train_affinitynet.py writes it."""
    aff = np.asarray(affinities, np.float64)
    bg, fg, neg = (np.asarray(mask, np.float64) for mask in (bg_positive, fg_positive, negative))
    positive = -np.log(aff + 1e-5)
    negative_term = -np.log(1.0 + 1e-5 - aff)
    bg_loss = np.sum(bg * positive) / (np.sum(bg) + 1e-5)
    fg_loss = np.sum(fg * positive) / (np.sum(fg) + 1e-5)
    negative_loss = np.sum(neg * negative_term) / (np.sum(neg) + 1e-5)
    return (bg_loss / 2 + fg_loss / 2 + negative_loss) / 2, bg_loss, fg_loss, negative_loss


@pytest.mark.parametrize("with_foreground", [True, False])
def test_affinity_loss_is_the_spec_formula(with_foreground):
    rng = np.random.default_rng(0)
    shape = (2, 7, 5, 6)
    affinities = rng.uniform(0.0, 1.0, shape).astype(np.float32)
    affinities.flat[:3] = (0.0, 1.0, 1.0)  # the logs' epsilons keep the ends finite
    kind = rng.integers(0, 4, shape)  # 0 bg pair, 1 fg pair, 2 negative, 3 ignored
    if not with_foreground:
        kind[kind == 1] = 0
    masks = [kind == index for index in range(3)]
    loss, metrics = objectives.affinity_loss(jnp.asarray(affinities), *(jnp.asarray(mask) for mask in masks))
    expected, bg_loss, fg_loss, negative_loss = _spec_affinity_loss(affinities, *masks)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["bg_positive_loss"]), bg_loss, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["fg_positive_loss"]), fg_loss, rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(float(metrics["negative_loss"]), negative_loss, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["positive_loss"]), bg_loss / 2 + fg_loss / 2, rtol=1e-5)
    for name, mask in zip(("bg_positive", "fg_positive", "negative"), masks, strict=True):
        assert float(metrics[f"{name}_pairs"]) == mask.sum()
    if not with_foreground:
        # No fg pair: that term is 0 and the loss is 1/4 bg + 1/2 negative.
        assert float(metrics["fg_positive_loss"]) == 0.0 and float(metrics["fg_positive_pairs"]) == 0
    # Finite gradients everywhere, including at affinities 0 and 1.
    grads = jax.grad(lambda a: objectives.affinity_loss(a, *(jnp.asarray(m) for m in masks))[0])(
        jnp.asarray(affinities)
    )
    assert np.all(np.isfinite(np.asarray(grads)))


def _brute_force_affinity_loss(edge_logits, label_maps, radius):
    """Spec §8 from the definitions, pair by pair in float64: every source of the window and destination within the
    radius (directions (0, x), x >= 1, and (y, x), y >= 1), affinity 1 - the largest sigmoid edge on the grid points
    of the pair's bounding box within distance 1 of the line through them, both ends labelled (< 255)."""
    edge = 1 / (1 + np.exp(-np.asarray(edge_logits, np.float64)))
    batch, height, width = edge.shape
    margin = radius - 1
    bg, fg, neg = [], [], []
    for b in range(batch):
        for y in range(0, height - margin):
            for x in range(margin, width - margin):
                for dy in range(0, radius):
                    for dx in range(-margin, radius):
                        if (dy == 0 and dx <= 0) or dy * dy + dx * dx >= radius * radius:
                            continue
                        points = [
                            (py, px)
                            for py in range(0, dy + 1)
                            for px in range(min(0, dx), max(0, dx) + 1)
                            if (dy * px - dx * py) ** 2 < dy * dy + dx * dx
                        ]
                        aff = 1 - max(edge[b, y + py, x + px] for py, px in points)
                        source, destination = label_maps[b, y, x], label_maps[b, y + dy, x + dx]
                        if source == 255 or destination == 255:
                            continue
                        if source != destination:
                            neg.append(aff)
                        else:
                            (bg if source == 0 else fg).append(aff)
    bg, fg, neg = (np.asarray(values) for values in (bg, fg, neg))
    bg_loss = np.sum(-np.log(bg + 1e-5)) / (len(bg) + 1e-5)
    fg_loss = np.sum(-np.log(fg + 1e-5)) / (len(fg) + 1e-5)
    negative_loss = np.sum(-np.log(1 + 1e-5 - neg)) / (len(neg) + 1e-5)
    return (bg_loss / 2 + fg_loss / 2 + negative_loss) / 2, (len(bg), len(fg), len(neg))


class _FixedEdgeModel(nnx.Module):
    """Returns fixed edge logits whatever the images (stride 4 of the images), so the loss is known exactly."""

    def __init__(self, logits):
        self.logits = nnx.Param(jnp.asarray(logits))

    def __call__(self, images):
        assert images.shape[1:3] == tuple(4 * side for side in self.logits.shape[1:])
        return self.logits[...]


def test_affinity_objective_equals_the_pair_by_pair_definition():
    rng = np.random.default_rng(1)
    radius, height, width = 3, 8, 9
    logits = rng.normal(0.0, 2.0, (2, height, width)).astype(np.float32)
    label_maps = rng.choice([0, 0, 1, 2, 255], (2, height, width)).astype(np.uint8)
    label_maps[:, :4, :5] = 1  # a foreground block, so that fg pairs exist
    batch = {
        "image": jnp.zeros((2, 4 * height, 4 * width, 3), jnp.float32),
        "mask": jnp.asarray(label_maps),
    }
    loss, metrics = objectives.create_affinity_objective(radius)(_FixedEdgeModel(logits), batch, 0)
    expected, counts = _brute_force_affinity_loss(logits, label_maps, radius)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert tuple(int(metrics[f"{name}_pairs"]) for name in ("bg_positive", "fg_positive", "negative")) == counts
    assert min(counts) > 0
    wrong = {**batch, "mask": jnp.zeros((2, height + 1, width), jnp.uint8)}
    with pytest.raises(ValueError, match="stride-4 grid"):
        objectives.create_affinity_objective(radius)(_FixedEdgeModel(logits), wrong, 0)
