"""Tests of the evaluation tables and summaries: the sweep table, its JSON summary, and the sweep-edge warning."""

import math

from puzzle_jax.evaluation import report


def _result(best_threshold, thresholds=(0.05, 0.1, 0.15)):
    per_threshold = [50.0 + 10 * (t == best_threshold) for t in thresholds]
    return {
        "miou": max(per_threshold),
        "best_threshold": best_threshold,
        "per_class_iou": [80.0, float("nan"), 40.0],
        "thresholds": list(thresholds),
        "per_threshold_miou": per_threshold,
        "num_images": 3,
    }


def test_a_best_threshold_at_an_end_of_the_sweep_is_flagged():
    names = ["background", "cat", "dog"]
    assert report.sweep_edge(_result(0.1)) is None
    assert report.sweep_edge(_result(0.05)) == "lowest"
    assert report.sweep_edge(_result(0.15)) == "highest"
    assert report.sweep_edge(_result(0.3, thresholds=(0.3,))) is None  # one fixed threshold: nothing to extend
    assert "warning" not in report.format_sweep_table(names, _result(0.1))
    table = report.format_sweep_table(names, _result(0.05))
    assert table.splitlines()[-1].startswith("warning: the best threshold is the lowest one swept")
    assert "eval.threshold_range" in table


def test_the_sweep_summary_is_json_ready():
    summary = report.sweep_summary(["background", "cat", "dog"], _result(0.15))
    assert summary["per_class_iou"] == {"background": 80.0, "cat": None, "dog": 40.0}
    assert summary["per_threshold_miou"] == {"0.05": 50.0, "0.1": 50.0, "0.15": 60.0}
    assert summary["best_threshold_at_sweep_edge"] == "highest"
    assert (summary["miou"], summary["best_threshold"], summary["num_images"]) == (60.0, 0.15, 3)
    assert not any(isinstance(value, float) and math.isnan(value) for value in summary["per_class_iou"].values())


def _result_with_parts():
    return {
        **_result(0.1),
        "part_recall": {"body": 0.34, "part": float("nan")},
        "per_threshold_part_recall": {"body": [0.5, 0.34, 0.2], "part": [float("nan")] * 3},
        "part_pixels": {"body": 1200, "part": 0},
        "num_images_with_parts": 2,
    }


def test_part_recall_is_printed_under_the_table_and_summarised_when_the_sweep_had_part_maps():
    names = ["background", "cat", "dog"]
    assert "recall" not in report.format_sweep_table(names, _result(0.1))
    assert not {key for key in report.sweep_summary(names, _result(0.1)) if "part" in key}
    lines = report.format_sweep_table(names, _result_with_parts()).splitlines()
    assert lines[-1] == (
        "object recall at threshold 0.10: body 34.0%, discriminative part n/a (of 1200 body and 0 part pixels in 2 "
        "images with part maps)"
    )
    assert lines[-2].startswith("threshold sweep:")
    summary = report.sweep_summary(names, _result_with_parts())
    assert summary["part_recall"] == {"body": 0.34, "part": None}
    assert summary["per_threshold_part_recall"] == {
        "body": {"0.05": 0.5, "0.1": 0.34, "0.15": 0.2}, "part": {"0.05": None, "0.1": None, "0.15": None}
    }
    assert summary["part_pixels"] == {"body": 1200, "part": 0} and summary["num_images_with_parts"] == 2
    # The sweep-edge warning stays the last line.
    edge = {**_result_with_parts(), "best_threshold": 0.05}
    assert report.format_sweep_table(names, edge).splitlines()[-1].startswith("warning:")


def test_the_refinement_chain_reads_each_stage_summary_and_the_walk_at_its_threshold():
    cam = {"miou": 50.0, "best_threshold": 0.15}
    walk = {"miou": 60.0, "best_threshold": 0.3, "per_threshold_miou": {"0.3": 60.0, "0.35000000000000003": 58.5}}
    pseudo = {"miou": 61.25, "miou_ignoring_predicted_void": 63.0}
    rows = report.refinement_chain(cam, walk, pseudo, rw_threshold=0.35)
    assert [(step, value) for step, value, _ in rows] == [
        ("CAM", 50.0), ("+ random walk", 60.0), ("+ random walk", 58.5), ("+ dCRF (pseudo labels)", 61.25)
    ]
    table = report.format_chain_table(rows)
    assert "61.25" in table and "63.00" in table and "at rw_threshold 0.35" in table
    # A chain without the CAM and walk summaries (stages run in another workdir) has the pseudo labels alone; a
    # threshold outside the sweep shows as n/a.
    assert [step for step, _, _ in report.refinement_chain(None, None, pseudo, rw_threshold=0.35)] == [
        "+ dCRF (pseudo labels)"
    ]
    assert "n/a" in report.format_chain_table(report.refinement_chain(cam, walk, pseudo, rw_threshold=0.9))


def test_a_fine_sweep_prints_its_thresholds_with_the_decimals_that_tell_them_apart():
    names = ["background", "cat", "dog"]
    fine = [0.001 * step for step in range(1, 21)]  # float steps, as an arange gives them: 0.006000000000000001
    with_parts = {
        **_result(fine[5], thresholds=fine),
        "part_recall": {"body": 0.5, "part": 0.25},
        "part_pixels": {"body": 1200, "part": 300},
        "num_images_with_parts": 2,
    }
    table = report.format_sweep_table(names, with_parts)
    first, *_, sweep, recall = table.splitlines()
    assert first == "CAM mIoU: 60.00% at background threshold 0.006 (3 images)"
    assert sweep.startswith("threshold sweep: 0.001:50.0  0.002:50.0") and "0.006:60.0" in sweep
    assert recall.startswith("object recall at threshold 0.006:")
    # The usual sweeps keep two decimals; a value that no decimals up to 6 print exactly gets 6.
    assert report.threshold_decimals([0.05, 0.1, 0.75]) == 2
    assert report.threshold_decimals([0.01 * step for step in range(1, 96)]) == 2
    assert report.threshold_decimals([1 / 3]) == 6
