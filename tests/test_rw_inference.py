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


@pytest.mark.slow
def test_a_killed_infer_rw_resumes_without_recomputing_and_leaves_no_partial_file(tmp_path):
    """``infer_rw`` through the command line, killed (SIGKILL) once some walk files exist: only complete files are
    left, and a rerun writes exactly the missing ones (an untrained AffinityNet and random CAMs: the walk's inputs
    need not be meaningful for this)."""
    import importlib
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    import ml_collections
    from flax import nnx

    from puzzle_jax import checkpointing, models, pipeline, training
    from puzzle_jax.data import datasets

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = importlib.import_module("configs.demo").get_config()
    config.data.data_dir = str(tmp_path / "data")
    count = 48
    config.data.builder_kwargs = ml_collections.ConfigDict(dict(num_pretrain=2, num_train=count, num_val=2))
    records, _ = datasets.load_split_from_config(config.data, "train", decode_masks=False)
    workdir = pipeline.Workdir(str(tmp_path / "run"))
    rng = np.random.default_rng(0)
    for record in records:
        classes = np.flatnonzero(record["labels"]) + 1
        height, width = record["image"].shape[:2]
        cams = rng.random((len(classes), math.ceil(height / 4), math.ceil(width / 4)), dtype=np.float32)
        cam_files.write_cam_file(
            cam_files.path_of(workdir.cam_dir(), record["id"]), keys=np.concatenate([[0], classes]), cam=cams
        )
    network = models.create_model(models.affinity_config(arch="resnet_tiny"), rngs=nnx.Rngs(0))
    _, params, batch_stats = training.split_model(network)
    checkpointing.export_model(workdir.exported_model("train_aff"), params, batch_stats,
                               models.affinity_config(arch="resnet_tiny"))
    command = [
        sys.executable, "-m", "puzzle_jax.main", "--config=configs/demo.py", f"--workdir={workdir.root}",
        f"--config.data.data_dir={config.data.data_dir}", "--config.stages=infer_rw",
        f"--config.data.builder_kwargs={{'num_pretrain': 2, 'num_train': {count}, 'num_val': 2}}",
    ]
    environment = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    process = subprocess.Popen(command, cwd=repo, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 600
    while time.time() < deadline and process.poll() is None:
        done = os.listdir(workdir.random_walk_dir()) if os.path.isdir(workdir.random_walk_dir()) else []
        if len([name for name in done if not name.startswith(".")]) >= 2:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "the stage finished before it could be killed"
    # Outputs are complete files; a write cut short leaves at most a hidden temporary, never an <id>.npz.
    first = sorted(name for name in os.listdir(workdir.random_walk_dir()) if not name.startswith("."))
    assert 2 <= len(first) < count and all(name.endswith(".npz") for name in first)
    for name in first:  # every file left behind is complete
        assert cam_files.read_cam_file(os.path.join(workdir.random_walk_dir(), name), ("rw",))["rw"].ndim == 3
    mtimes = {name: os.stat(os.path.join(workdir.random_walk_dir(), name)).st_mtime_ns for name in first}
    rerun = subprocess.run(command, cwd=repo, env=environment, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "infer_rw" / "summary.json").read_text())
    assert (summary["written"], summary["skipped_existing"]) == (count - len(first), len(first))
    # Every output is there, and the rerun removed what the killed writer left.
    assert len(os.listdir(workdir.random_walk_dir())) == count
    assert {name: os.stat(os.path.join(workdir.random_walk_dir(), name)).st_mtime_ns for name in first} == mtimes


def test_the_edge_calls_keep_to_the_pixel_budget():
    """The walk's edge inference goes through the same budget as the CAMs (issue 17): a canvas-sized pair per call
    when the budget holds only one, and an image over it even alone is named with the field."""
    calls = []

    def edge_logits(images, boxes):
        calls.append(images.shape)
        return np.zeros((len(images), images.shape[1] // 4, images.shape[2] // 4), np.float32)

    rng = np.random.default_rng(1)
    records = []
    for index in range(3):
        image = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
        cam_file = {"keys": np.array([0, 2]), "cam": rng.random((1, 5, 6)).astype(np.float32)}
        records.append((f"im{index}", image, cam_file))
    settings = dict(edge_canvas=32, flip=True, radius=2, beta=10.0, exp_times=2, images_per_call=4, host_threads=1)
    unbudgeted = dict(rw_inference.iterate_walks(edge_logits, records, **settings))
    assert calls == [(8, 32, 32, 3)]
    calls.clear()
    budgeted = dict(rw_inference.iterate_walks(edge_logits, records, max_pixels_per_call=2 * 32 * 32, **settings))
    assert calls == [(2, 32, 32, 3)] * 3
    for image_id, payload in unbudgeted.items():
        np.testing.assert_array_equal(budgeted[image_id]["rw"], payload["rw"])
    with pytest.raises(ValueError, match="'im0'.*infer.max_pixels_per_call=2,000"):
        list(rw_inference.iterate_walks(edge_logits, records, max_pixels_per_call=2000, **settings))
