"""Tests of the standalone evaluator against brute-force per-pixel counting."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from puzzle_jax import evaluate

NUM_CLASSES = 5  # background + 4
NAMES = ["background", "a", "b", "c", "d"]


def _write_png(path, array):
    Image.fromarray(array.astype(np.uint8), mode="L").save(path)


def _brute_force_iou(pairs, num_classes, predicted_void="wrong"):
    """Per-pixel Python loop: IoU_c = TP / (TP + FP + FN), GT 255 skipped, absent classes None."""
    tp, fp, fn = [0] * num_classes, [0] * num_classes, [0] * num_classes
    for prediction, truth in pairs:
        for p, t in zip(prediction.ravel().tolist(), truth.ravel().tolist()):
            if t == 255:
                continue
            if p == 255 and predicted_void == "ignore":
                continue
            if p == t:
                tp[t] += 1
            else:
                fn[t] += 1
                if p < num_classes:
                    fp[p] += 1
    ious = [100.0 * tp[c] / (tp[c] + fp[c] + fn[c]) if tp[c] + fp[c] + fn[c] else None for c in range(num_classes)]
    present = [value for value in ious if value is not None]
    return sum(present) / len(present), ious


def _random_truth(rng, shape):
    truth = rng.integers(0, 4, shape)  # class 4 ("d") absent from every GT
    truth[rng.random(shape) < 0.1] = 255
    return truth


def test_label_maps_match_brute_force_with_both_void_policies(tmp_path):
    rng = np.random.default_rng(0)
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir(), gt_dir.mkdir()
    pairs = []
    for index in range(4):
        shape = (17 + index, 23)
        truth = _random_truth(rng, shape)
        prediction = rng.integers(0, 4, shape)
        prediction[rng.random(shape) < 0.15] = 255
        _write_png(gt_dir / f"im{index}.png", truth)
        _write_png(pred_dir / f"im{index}.png", prediction)
        pairs.append((prediction, truth))
    result = evaluate.evaluate_folders(
        str(pred_dir), str(gt_dir), class_names=NAMES, thresholds=None, show_progress=False
    )
    expected_miou, expected_ious = _brute_force_iou(pairs, NUM_CLASSES)
    assert result["miou"] == pytest.approx(expected_miou, abs=1e-9)
    for got, want in zip(result["per_class_iou"], expected_ious):
        assert (got is None and want is None) or got == pytest.approx(want, abs=1e-9)
    assert result["per_class_iou"][4] is None  # absent from GT and prediction
    ignoring, _ = _brute_force_iou(pairs, NUM_CLASSES, predicted_void="ignore")
    assert result["miou_ignoring_predicted_void"] == pytest.approx(ignoring, abs=1e-9)
    assert result["predicted_void_pixels"] == sum(int(((p == 255) & (t != 255)).sum()) for p, t in pairs)


def test_cam_sweep_matches_brute_force_at_every_threshold(tmp_path, capsys):
    rng = np.random.default_rng(1)
    pred_dir, gt_dir = tmp_path / "cams", tmp_path / "gt"
    pred_dir.mkdir(), gt_dir.mkdir()
    images = []
    for index in range(3):
        shape = (11, 13 + index)
        truth = _random_truth(rng, shape)
        classes = np.array(sorted(rng.choice([1, 2, 3], size=2, replace=False)))
        cams = rng.random((2, *shape)).astype(np.float32)
        np.savez(pred_dir / f"x{index}.npz", keys=np.concatenate([[0], classes]), hr_cam=cams, cam=cams[:, ::4, ::4])
        _write_png(gt_dir / f"x{index}.png", truth)
        images.append((cams, classes, truth))
    thresholds = [0.2, 0.5, 0.8]
    result = evaluate.evaluate_folders(
        str(pred_dir), str(gt_dir), class_names=NAMES, thresholds=thresholds, show_progress=False
    )
    per_threshold = []
    for threshold in thresholds:
        pairs = []
        for cams, classes, truth in images:
            scores = np.concatenate([np.full((1, *truth.shape), threshold, np.float32), cams])
            pairs.append((np.concatenate([[0], classes])[scores.argmax(0)], truth))
        per_threshold.append(_brute_force_iou(pairs, NUM_CLASSES)[0])
    np.testing.assert_allclose(result["per_threshold_miou"], per_threshold, atol=1e-9)
    assert result["best_threshold"] == thresholds[int(np.argmax(per_threshold))]

    # The command line prints the table and writes the same numbers as JSON.
    output = tmp_path / "result.json"
    assert (
        evaluate.main(
            [
                "--pred",
                str(pred_dir),
                "--gt",
                str(gt_dir),
                "--thresholds",
                "0.2,0.8,0.3",
                "--json",
                str(output),
                "--classes",
                str(_classes_file(tmp_path)),
            ]
        )
        == 0
    )
    assert "CAM mIoU" in capsys.readouterr().out
    assert json.loads(output.read_text())["miou"] == pytest.approx(max(per_threshold), abs=1e-9)


def test_cam_part_recall_from_a_parts_folder_matches_brute_force(tmp_path, capsys):
    rng = np.random.default_rng(2)
    pred_dir, gt_dir, parts_dir = tmp_path / "cams", tmp_path / "gt", tmp_path / "parts"
    for directory in (pred_dir, gt_dir, parts_dir):
        directory.mkdir()
    images = []
    for index in range(3):
        shape = (9, 12 + index)
        truth = _random_truth(rng, shape)
        classes = np.array([1, 2, 3])
        cams = rng.random((3, *shape)).astype(np.float32)
        np.savez(pred_dir / f"x{index}.npz", keys=np.concatenate([[0], classes]), hr_cam=cams, cam=cams[:, ::4, ::4])
        _write_png(gt_dir / f"x{index}.png", truth)
        parts = rng.choice(np.array([0, 1, 2, 255]), size=shape)
        if index < 2:  # x2 has no part map: it adds nothing to the recall
            _write_png(parts_dir / f"x{index}.png", parts)
        images.append((cams, classes, truth, parts if index < 2 else None))
    thresholds = [0.2, 0.5, 0.8]
    result = evaluate.evaluate_folders(
        str(pred_dir), str(gt_dir), class_names=NAMES, thresholds=thresholds, show_progress=False,
        parts_dir=str(parts_dir),
    )
    recall = {"body": [], "part": []}
    for threshold in thresholds:
        pixels, hits = {1: 0, 2: 0}, {1: 0, 2: 0}
        for cams, classes, truth, parts in images:
            if parts is None:
                continue
            scores = np.concatenate([np.full((1, *truth.shape), threshold, np.float32), cams])
            labels = np.concatenate([[0], classes])[scores.argmax(0)]
            for label, true, part in zip(labels.ravel().tolist(), truth.ravel().tolist(), parts.ravel().tolist()):
                if true not in (0, 255) and part in (1, 2):
                    pixels[part] += 1
                    hits[part] += label == true
        recall["body"].append(hits[1] / pixels[1])
        recall["part"].append(hits[2] / pixels[2])
    best = thresholds.index(result["best_threshold"])
    assert result["part_recall"] == pytest.approx({"body": recall["body"][best], "part": recall["part"][best]})
    assert list(result["per_threshold_part_recall"]["part"].values()) == pytest.approx(recall["part"])
    assert result["part_pixels"] == {"body": pixels[1], "part": pixels[2]} and result["num_images_with_parts"] == 2

    # The command line prints the recall under the table and writes it to the JSON.
    output = tmp_path / "result.json"
    arguments = ["--pred", str(pred_dir), "--gt", str(gt_dir), "--thresholds", "0.2,0.8,0.3", "--json", str(output),
                 "--classes", str(_classes_file(tmp_path))]
    assert evaluate.main([*arguments, "--parts", str(parts_dir)]) == 0
    assert f"object recall at threshold {thresholds[best]:.2f}: body " in capsys.readouterr().out
    assert json.loads(output.read_text())["part_recall"] == pytest.approx(result["part_recall"])
    assert evaluate.main(arguments) == 0
    assert "object recall" not in capsys.readouterr().out and "part_recall" not in json.loads(output.read_text())

    # Bad part maps name their file; a folder that matches no prediction, or label predictions, are errors.
    _write_png(parts_dir / "x1.png", np.full((9, 13), 7))
    assert evaluate.main([*arguments, "--parts", str(parts_dir)]) == 2
    assert "x1.png: part map has value(s) [7]" in capsys.readouterr().err
    _write_png(parts_dir / "x1.png", np.zeros((4, 4)))
    with pytest.raises(ValueError, match=r"x1\.png: part map of size \(4, 4\) differs .*x1\.png \(9, 13\)"):
        evaluate.evaluate_folders(str(pred_dir), str(gt_dir), class_names=NAMES, thresholds=thresholds,
                                  show_progress=False, parts_dir=str(parts_dir))
    with pytest.raises(FileNotFoundError, match="no part map <stem>.png matches a prediction"):
        evaluate.evaluate_folders(str(pred_dir), str(gt_dir), class_names=NAMES, thresholds=thresholds,
                                  show_progress=False, parts_dir=str(gt_dir / ".."))
    with pytest.raises(ValueError, match="--parts applies to CAM predictions"):
        evaluate.evaluate_folders(str(gt_dir), str(gt_dir), class_names=NAMES, thresholds=None,
                                  show_progress=False, parts_dir=str(parts_dir))


def _classes_file(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("\n".join(NAMES[1:]) + "\n")
    return path


def test_errors_name_the_file(tmp_path, capsys):
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir(), gt_dir.mkdir()
    _write_png(pred_dir / "lonely.png", np.zeros((4, 4)))
    assert evaluate.main(["--pred", str(pred_dir), "--gt", str(gt_dir)]) == 2
    assert "lonely.png" in capsys.readouterr().err
    _write_png(gt_dir / "lonely.png", np.zeros((5, 4)))
    with pytest.raises(ValueError, match="lonely.png"):
        evaluate.evaluate_folders(str(pred_dir), str(gt_dir), class_names=NAMES, thresholds=None, show_progress=False)
    with pytest.raises(FileNotFoundError, match="no such folder"):
        evaluate.evaluate_folders(str(tmp_path / "nope"), str(gt_dir), class_names=NAMES, thresholds=None)
    os.remove(pred_dir / "lonely.png")
    np.savez(pred_dir / "lonely.npz", something=np.zeros(3))
    with pytest.raises(ValueError, match="not a readable CAM file"):
        evaluate.evaluate_folders(str(pred_dir), str(gt_dir), class_names=NAMES, thresholds=[0.1], show_progress=False)


def _cam_folders(tmp_path, count):
    """``count`` ground-truth PNGs and a CAM file for each; returns (pred_dir, gt_dir, brute-force CAM labels)."""
    from puzzle_jax import cam_files

    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir(), gt_dir.mkdir()
    rng = np.random.default_rng(7)
    for index in range(count):
        truth = _random_truth(rng, (6, 7))
        _write_png(gt_dir / f"im{index:02d}.png", truth)
        cam_files.write_cam_file(
            str(pred_dir / f"im{index:02d}.npz"), keys=np.array([0, 1, 2]), hr_cam=rng.random((2, 6, 7)).astype(
                np.float32)
        )
    return pred_dir, gt_dir


def test_missing_predictions_are_an_error_unless_allowed(tmp_path, capsys):
    """Issue 17: with 10 of 24 predictions missing the evaluator exited 0 without a word, scoring the 14 found."""
    pred_dir, gt_dir = _cam_folders(tmp_path, 24)
    for index in range(0, 20, 2):
        os.remove(pred_dir / f"im{index:02d}.npz")
    arguments = ["--pred", str(pred_dir), "--gt", str(gt_dir), "--threshold", "0.3"]
    assert evaluate.main(arguments) == 2
    error = capsys.readouterr().err
    assert "10 of 24 images have no prediction" in error and "im00.npz, im02.npz" in error
    assert "--allow-missing" in error and "--ids" in error
    assert evaluate.main([*arguments, "--allow-missing", "--json", str(tmp_path / "r.json")]) == 0
    captured = capsys.readouterr()
    assert "warning: 10 of 24 images have no prediction" in captured.err and "scored the 14 found" in captured.err
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["num_images"] == 14 and result["num_missing"] == 10 and result["missing_ids"][:2] == ["im00", "im02"]
    # The same 14 scored with an id list naming exactly them: the same numbers, nothing missing.
    ids = tmp_path / "ids.txt"
    ids.write_text("".join(f"im{index:02d}\n" for index in range(24) if index >= 20 or index % 2))
    assert evaluate.main([*arguments, "--ids", str(ids), "--json", str(tmp_path / "s.json")]) == 0
    listed = json.loads((tmp_path / "s.json").read_text())
    assert listed["num_missing"] == 0 and listed["miou"] == result["miou"]
    ids.write_text("im01\nnot_there\n")
    assert evaluate.main([*arguments, "--ids", str(ids)]) == 2
    assert "1 listed id(s) have no ground truth" in capsys.readouterr().err


def test_a_killed_writers_temporary_and_other_files_are_not_read(tmp_path, capsys):
    """Issue 17: a hidden temporary .npz left by a kill -9 was counted as a prediction and the folder refused."""
    pred_dir, gt_dir = _cam_folders(tmp_path, 3)
    arguments = ["--pred", str(pred_dir), "--gt", str(gt_dir), "--threshold", "0.3", "--json", str(tmp_path / "a.json")]
    assert evaluate.main(arguments) == 0
    clean = json.loads((tmp_path / "a.json").read_text())
    (pred_dir / ".im01.tmp-4242.npz").write_bytes(b"PK\x03")  # an older writer's temporary name
    (pred_dir / ".im01.npz.tmp-host-4242").write_bytes(b"PK\x03")  # today's
    (pred_dir / ".DS_Store.npz").write_bytes(b"junk")
    (gt_dir / ".im01.png").write_bytes(b"junk")
    assert evaluate.main([*arguments[:-1], str(tmp_path / "b.json")]) == 0
    assert json.loads((tmp_path / "b.json").read_text()) == clean


def test_out_of_range_classes_and_nan_maps_name_the_file(tmp_path, capsys):
    from puzzle_jax import cam_files

    pred_dir, gt_dir = _cam_folders(tmp_path, 2)
    arguments = ["--pred", str(pred_dir), "--gt", str(gt_dir), "--threshold", "0.3", "--classes"]
    classes = tmp_path / "classes.txt"
    classes.write_text("a\n")  # 2 classes with background: key 2 (class "b") is out of range
    assert evaluate.main([*arguments, str(classes)]) == 2
    assert "im00.png" in capsys.readouterr().err  # the ground truth holds classes 2 and 3 too: named
    _write_png(gt_dir / "im00.png", np.zeros((6, 7)))
    _write_png(gt_dir / "im01.png", np.zeros((6, 7)))
    assert evaluate.main([*arguments, str(classes)]) == 2
    error = capsys.readouterr().err
    assert "im00.npz against" in error and "keys [1, 2] hold a class id >= num_classes=2" in error
    hr_cam = np.ones((2, 6, 7), np.float32)
    hr_cam[0, 2, 2] = np.nan
    np.savez(pred_dir / "im01.npz", keys=np.array([0, 1, 2]), hr_cam=hr_cam)
    classes.write_text("a\nb\n")
    assert evaluate.main([*arguments, str(classes)]) == 2
    assert "im01.npz: 'hr_cam' holds NaN or infinite values" in capsys.readouterr().err
    cam_files.write_cam_file(str(pred_dir / "im01.npz"), keys=np.array([0, 1, 2]), hr_cam=np.ones((2, 6, 7)))
    (pred_dir / "im01.npz").write_bytes((pred_dir / "im01.npz").read_bytes()[:-30])
    assert evaluate.main([*arguments, str(classes)]) == 2
    assert "im01.npz: not a readable CAM file" in capsys.readouterr().err
