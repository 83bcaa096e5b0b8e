"""Tests of the dataset registry's split views: record ids without decoding, and a split joined with a folder of
label PNGs written by an earlier stage (the segmentation and affinity tasks' training labels)."""

import pickle

import numpy as np
import pytest

from puzzle_jax import labels
from puzzle_jax.data import datasets, input_pipeline


@pytest.fixture(scope="module")
def demo_split(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    return datasets.load_split(
        "puzzle_demo", "train", data_dir=data_dir, decode_masks=False, num_pretrain=2, num_train=6, num_val=2
    )


def test_ids_are_the_records_ids_in_order(demo_split):
    source, _ = demo_split
    assert source.ids() == [record["id"] for record in source]


def _write_labels(source, directory, num_classes):
    rng = np.random.default_rng(0)
    written = {}
    for record in source:
        height, width = record["image"].shape[:2]
        label_map = rng.integers(0, num_classes + 1, (height, width)).astype(np.uint8)
        label_map[:2] = labels.IGNORE_LABEL
        labels.write_label_png(str(directory / f"{record['id']}.png"), label_map)
        written[record["id"]] = label_map
    return written


def test_label_folder_records_carry_the_folders_label_maps(demo_split, tmp_path):
    source, info = demo_split
    written = _write_labels(source, tmp_path, info.num_classes)
    joined = datasets.LabelFolderRecords(source, str(tmp_path), info.num_classes, produced_by="the test")
    assert len(joined) == len(source)
    for record, original in zip(joined, source, strict=True):
        assert record["id"] == original["id"]
        np.testing.assert_array_equal(record["image"], original["image"])
        np.testing.assert_array_equal(record["labels"], original["labels"])
        np.testing.assert_array_equal(record["mask"], written[record["id"]])
    # grain workers unpickle the source: the joined view travels too.
    again = pickle.loads(pickle.dumps(joined))
    np.testing.assert_array_equal(again[2]["mask"], written[joined[2]["id"]])
    # The segmentation transform crops these label maps with their images.
    transform = input_pipeline.SegmentationAugmentation(crop_size=64, rescale_range=(64, 96))
    batch = next(iter(input_pipeline.create_train_loader(joined, transform=transform, global_batch_size=2, seed=0)))
    assert batch["mask"].shape == (2, 64, 64) and set(np.unique(batch["mask"])) <= {0, 1, 2, 3, 4, 5, 255}


def test_missing_and_mismatched_label_maps_are_named(demo_split, tmp_path):
    source, info = demo_split
    with pytest.raises(FileNotFoundError, match="no such label folder; it is written by the pseudo_labels stage"):
        datasets.LabelFolderRecords(
            source, str(tmp_path / "none"), info.num_classes, produced_by="the pseudo_labels stage"
        )
    _write_labels(source, tmp_path, info.num_classes)
    ids = source.ids()
    (tmp_path / f"{ids[1]}.png").unlink()
    (tmp_path / f"{ids[4]}.png").unlink()
    with pytest.raises(FileNotFoundError, match=rf"2 of 6 images have no label map .*first: .*{ids[1]}\.png"):
        datasets.LabelFolderRecords(source, str(tmp_path), info.num_classes, produced_by="the test")
    _write_labels(source, tmp_path, info.num_classes)
    height, width = source[3]["image"].shape[:2]
    labels.write_label_png(str(tmp_path / f"{ids[3]}.png"), np.zeros((height + 1, width), np.uint8))
    joined = datasets.LabelFolderRecords(source, str(tmp_path), info.num_classes, produced_by="the test")
    with pytest.raises(ValueError, match=rf"{ids[3]}\.png: label map of size {height + 1}x{width} .* {height}x{width}"):
        joined[3]
    labels.write_label_png(str(tmp_path / f"{ids[3]}.png"), np.full((height, width), 9, np.uint8))
    with pytest.raises(ValueError, match=rf"{ids[3]}\.png"):
        joined[3]
