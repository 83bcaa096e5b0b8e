"""Tests of scoring CAM files over a split: exact scores on CAMs that equal the ground truth, named failures."""

import numpy as np
import pytest

from puzzle_jax import cam_files
from puzzle_jax.evaluation import cam_scoring


class _Split(list):
    """Records with an ``ids()`` method, as ``datasets.DecodedRecords``."""

    def ids(self):
        return [record["id"] for record in self]


def _split_with_perfect_cams(cam_dir, count=3):
    """Masks with two classes and 255 borders; CAMs that are 0.9 on their class's pixels and 0 elsewhere."""
    rng = np.random.default_rng(0)
    split = _Split()
    for index in range(count):
        mask = np.zeros((12, 16), np.uint8)
        mask[2:6, 3:9] = 1
        mask[7:11, 8:15] = 3
        mask[0] = 255
        keys = np.array([0, 1, 3])
        cams = np.stack([(mask == 1), (mask == 3)]).astype(np.float32) * 0.9
        cams += rng.random(cams.shape).astype(np.float32) * 0.01
        cam_files.write_cam_file(cam_files.path_of(cam_dir, f"im{index}"), keys=keys, hr_cam=cams)
        split.append({"id": f"im{index}", "mask": mask})
    return split


def test_cams_equal_to_the_ground_truth_score_100_between_their_levels(tmp_path):
    split = _split_with_perfect_cams(str(tmp_path))
    result = cam_scoring.sweep_split(
        split, str(tmp_path), num_classes=4, thresholds=[0.05, 0.5, 0.95], produced_by="infer_cam",
        show_progress=False,
    )
    # Class 2 is absent from GT and predictions: mIoU over background, 1 and 3.
    assert result["per_threshold_miou"] == pytest.approx([100.0, 100.0, 100.0 * (1 / 3) * (np.sum(
        split[0]["mask"] == 0) / np.sum(split[0]["mask"] != 255))])
    assert result["best_threshold"] == 0.05 and result["num_images"] == 3


def test_missing_and_mismatched_cam_files_are_named(tmp_path):
    split = _split_with_perfect_cams(str(tmp_path), count=4)
    (tmp_path / "im1.npz").unlink()
    (tmp_path / "im3.npz").unlink()
    expected = r"2 of 4 CAM files are missing in .* \(first: im1\.npz, im3\.npz\); run infer_cam"
    with pytest.raises(FileNotFoundError, match=expected):
        cam_scoring.sweep_split(
            split, str(tmp_path), num_classes=4, thresholds=[0.5], produced_by="infer_cam", show_progress=False
        )
    split = _split_with_perfect_cams(str(tmp_path), count=2)
    split[1]["mask"] = split[1]["mask"][:10]
    with pytest.raises(ValueError, match=r"im1\.npz: CAM size \(12, 16\) differs .*'im1'.* \(10, 16\)"):
        cam_scoring.sweep_split(
            split, str(tmp_path), num_classes=4, thresholds=[0.5], produced_by="infer_cam", show_progress=False
        )


def test_part_maps_of_the_records_are_scored_and_records_without_them_add_nothing(tmp_path):
    """CAMs equal to the ground truth recall every body and part pixel up to their level (0.9) and none above it."""
    split = _split_with_perfect_cams(str(tmp_path), count=3)
    for record in split[:2]:
        parts = np.where(record["mask"] == 255, 255, np.where(record["mask"] > 0, 1, 0)).astype(np.uint8)
        parts[2:4, 3:5] = 2  # a "head" in class 1's object
        record["parts"] = parts
    result = cam_scoring.sweep_split(
        split, str(tmp_path), num_classes=4, thresholds=[0.05, 0.5, 0.95], produced_by="infer_cam",
        show_progress=False,
    )
    body = sum(int(np.sum(record["parts"] == 1)) for record in split[:2])
    assert result["part_pixels"] == {"body": body, "part": 2 * 4} and result["num_images_with_parts"] == 2
    assert result["per_threshold_part_recall"] == {"body": [1.0, 1.0, 0.0], "part": [1.0, 1.0, 0.0]}
    assert result["part_recall"] == {"body": 1.0, "part": 1.0}
    split[0]["parts"] = split[0]["parts"][:, :4]
    with pytest.raises(ValueError, match=r"im0\.npz: the part map of size \(12, 4\) differs .*'im0'"):
        cam_scoring.sweep_split(
            split, str(tmp_path), num_classes=4, thresholds=[0.5], produced_by="infer_cam", show_progress=False
        )


def test_out_of_range_class_ids_name_the_cam_file_and_the_ground_truth(tmp_path):
    """Issue 17: a mask value or a CAM key beyond the classes failed without naming the image or the file."""
    split = _split_with_perfect_cams(str(tmp_path), count=2)
    split[1]["mask"] = split[1]["mask"].copy()
    split[1]["mask"][5, 5] = 7
    with pytest.raises(ValueError, match=r"im1\.npz against \(the mask of image 'im1'\): .*values \[7\]"):
        cam_scoring.sweep_split(
            split, str(tmp_path), num_classes=4, thresholds=[0.5], produced_by="infer_cam", show_progress=False
        )
    split = _split_with_perfect_cams(str(tmp_path), count=2)
    with pytest.raises(ValueError, match=r"im0\.npz against \(the mask of image 'im0'\): keys \[1, 3\] hold a class"):
        cam_scoring.sweep_split(
            split, str(tmp_path), num_classes=3, thresholds=[0.5], produced_by="infer_cam", show_progress=False
        )


def test_a_cam_file_with_nan_fails_naming_it(tmp_path):
    split = _split_with_perfect_cams(str(tmp_path), count=2)
    cams = np.zeros((2, 12, 16), np.float32)
    cams[1, 3, 3] = np.nan
    np.savez(tmp_path / "im1.npz", keys=np.array([0, 1, 3]), hr_cam=cams)
    with pytest.raises(ValueError, match=r"im1\.npz: 'hr_cam' holds NaN"):
        cam_scoring.sweep_split(
            split, str(tmp_path), num_classes=4, thresholds=[0.5], produced_by="infer_cam", show_progress=False
        )
