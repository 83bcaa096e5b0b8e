"""Tests of rw_inference: the bucket padding leaves the walk unchanged, the edge merges an image with its flip as
the authors do (crop to the stride-4 grid, then flip back), and a missing or mismatched CAM file is named."""

import math

import numpy as np
import pytest

from puzzle_jax import cam_files, rw_inference
from puzzle_jax.refine import random_walk

SETTINGS = {"radius": 5, "beta": 10.0, "exp_times": 8}


@pytest.mark.parametrize("rows, columns, classes", [(7, 9, 1), (13, 5, 3), (16, 16, 2)])
def test_the_bucketed_walk_equals_the_walk_of_the_unpadded_grid(rows, columns, classes):
    rng = np.random.default_rng(rows * columns)
    cams = rng.random((classes, rows, columns), dtype=np.float32)
    edge = (rng.random((rows, columns), dtype=np.float32) ** 3).astype(np.float32)
    height, width = 4 * rows - 2, 4 * columns - 3
    walked = rw_inference.walk(cams, edge, height=height, width=width, **SETTINGS)
    # The unpadded grid, without the bucket's padding of cells (edge 1.0) and classes (zero maps).
    direct = random_walk.upsample_walk(random_walk.propagate_to_edge(cams, edge, **SETTINGS), height, width)
    assert walked.shape == (classes, height, width)
    np.testing.assert_allclose(walked, np.asarray(direct), rtol=1e-4, atol=1e-6)
    assert walked.max() == pytest.approx(1.0)


def test_an_image_without_classes_walks_to_nothing():
    walked = rw_inference.walk(np.zeros((0, 3, 4), np.float32), np.zeros((3, 4), np.float32), height=10, width=13,
                               **SETTINGS)
    assert walked.shape == (0, 10, 13)


def test_the_edge_is_the_sigmoid_of_the_mean_of_the_logits_and_the_cropped_flipped_back_flip_logits():
    rng = np.random.default_rng(0)
    height, width = 21, 30  # stride-4 grid 6 x 8, inside a 16 x 16 canvas of logits
    outputs = rng.normal(size=(2, 16, 16)).astype(np.float32)
    accumulator = rw_inference.WalkAccumulator((height, width), {}, SETTINGS)
    accumulator.add(outputs, (height, width))
    rows, columns = math.ceil(height / 4), math.ceil(width / 4)
    straight, flipped = outputs[0, :rows, :columns], outputs[1, :rows, :columns]
    expected = 1 / (1 + np.exp(-(straight + flipped[:, ::-1]) / 2))
    np.testing.assert_allclose(accumulator.edge(), expected, rtol=1e-6)


def test_a_missing_or_mismatched_cam_file_is_named(tmp_path):
    record = {"id": "img_7", "image": np.zeros((20, 30, 3), np.uint8)}
    with pytest.raises(FileNotFoundError, match=r"img_7\.npz.*'img_7'.*run infer_cam"):
        rw_inference.read_strided_cams(str(tmp_path), record)
    cam_files.write_cam_file(
        cam_files.path_of(str(tmp_path), "img_7"), keys=np.array([0, 3]), cam=np.zeros((1, 6, 8), np.float32)
    )
    with pytest.raises(ValueError, match=r"6x8.*20x30.*5x8"):
        rw_inference.read_strided_cams(str(tmp_path), record)
    cam_files.write_cam_file(
        cam_files.path_of(str(tmp_path), "img_7"), keys=np.array([0, 3]), cam=np.ones((1, 5, 8), np.float32)
    )
    contents = rw_inference.read_strided_cams(str(tmp_path), record)
    assert contents["keys"].tolist() == [0, 3] and contents["cam"].shape == (1, 5, 8)
