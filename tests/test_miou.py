"""Tests of puzzle_jax.evaluation.miou against brute-force per-pixel Python loops."""

import math

import numpy as np
import pytest

from puzzle_jax.evaluation import miou

NUM_CLASSES = 6


def _brute_counts(pairs, num_classes, invalid_predictions="wrong"):
    """Per-class TP, T (GT pixels) and P (predicted pixels), looping over every pixel."""
    true_positive = [0] * num_classes
    ground_truth_count = [0] * num_classes
    predicted_count = [0] * num_classes
    for prediction, ground_truth in pairs:
        for predicted, true in zip(prediction.ravel().tolist(), ground_truth.ravel().tolist()):
            if true == 255:
                continue
            valid_prediction = 0 <= predicted < num_classes
            if not valid_prediction and invalid_predictions == "ignore":
                continue
            ground_truth_count[true] += 1
            if valid_prediction:
                predicted_count[predicted] += 1
                if predicted == true:
                    true_positive[true] += 1
    return true_positive, ground_truth_count, predicted_count


def _brute_scores(pairs, num_classes, invalid_predictions="wrong"):
    """(per-class IoU with NaN for absent classes, mIoU %, FP, FN) from the brute counts."""
    tp, t, p = _brute_counts(pairs, num_classes, invalid_predictions)
    ious, fps, fns = [], [], []
    for c in range(num_classes):
        union = t[c] + p[c] - tp[c]
        ious.append(tp[c] / union if union else math.nan)
        if c > 0 and union:
            fps.append((p[c] - tp[c]) / union)
            fns.append((t[c] - tp[c]) / union)
    present = [value for value in ious if not math.isnan(value)]
    mean = 100 * sum(present) / len(present)
    return ious, mean, sum(fps) / len(fps), sum(fns) / len(fns)


def _brute_cams_to_labels(cams, keys, threshold):
    """Per pixel: background scores the threshold, the first strictly larger CAM wins."""
    _, height, width = cams.shape
    labels = np.zeros((height, width), np.int64)
    threshold = cams.dtype.type(threshold)
    for y in range(height):
        for x in range(width):
            best_value, best_key = threshold, 0
            for channel, key in enumerate(keys):
                if cams[channel, y, x] > best_value:
                    best_value, best_key = cams[channel, y, x], key
            labels[y, x] = best_key
    return labels


def _random_ground_truth(rng, shape, classes):
    ground_truth = rng.choice(np.asarray(classes), size=shape)
    ground_truth[rng.random(shape) < 0.15] = 255
    return ground_truth


def test_confusion_matrix_and_scores_match_brute_force():
    rng = np.random.default_rng(0)
    pairs = []
    for _ in range(3):
        # Class 5 never occurs in GT or prediction (absent -> NaN); class 4 only in predictions.
        ground_truth = _random_ground_truth(rng, (9, 11), [0, 1, 2, 3])
        prediction = rng.choice(np.asarray([0, 1, 2, 3, 4, 255]), size=(9, 11))
        pairs.append((prediction, ground_truth))
    confusion = sum(miou.confusion_matrix(p, g, NUM_CLASSES) for p, g in pairs)
    assert confusion.dtype == np.int64 and confusion.shape == (NUM_CLASSES, NUM_CLASSES + 1)
    for policy in ("wrong", "ignore"):
        ious, mean, fp, fn = _brute_scores(pairs, NUM_CLASSES, policy)
        np.testing.assert_allclose(
            miou.iou_from_confusion(confusion, invalid_predictions=policy), ious, rtol=1e-12
        )
        assert math.isnan(miou.iou_from_confusion(confusion)[5])
        np.testing.assert_allclose(
            miou.mean_iou(confusion, invalid_predictions=policy), mean, rtol=1e-12
        )
        ours_fp, ours_fn = miou.false_positive_negative_rates(confusion, invalid_predictions=policy)
        np.testing.assert_allclose([ours_fp, ours_fn], [fp, fn], rtol=1e-12)
    # Predicted 255 is counted as wrong by default: it lowers the IoU compared with ignoring it.
    assert miou.mean_iou(confusion) < miou.mean_iou(confusion, invalid_predictions="ignore")


def test_confusion_matrix_entries_and_errors():
    prediction = np.array([[0, 1, 255], [2, 2, 1]])
    ground_truth = np.array([[0, 2, 1], [255, 2, 1]])
    confusion = miou.confusion_matrix(prediction, ground_truth, 3)
    expected = np.zeros((3, 4), np.int64)
    for predicted, true in [(0, 0), (1, 2), (3, 1), (2, 2), (1, 1)]:
        expected[true, predicted] += 1
    np.testing.assert_array_equal(confusion, expected)
    with pytest.raises(ValueError, match=r"\[7\] outside \[0, 3\)"):
        miou.confusion_matrix(prediction, np.full((2, 3), 7), 3)
    with pytest.raises(ValueError, match="shape"):
        miou.confusion_matrix(prediction[:1], ground_truth, 3)


def _random_cams(rng, keys, shape):
    cams = rng.random((len(keys),) + shape).astype(np.float32) * 0.8
    if len(keys):
        # Exact ties with a threshold and between channels exercise the tie rule.
        cams[0, 0, 0] = np.float32(0.25)
        cams[:, 1, 1] = np.float32(0.6)
    return cams


@pytest.mark.parametrize("threshold", [0.05, 0.25, 0.6])
def test_cams_to_labels_matches_brute_force(threshold):
    rng = np.random.default_rng(1)
    keys = np.array([3, 1, 5])
    cams = _random_cams(rng, keys, (7, 8))
    expected = _brute_cams_to_labels(cams, keys, threshold)
    np.testing.assert_array_equal(miou.cams_to_labels(cams, keys, threshold), expected)
    # The authors' npy keys layout with a leading background 0 gives the same labels.
    np.testing.assert_array_equal(
        miou.cams_to_labels(cams, np.concatenate([[0], keys]), threshold), expected
    )


def test_cams_to_labels_without_foreground_and_bad_keys():
    labels = miou.cams_to_labels(np.zeros((0, 3, 4), np.float32), np.zeros((0,), np.int64), 0.2)
    np.testing.assert_array_equal(labels, np.zeros((3, 4)))
    with pytest.raises(ValueError, match="do not match 2 CAM channels"):
        miou.cams_to_labels(np.zeros((2, 3, 4), np.float32), np.array([1, 2, 3]), 0.2)


def test_threshold_sweep_matches_brute_force_per_threshold():
    rng = np.random.default_rng(2)
    images = []
    for keys in ([1, 2], [4], [], [2, 1, 3]):  # includes an image without any foreground class
        keys = np.asarray(keys, np.int64)
        # GT may contain classes without a CAM, and class 5 never appears at all.
        ground_truth = _random_ground_truth(rng, (6, 7), [0, 1, 2, 3, 4])
        images.append((_random_cams(rng, keys, (6, 7)), keys, ground_truth))
    thresholds = miou.DEFAULT_THRESHOLDS
    sweep = miou.ThresholdSweep(NUM_CLASSES, thresholds)
    for cams, keys, ground_truth in images:
        sweep.update(cams, keys, ground_truth)
    result = sweep.result()

    brute_mious, brute_fps = [], []
    for threshold in thresholds:
        pairs = [(_brute_cams_to_labels(c, k, threshold), g) for c, k, g in images]
        ious, mean, fp, _ = _brute_scores(pairs, NUM_CLASSES)
        brute_mious.append(mean)
        brute_fps.append(fp)
        index = thresholds.index(threshold)
        np.testing.assert_allclose(
            miou.iou_from_confusion(sweep.confusion[index]), ious, rtol=1e-12
        )
    np.testing.assert_allclose(result["per_threshold_miou"], brute_mious, rtol=1e-12)
    np.testing.assert_allclose(result["per_threshold_false_positive"], brute_fps, rtol=1e-12)
    best = int(np.argmax(brute_mious))
    assert result["best_threshold"] == thresholds[best]
    np.testing.assert_allclose(result["miou"], brute_mious[best], rtol=1e-12)
    best_pairs = [(_brute_cams_to_labels(c, k, thresholds[best]), g) for c, k, g in images]
    np.testing.assert_allclose(
        result["per_class_iou"],
        [100 * v for v in _brute_scores(best_pairs, NUM_CLASSES)[0]],
        rtol=1e-12,
    )
    assert math.isnan(result["per_class_iou"][5])
    assert result["num_images"] == 4


def test_default_thresholds_and_sweep_errors():
    assert miou.DEFAULT_THRESHOLDS[0] == 0.05 and miou.DEFAULT_THRESHOLDS[-1] == 0.75
    assert len(miou.DEFAULT_THRESHOLDS) == 15 and 0.15 in miou.DEFAULT_THRESHOLDS
    sweep = miou.ThresholdSweep(NUM_CLASSES)
    with pytest.raises(RuntimeError, match="before any update"):
        sweep.result()
    with pytest.raises(ValueError, match="ground_truth shape"):
        sweep.update(np.zeros((1, 3, 4), np.float32), np.array([1]), np.zeros((4, 3)))


def _random_parts(rng, shape):
    """Part maps with every value: 0 (not scored), 1 body, 2 discriminative part, 255 ignored."""
    return rng.choice(np.asarray([0, 1, 1, 2, 255], np.uint8), size=shape)


def _brute_part_recall(images, threshold):
    """Per part value (1, 2): GT object pixels (class >= 1, not 255) with that value, and how many of them the CAMs'
    labels at ``threshold`` give their GT class, counted pixel by pixel."""
    pixels, hits = {1: 0, 2: 0}, {1: 0, 2: 0}
    for cams, keys, ground_truth, parts in images:
        if parts is None:
            continue
        labels = _brute_cams_to_labels(cams, keys, threshold)
        for label, true, part in zip(labels.ravel().tolist(), ground_truth.ravel().tolist(), parts.ravel().tolist()):
            if true == 255 or true == 0 or part not in (1, 2):
                continue
            pixels[part] += 1
            hits[part] += label == true
    return pixels, hits


def test_threshold_sweep_part_recall_matches_brute_force_per_threshold():
    rng = np.random.default_rng(3)
    images = []
    # An image without a CAM, one without a part map (it adds nothing to part recall), one with all-0 parts.
    for keys, has_parts in (([1, 2], True), ([4], True), ([], True), ([2, 1, 3], False), ([3], "zeros")):
        keys = np.asarray(keys, np.int64)
        ground_truth = _random_ground_truth(rng, (6, 7), [0, 1, 2, 3, 4])
        parts = None if has_parts is False else _random_parts(rng, (6, 7))
        if has_parts == "zeros":
            parts = np.zeros((6, 7), np.uint8)
        images.append((_random_cams(rng, keys, (6, 7)), keys, ground_truth, parts))
    thresholds = miou.DEFAULT_THRESHOLDS
    sweep, without_parts = miou.ThresholdSweep(NUM_CLASSES, thresholds), miou.ThresholdSweep(NUM_CLASSES, thresholds)
    for cams, keys, ground_truth, parts in images:
        sweep.update(cams, keys, ground_truth, parts)
        without_parts.update(cams, keys, ground_truth)
    result = sweep.result()

    # Parts change nothing else: the same matrices and scores as without them.
    np.testing.assert_array_equal(sweep.confusion, without_parts.confusion)
    plain = without_parts.result()
    np.testing.assert_equal({key: value for key, value in result.items() if "part" not in key}, plain)
    assert not any("part" in key for key in plain)

    expected = {"body": [], "part": []}
    for threshold in thresholds:
        pixels, hits = _brute_part_recall(images, threshold)
        assert min(pixels.values()) > 0
        expected["body"].append(hits[1] / pixels[1])
        expected["part"].append(hits[2] / pixels[2])
    assert result["part_pixels"] == {"body": pixels[1], "part": pixels[2]}
    np.testing.assert_allclose(result["per_threshold_part_recall"]["body"], expected["body"], rtol=1e-12)
    np.testing.assert_allclose(result["per_threshold_part_recall"]["part"], expected["part"], rtol=1e-12)
    # More pixels are recalled at low thresholds than at high ones: the sweep is not trivially flat.
    assert expected["body"][0] > expected["body"][-1] and expected["part"][0] > expected["part"][-1]
    best = thresholds.index(result["best_threshold"])
    assert result["part_recall"] == {"body": expected["body"][best], "part": expected["part"][best]}
    # The all-0 map and the image without a map count no image; the image without CAMs does.
    assert result["num_images_with_parts"] == 3


def test_part_recall_is_nan_without_part_pixels_and_bad_part_maps_are_errors():
    sweep = miou.ThresholdSweep(NUM_CLASSES, [0.1, 0.5])
    ground_truth = np.array([[0, 1], [2, 255]])
    cams = np.array([[[0.0, 0.9], [0.0, 0.0]]], np.float32)
    # Parts on background and on ignored GT pixels are not scored; only the body pixel of class 1 is.
    sweep.update(cams, np.array([1]), ground_truth, np.array([[2, 1], [0, 2]], np.uint8))
    result = sweep.result()
    assert result["part_pixels"] == {"body": 1, "part": 0}
    assert result["per_threshold_part_recall"]["body"] == [1.0, 1.0]
    assert math.isnan(result["part_recall"]["part"])
    with pytest.raises(ValueError, match=r"parts hold values \[3\]"):
        sweep.update(cams, np.array([1]), ground_truth, np.array([[3, 1], [0, 2]], np.uint8))
    with pytest.raises(ValueError, match="parts shape"):
        sweep.update(cams, np.array([1]), ground_truth, np.zeros((2, 3), np.uint8))
