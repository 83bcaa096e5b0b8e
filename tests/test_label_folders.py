"""Tests of the label-folder writer and scorer: precision and recall by hand, the missing-score-file check, and a
folder written in worker processes equal to the rule applied in this process."""

import functools
import os

import numpy as np
import pytest

from puzzle_jax import cam_files, labels, per_image
from puzzle_jax.refine import cam_labels, label_folders


def test_precision_and_recall_of_a_hand_made_confusion_matrix():
    # Rows: GT 0, 1, 2; columns: predicted 0, 1, 2, 255.
    confusion = np.array([[50, 5, 0, 10], [0, 20, 0, 30], [0, 0, 0, 0]])
    result = label_folders.precision_recall(confusion)
    assert result["precision"] == pytest.approx(70 / 75)
    assert result["recall"] == pytest.approx(70 / 115)
    assert result["per_class_precision"] == pytest.approx([1.0, 20 / 25, None])
    assert result["per_class_recall"] == pytest.approx([50 / 65, 20 / 50, None])
    assert label_folders.precision_recall(np.zeros((3, 4), np.int64))["precision"] is None


def _records(directory, count=5):
    rng = np.random.default_rng(0)
    records = []
    for index in range(count):
        height, width = rng.integers(20, 40, 2)
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        mask = rng.integers(0, 3, (height, width)).astype(np.uint8)
        cam_files.write_cam_file(
            cam_files.path_of(directory, f"im{index}"),
            keys=[0, 1, 2],
            hr_cam=np.stack([(mask == 1) * 0.9, (mask == 2) * 0.3]).astype(np.float32),
        )
        records.append({"id": f"im{index}", "image": image, "mask": mask})
    return records


def test_a_folder_written_by_workers_equals_the_rule_and_is_scored(tmp_path):
    records = _records(str(tmp_path / "cams"))
    function = functools.partial(cam_labels.affinity_labels_from_file, fg_threshold=0.4, bg_threshold=0.1, iterations=3)
    counts = label_folders.write_label_folder(
        records,
        score_dir=str(tmp_path / "cams"),
        label_dir=str(tmp_path / "labels"),
        function=function,
        backend=per_image.HostBackend(workers=2),
        produced_by="infer_cam",
        description="test",
    )
    assert counts == {"written": 5, "skipped_existing": 0}
    for record in records:
        written = labels.read_label_png(label_folders.label_path(str(tmp_path / "labels"), record["id"]), 2)
        np.testing.assert_array_equal(
            written, function((cam_files.path_of(str(tmp_path / "cams"), record["id"]), record["image"]))
        )
    scores = label_folders.score_label_folder(
        records,
        label_dir=str(tmp_path / "labels"),
        score_dir=str(tmp_path / "cams"),
        num_classes=3,
        show_progress=False,
    )
    assert scores["images"] == 5 and scores["images_without_foreground"] == 0
    assert scores["pixels"] == sum(record["mask"].size for record in records)
    assert scores["confusion"].sum() == scores["pixels"]
    assert scores["void_pixels"] == scores["confusion"][:, -1].sum() > 0


def test_images_without_a_score_file_are_named_before_any_work(tmp_path):
    records = _records(str(tmp_path / "cams"))
    os.remove(cam_files.path_of(str(tmp_path / "cams"), "im3"))
    labels.write_label_png(label_folders.label_path(str(tmp_path / "labels"), "im1"), np.zeros((2, 2), np.uint8))
    os.remove(cam_files.path_of(str(tmp_path / "cams"), "im1"))  # its label exists: not needed
    with pytest.raises(
        FileNotFoundError,
        match=r"1 of 5 images have no score file \(first: image 'im3', .*im3\.npz\)"
        r"; run infer_cam first",
    ):
        label_folders.write_label_folder(
            records,
            score_dir=str(tmp_path / "cams"),
            label_dir=str(tmp_path / "labels"),
            function=print,
            backend=per_image.HostBackend(workers=1),
            produced_by="infer_cam",
            description="test",
        )


def test_a_mask_value_beyond_the_classes_names_the_image(tmp_path):
    records = _records(str(tmp_path / "cams"), count=2)
    for record in records:
        labels.write_label_png(label_folders.label_path(str(tmp_path / "labels"), record["id"]), record["mask"])
    records[1]["mask"] = records[1]["mask"].copy()
    records[1]["mask"][0, 0] = 9
    with pytest.raises(ValueError, match=r"im1\.png against the mask of image 'im1': .*values \[9\]"):
        label_folders.score_label_folder(
            records, label_dir=str(tmp_path / "labels"), score_dir=str(tmp_path / "cams"), num_classes=3,
            show_progress=False,
        )
