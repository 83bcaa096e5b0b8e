"""Tests of the aff_labels and pseudo_labels stages on a tiny demo split with synthetic score files (no model):
the PNGs (values, palette), resuming, the missing-file and size errors, the image without foreground, and the
scores against brute-force counts over the written PNGs and the masks."""

import importlib
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from puzzle_jax import cam_files, labels, pipeline
from puzzle_jax.data import datasets
from puzzle_jax.stages import aff_labels, pseudo_labels

NUM_IMAGES = 6


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def _config(data_dir):
    config = importlib.import_module("configs.demo").get_config()
    config.data.data_dir = data_dir
    config.data.builder_kwargs = ml_collections.ConfigDict(dict(num_pretrain=2, num_train=NUM_IMAGES, num_val=2))
    config.infer.split = "train"
    # No CRF: the labels follow the thresholds exactly, so they are known (the CRF has its own tests).
    config.refine.aff_crf_iterations = 0
    config.refine.pseudo_crf_iterations = 0
    config.refine.workers = 2
    return config


def _records(config):
    source, info = datasets.load_split_from_config(config.data, config.infer.split)
    return list(source), info


def _write_score_files(directory, records, field):
    """Perfect maps (1 on each GT class of the image), at 0.25 for the second image (confident for neither
    threshold of the affinity labels, foreground for the pseudo labels' 0.20 below), none for the last (keys [0]).

    Returns the expected labels, before the 255 rule: id -> (strong class map, weak pixels)."""
    expected = {}
    for index, record in enumerate(records):
        mask = record["mask"]
        classes = np.flatnonzero(record["labels"]) + 1
        if index == len(records) - 1:
            classes = classes[:0]
        strength = 0.25 if index == 1 else 1.0
        maps = (
            np.stack([(mask == value) * strength for value in classes]) if len(classes) else np.zeros((0, *mask.shape))
        )
        cam_files.write_cam_file(
            cam_files.path_of(directory, record["id"]), keys=np.concatenate([[0], classes]), **{field: maps}
        )
        objects = np.where(np.isin(mask, classes), mask, 0)
        expected[record["id"]] = (objects, strength)
    return expected


def _labels_of(directory, records):
    return {record["id"]: np.asarray(Image.open(os.path.join(directory, f"{record['id']}.png"))) for record in records}


def test_aff_labels_stage_writes_scores_and_resumes(tmp_path, data_dir, capsys):
    config = _config(data_dir)
    records, info = _records(config)
    workdir = pipeline.Workdir(str(tmp_path / "run"))
    expected = _write_score_files(workdir.cam_dir(), records, "hr_cam")
    summary = aff_labels.run(config, workdir)
    assert (summary["written"], summary["skipped_existing"], summary["images"]) == (NUM_IMAGES, 0, NUM_IMAGES)
    written = _labels_of(workdir.affinity_label_dir(), records)
    for record in records:
        with Image.open(os.path.join(workdir.affinity_label_dir(), f"{record['id']}.png")) as image:
            assert image.mode == "P"
            palette = np.asarray(image.getpalette(), np.uint8).reshape(-1, 3)
        np.testing.assert_array_equal(palette[: len(labels.voc_palette())], labels.voc_palette())
        objects, strength = expected[record["id"]]
        # Strong maps: objects where the map is 1, background elsewhere; weak maps (0.25, between the thresholds 0.10
        # and 0.40): uncertain on the objects.
        want = objects if strength == 1.0 else np.where(objects > 0, 255, 0)
        np.testing.assert_array_equal(written[record["id"]], want.astype(np.uint8))
    assert not written[records[-1]["id"]].any()
    assert summary["images_without_foreground"] == 1
    # Brute force over the written PNGs and the masks.
    predictions = np.concatenate([written[record["id"]].ravel() for record in records]).astype(np.int64)
    truth = np.concatenate([record["mask"].ravel() for record in records]).astype(np.int64)
    has_truth = truth != 255
    confident = predictions != 255
    correct = has_truth & confident & (predictions == truth)
    assert summary["precision"] == pytest.approx(correct.sum() / (has_truth & confident).sum())
    assert summary["recall"] == pytest.approx(correct.sum() / has_truth.sum())
    assert summary["void_share"] == pytest.approx((predictions == 255).mean())
    for value in range(info.num_classes + 1):
        predicted_as = has_truth & (predictions == value)
        of_class = has_truth & (truth == value)
        want_precision = (correct & predicted_as).sum() / predicted_as.sum() if predicted_as.any() else None
        want_recall = (correct & of_class).sum() / of_class.sum() if of_class.any() else None
        assert summary["per_class_precision"][value] == pytest.approx(want_precision)
        assert summary["per_class_recall"][value] == pytest.approx(want_recall)
    # The image without foreground labels its objects background: background precision is below 1.
    assert 0 < summary["recall"] < summary["precision"] < 1 and summary["per_class_precision"][0] < 1
    assert "Affinity labels: 6 images" in capsys.readouterr().out

    # Resume: only the deleted images are computed again, the others are left untouched.
    label_dir = workdir.affinity_label_dir()
    mtimes = {name: os.stat(os.path.join(label_dir, name)).st_mtime_ns for name in os.listdir(label_dir)}
    for record in records[:2]:
        os.remove(os.path.join(label_dir, f"{record['id']}.png"))
        del mtimes[f"{record['id']}.png"]
    resumed = aff_labels.run(config, workdir)
    assert (resumed["written"], resumed["skipped_existing"]) == (2, NUM_IMAGES - 2)
    assert {name: os.stat(os.path.join(label_dir, name)).st_mtime_ns for name in mtimes} == mtimes
    assert sorted(os.listdir(label_dir)) == sorted(f"{record['id']}.png" for record in records)
    assert resumed["precision"] == summary["precision"] and resumed["recall"] == summary["recall"]


def test_aff_labels_names_a_missing_cam_file_and_a_size_mismatch(tmp_path, data_dir):
    config = _config(data_dir)
    records, _ = _records(config)
    workdir = pipeline.Workdir(str(tmp_path / "run"))
    _write_score_files(workdir.cam_dir(), records, "hr_cam")
    missing = records[2]["id"]
    os.remove(cam_files.path_of(workdir.cam_dir(), missing))
    with pytest.raises(
        FileNotFoundError, match=rf"1 of {NUM_IMAGES} .*image '{missing}'.*{missing}\.npz.*run infer_cam"
    ):
        aff_labels.run(config, workdir)
    assert not os.path.exists(workdir.affinity_label_dir())
    # A CAM file of another size than its image.
    height, width = records[2]["mask"].shape
    cam_files.write_cam_file(
        cam_files.path_of(workdir.cam_dir(), missing), keys=[0, 1], hr_cam=np.zeros((1, height + 1, width))
    )
    with pytest.raises(
        ValueError,
        match=rf"{missing}\.npz: the maps' size \({height + 1}, {width}\) differs from the "
        rf"image's size \({height}, {width}\)",
    ):
        aff_labels.run(config, workdir)
    assert not os.path.exists(os.path.join(workdir.affinity_label_dir(), f"{missing}.png"))
    assert not [name for name in os.listdir(workdir.affinity_label_dir()) if not name.endswith(".png")]


def test_pseudo_labels_stage_writes_and_scores_against_brute_force_iou(tmp_path, data_dir, capsys):
    config = _config(data_dir)
    config.refine.rw_threshold = 0.20
    records, info = _records(config)
    workdir = pipeline.Workdir(str(tmp_path / "run"))
    expected = _write_score_files(workdir.random_walk_dir(), records, "rw")
    summary = pseudo_labels.run(config, workdir)
    assert (summary["written"], summary["num_images"], summary["images_without_foreground"]) == (6, 6, 1)
    written = _labels_of(workdir.pseudo_label_dir(), records)
    for record in records:
        # Even the weak maps (0.25) beat the threshold 0.20.
        np.testing.assert_array_equal(written[record["id"]], expected[record["id"]][0].astype(np.uint8))
    predictions = np.concatenate([written[record["id"]].ravel() for record in records]).astype(np.int64)
    truth = np.concatenate([record["mask"].ravel() for record in records]).astype(np.int64)
    scored = truth != 255
    ious, false_positives, false_negatives = [], [], []
    for value in range(info.num_classes + 1):
        true_positive = (scored & (predictions == value) & (truth == value)).sum()
        false_positive = (scored & (predictions == value) & (truth != value)).sum()
        false_negative = (scored & (predictions != value) & (truth == value)).sum()
        union = true_positive + false_positive + false_negative
        if union:
            ious.append(100 * true_positive / union)
            if value:
                false_positives.append(false_positive / union)
                false_negatives.append(false_negative / union)
    assert summary["miou"] == pytest.approx(np.mean(ious))
    assert summary["miou_ignoring_predicted_void"] == pytest.approx(np.mean(ious))
    assert summary["false_positive"] == pytest.approx(np.mean(false_positives))
    assert summary["false_negative"] == pytest.approx(np.mean(false_negatives))
    assert summary["predicted_void_pixels"] == 0 and summary["miou"] < 100
    output = capsys.readouterr().out
    assert "Pseudo-label mIoU" in output and "counted as wrong above (VOC devkit)" in output


def test_pseudo_labels_with_the_crf_match_the_rule_and_name_infer_rw(tmp_path, data_dir):
    from puzzle_jax.refine import cam_labels

    config = _config(data_dir)
    config.refine.pseudo_crf_iterations = 1
    records, _ = _records(config)
    workdir = pipeline.Workdir(str(tmp_path / "run"))
    with pytest.raises(FileNotFoundError, match="run infer_rw"):
        pseudo_labels.run(config, workdir)
    _write_score_files(workdir.random_walk_dir(), records, "rw")
    pseudo_labels.run(config, workdir)
    written = _labels_of(workdir.pseudo_label_dir(), records)
    for record in records:
        contents = cam_files.read_cam_file(cam_files.path_of(workdir.random_walk_dir(), record["id"]), ("rw",))
        want = cam_labels.pseudo_labels(contents["rw"], contents["keys"], record["image"], threshold=0.35, iterations=1)
        np.testing.assert_array_equal(written[record["id"]], want)


def test_pseudo_labels_are_scored_on_the_images_of_eval_split(tmp_path, data_dir):
    """The chain runs on infer.split and is scored on eval.split's images (VOC: train_aug and train); the demo's splits
    are disjoint, so here the scored images got their labels from an earlier run on their own split."""
    config = _config(data_dir)
    workdir = pipeline.Workdir(str(tmp_path / "run"))
    config.infer.split = "val"
    validation, _ = _records(config)
    _write_score_files(workdir.random_walk_dir(), validation, "rw")
    assert pseudo_labels.run(config, workdir)["num_images"] == len(validation)
    config.infer.split, config.eval.split = "train", "val"
    training, _ = _records(config)
    _write_score_files(workdir.random_walk_dir(), training, "rw")
    summary = pseudo_labels.run(config, workdir)
    assert (summary["written"], summary["num_images"]) == (NUM_IMAGES, len(validation))
    assert (summary["split"], summary["scored_split"]) == ("train", "val")
    # Scored images without labels (not among infer.split's) are named.
    os.remove(os.path.join(workdir.pseudo_label_dir(), f"{validation[0]['id']}.png"))
    with pytest.raises(FileNotFoundError, match=rf"1 of the 2 .*{validation[0]['id']}\.png.*eval\.split"):
        pseudo_labels.run(config, workdir)
