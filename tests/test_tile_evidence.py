"""Tests of ``studies.tile_evidence``: the tile categories and statistics against a brute-force count on a hand-made
example, the label maps tiled exactly as the images are, and a run on a tiny demo workdir (its counts against a
brute-force pass over the same masks, and the error for a folder that is no workdir)."""

import json
import types

import numpy as np
import pytest
from flax import nnx

from puzzle_jax import checkpointing, fileio, models, pipeline, puzzle, training
from puzzle_jax.data import datasets
from studies import tile_evidence

GRID = 2


def _brute_force_cases(labels, mask, parts, multiple):
    """``[(class index, tile index, category)]`` by explicit loops over the pixels of each tile of the padded frame."""
    height, width = puzzle.padded_size(*mask.shape, multiple)
    tile_height, tile_width = height // GRID, width // GRID
    cases = []
    for class_index in np.flatnonzero(labels):
        value = class_index + 1
        for tile in range(GRID * GRID):
            top, left = (tile // GRID) * tile_height, (tile % GRID) * tile_width
            of_class = part_pixels = body_pixels = 0
            for y in range(top, top + tile_height):
                for x in range(left, left + tile_width):
                    # Outside the image: padding, no object.
                    if y >= mask.shape[0] or x >= mask.shape[1] or mask[y, x] != value:
                        continue
                    of_class += 1
                    part_pixels += parts[y, x] == 2
                    body_pixels += parts[y, x] == 1
            pixels = tile_height * tile_width
            if of_class == 0:
                category = "absent"
            elif part_pixels >= tile_evidence.MIN_PART_SHARE * pixels:
                category = "part"
            elif part_pixels == 0 and body_pixels >= tile_evidence.MIN_BODY_SHARE * pixels:
                category = "body_only"
            else:
                category = None
            cases.append((int(class_index), tile, category))
    return cases


def _hand_made_example():
    """A 22x23 image padded to 24x24 (multiple 8): four 12x12 tiles of 144 pixels, so a tile needs 2 pixels of a
    part (1% = 1.44) and 8 of body (5% = 7.2). Classes 0 (mask value 1) and 2 (value 3) of 4 are present."""
    mask = np.zeros((22, 23), np.uint8)
    parts = np.zeros((22, 23), np.uint8)

    def paint(value, rows, columns, part):
        mask[rows, columns] = value
        parts[rows, columns] = part

    # Object A (class 0): a body over all four tiles, its 4-pixel part in the top-left tile. Top-right: 33 body
    # pixels; bottom-left: 10 (row 12, columns 2-11); bottom-right: 3 (row 12, columns 12-14), too few to count.
    paint(1, slice(1, 13), slice(2, 15), 1)
    paint(1, slice(2, 4), slice(3, 5), 2)
    # Object B (class 2): in the bottom-left tile a body with a 2-pixel part; in the bottom-right tile a body with a
    # 1-pixel part: under 1% of the tile, and not body-only either.
    paint(3, slice(16, 20), slice(3, 9), 1)
    paint(3, slice(17, 19), slice(5, 6), 2)
    paint(3, slice(15, 21), slice(15, 21), 1)
    paint(3, slice(17, 18), slice(17, 18), 2)
    # Void: a band beside A and a whole row, in the mask and the part map (never any class).
    paint(255, slice(1, 13), slice(15, 16), 255)
    paint(255, slice(21, 22), slice(0, 23), 255)
    labels = np.array([1, 0, 1, 0], np.float32)
    image_probabilities = np.array([0.9, 0.2, 0.7, 0.1])
    # Tiles top-left, top-right, bottom-left, bottom-right; classes 0-3.
    tile_probabilities = np.array(
        [
            [0.8, 0.3, 0.1, 0.05],
            [0.4, 0.6, 0.2, 0.1],
            [0.3, 0.05, 0.9, 0.25],
            [0.5, 0.5, 0.5, 0.5],
        ]
    )
    return labels, mask, parts, image_probabilities, tile_probabilities


def test_categories_and_statistics_match_a_brute_force_count():
    labels, mask, parts, image_probabilities, tile_probabilities = _hand_made_example()
    expected_cases = [(0, 0, "part"), (0, 1, "body_only"), (0, 2, "body_only"), (0, 3, None),
                      (2, 0, "absent"), (2, 1, "absent"), (2, 2, "part"), (2, 3, None)]
    assert _brute_force_cases(labels, mask, parts, 8) == expected_cases
    mask_tiles, part_tiles = tile_evidence.tile_map(mask, GRID, 8), tile_evidence.tile_map(parts, GRID, 8)
    assert mask_tiles.shape == (4, 12, 12)
    assert [tile_evidence.tile_category(mask_tiles[t], part_tiles[t], c + 1) for c, t, _ in expected_cases] == [
        category for _, _, category in expected_cases
    ]

    evidence = tile_evidence.TileEvidence()
    evidence.add(image_probabilities, tile_probabilities, labels, mask_tiles, part_tiles)
    result = evidence.result()
    approx = lambda value: pytest.approx(value, abs=1e-12)  # noqa: E731
    assert result["images"] == 1
    # Highest probability of the absent classes 1 and 3: image 0.2; tiles 0.3, 0.6, 0.25, 0.5.
    assert result["full_image"] == {
        "cases": 2, "mean_true_probability": approx(0.8), "share_above_half": 1.0,
        "mean_top_other_probability": approx(0.2), "cases_with_other_classes": 2,
    }
    categories = result["categories"]
    # A's top-left (0.8) and B's bottom-left (0.9).
    assert categories["part"] == {
        "cases": 2, "mean_true_probability": approx(0.85), "share_above_half": 1.0,
        "mean_top_other_probability": approx((0.3 + 0.25) / 2), "cases_with_other_classes": 2,
    }
    # A's top-right (0.4) and bottom-left (0.3).
    assert categories["body_only"] == {
        "cases": 2, "mean_true_probability": approx(0.35), "share_above_half": 0.0,
        "mean_top_other_probability": approx((0.6 + 0.25) / 2), "cases_with_other_classes": 2,
    }
    # B's top-left (0.1) and top-right (0.2).
    assert categories["absent"] == {
        "cases": 2, "mean_true_probability": approx(0.15), "share_above_half": 0.0,
        "mean_top_other_probability": approx((0.3 + 0.6) / 2), "cases_with_other_classes": 2,
    }

    # An image holding every class has no "other" class: its cases count, the other-class mean does not change.
    evidence.add(image_probabilities, tile_probabilities, np.ones(4, np.float32), mask_tiles, part_tiles)
    again = evidence.result()
    assert again["full_image"]["cases"] == 6 and again["full_image"]["cases_with_other_classes"] == 2
    assert again["full_image"]["mean_top_other_probability"] == approx(0.2)
    table = tile_evidence.format_table(result, "title")
    assert "body_only" in table and "0.350" in table


def test_label_maps_are_tiled_as_the_images_are():
    height, width, multiple = 22, 23, 8
    ys, xs = np.mgrid[:height, :width]
    position_map = (ys * width + xs + 1).astype(np.int32)  # 0 stays free for padding
    image = np.stack([ys + 1, xs + 1, np.zeros_like(ys)], axis=-1).astype(np.float32)[None]
    padded, size = puzzle.pad_to_multiple(image, multiple)
    assert size == (height, width) and padded.shape[1:3] == puzzle.padded_size(height, width, multiple)
    image_tiles = puzzle.tile(padded, GRID)
    decoded = np.where(
        image_tiles[..., 0] > 0, (image_tiles[..., 0] - 1) * width + image_tiles[..., 1], 0
    ).astype(np.int32)
    map_tiles = tile_evidence.tile_map(position_map, GRID, multiple)
    np.testing.assert_array_equal(map_tiles, decoded)
    # Every pixel of the image is in exactly one tile, and the rest is padding (0).
    values = np.sort(map_tiles[map_tiles > 0])
    np.testing.assert_array_equal(values, np.arange(1, height * width + 1))
    assert map_tiles.dtype == np.int32


def _tiny_demo_workdir(tmp_path):
    """A workdir as the pipeline leaves it: its recorded config (configs/demo.py on 3 tiny training images) and an
    exported (untrained) classifier at train_cam/model."""
    from configs import demo

    config = demo.get_config()
    config.data.data_dir = str(tmp_path / "data")
    config.data.builder_kwargs = {"num_pretrain": 1, "num_train": 3, "num_val": 1, "min_side": 48, "max_side": 56}
    layout = pipeline.Workdir(str(tmp_path / "run"))
    fileio.write_text(layout.config_file(), str(config))
    model_config = models.classifier_config(arch="resnet_tiny", num_classes=5, bn_mode="global")
    _, params, batch_stats = training.split_model(models.create_model(model_config, rngs=nnx.Rngs(0)))
    checkpointing.export_model(layout.exported_model("train_cam"), params, batch_stats, model_config)
    return config, layout


def test_a_run_on_a_demo_workdir_counts_what_a_brute_force_pass_counts(tmp_path, capsys):
    config, layout = _tiny_demo_workdir(tmp_path)
    assert tile_evidence.main(["--workdir", layout.root, "--limit", "2", "--devices", "1"]) == 0
    result = json.loads((tmp_path / "run" / "tile_evidence.json").read_text())
    assert "written:" in capsys.readouterr().out
    assert result["images"] == 2 and result["split"] == "train" and result["split_images"] == 3
    assert result["grid"] == GRID and result["pad_multiple"] == 32
    source, _ = datasets.load_split_from_config(config.data, "train")
    brute_force = {category: 0 for category in tile_evidence.CATEGORIES}
    true_classes = 0
    for index in range(2):
        record = source[index]
        true_classes += int(record["labels"].sum())
        for _, _, category in _brute_force_cases(record["labels"], record["mask"], record["parts"], 32):
            if category is not None:
                brute_force[category] += 1
    assert {name: stats["cases"] for name, stats in result["categories"].items()} == brute_force
    assert brute_force["absent"] + brute_force["part"] > 0  # the check above is not vacuous
    assert result["full_image"]["cases"] == true_classes
    for stats in [*result["categories"].values(), result["full_image"]]:
        for key in ("mean_true_probability", "share_above_half", "mean_top_other_probability"):
            assert stats[key] is None or 0.0 <= stats[key] <= 1.0, (key, stats)


def test_a_folder_without_a_recorded_config_or_export_is_named_with_the_fix(tmp_path, capsys):
    assert tile_evidence.main(["--workdir", str(tmp_path / "nothing")]) == 2
    error = capsys.readouterr().err
    assert str(tmp_path / "nothing" / "config.txt") in error and "puzzle_jax.main" in error
    layout = pipeline.Workdir(str(tmp_path / "run"))
    fileio.write_text(layout.config_file(), "data:\n  dataset: puzzle_demo\ntrain_cam:\n  init_from: ''\n")
    assert tile_evidence.main(["--workdir", layout.root]) == 2
    error = capsys.readouterr().err
    assert layout.exported_model("train_cam") in error and "--model" in error
    assert tile_evidence.main(["--workdir", layout.root, "--model", "init_from"]) == 2
    assert "train_cam.init_from" in capsys.readouterr().err


def test_a_dataset_without_part_maps_is_named_with_the_fix(monkeypatch):
    import ml_collections

    config = ml_collections.ConfigDict({"data": {"dataset": "voc", "root": "/data/VOC2012"}})
    info = types.SimpleNamespace(tfds_info=types.SimpleNamespace(features={"image": None, "mask": None}))
    monkeypatch.setattr(datasets, "load_split_from_config", lambda *args, **kwargs: ([], info))
    with pytest.raises(ValueError, match=r"'voc' \(root '/data/VOC2012'\) has no part maps.*SegmentationParts"):
        tile_evidence.load_split_with_parts(config, "train")
