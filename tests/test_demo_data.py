"""Tests for the built-in demo dataset (data/demo.py) and the registry (data/datasets.py)."""

import dataclasses
import hashlib
import pickle

import cv2
import numpy as np
import pytest

from puzzle_jax.data import datasets, demo
from puzzle_jax.data.records import PART_VALUES

SIZES = dict(num_pretrain=6, num_train=12, num_val=4)
SPLITS = ("pretrain", "train", "val")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("demo_data"))


@pytest.fixture(scope="module")
def demo_splits(data_dir):
    return {
        split: datasets.load_split("puzzle_demo", split, data_dir=data_dir, seed=3, **SIZES)
        for split in SPLITS
    }


def image_digest(image: np.ndarray) -> str:
    return hashlib.sha256(image.tobytes() + str(image.shape).encode()).hexdigest()


def test_split_counts_info_and_feature_layout(demo_splits):
    for split, (source, info) in demo_splits.items():
        assert len(source) == SIZES[f"num_{split}"] == info.num_examples
        assert info.split_sizes == {name: SIZES[f"num_{name}"] for name in SPLITS}
        assert info.num_classes == 5 and len(info.class_names) == 5
        assert len(set(info.class_names)) == 5
        ids = []
        for record in source:
            assert set(record) == {"image", "mask", "id", "labels", "parts"}
            image, mask = record["image"], record["mask"]
            assert record["parts"].dtype == np.uint8 and record["parts"].shape == mask.shape
            assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
            assert 80 <= image.shape[0] <= 128 and 80 <= image.shape[1] <= 128
            assert mask.dtype == np.uint8 and mask.shape == image.shape[:2]
            assert record["labels"].dtype == np.float32 and record["labels"].shape == (5,)
            assert isinstance(record["id"], str)
            ids.append(record["id"])
        assert ids == [f"{split}_{index:05d}" for index in range(len(source))]


def test_image_sizes_vary(demo_splits):
    shapes = {record["image"].shape for record in demo_splits["train"][0]}
    assert len(shapes) > 6


def test_labels_are_exactly_the_classes_in_the_mask(demo_splits):
    for source, info in demo_splits.values():
        for record in source:
            values = set(np.unique(record["mask"]).tolist())
            assert values <= set(range(info.num_classes + 1)) | {255}
            classes_in_mask = sorted(value for value in values if 1 <= value <= info.num_classes)
            expected_label_indices = [value - 1 for value in classes_in_mask]
            assert np.flatnonzero(record["labels"]).tolist() == expected_label_indices
            assert set(np.unique(record["labels"]).tolist()) <= {0.0, 1.0}
            assert 1 <= len(classes_in_mask) <= 3


def test_objects_are_outlined_by_255_like_voc(demo_splits):
    for record in demo_splits["train"][0]:
        mask = record["mask"].astype(int)
        assert np.any(mask == 255)
        # No two 4-neighbours carry different real labels: every label change passes through 255.
        for a, b in ((mask[1:], mask[:-1]), (mask[:, 1:], mask[:, :-1])):
            touching = (a != b) & (a != 255) & (b != 255)
            assert not touching.any(), record["id"]
        # The border is thin: every 255 pixel lies within 2 pixels of a labelled pixel (where
        # borders of touching objects meet it can be thicker than 2 pixels, never wider than 5).
        void = (mask == 255).astype(np.uint8)
        eroded = cv2.erode(void, np.ones((5, 5), np.uint8), borderType=cv2.BORDER_REPLICATE)
        assert not np.any(eroded)
        assert np.mean(mask == 255) < 0.15


def test_objects_are_large_with_class_specific_head_colours_inside(demo_splits):
    source, info = demo_splits["train"]
    foreground_fractions = []
    for record in source:
        mask, image = record["mask"], record["image"].astype(int)
        foreground_fractions.append(np.mean((mask >= 1) & (mask <= info.num_classes)))
        for class_index in np.flatnonzero(record["labels"]):
            appearance = demo.CLASS_APPEARANCES[class_index]
            inside = mask == class_index + 1
            # The head core is the class evidence: its colour (up to blur and noise) lies in the
            # object.
            distance = np.abs(image - np.array(appearance.head_core_rgb)).max(axis=-1)
            assert np.count_nonzero(inside & (distance < 40)) >= 4, (record["id"], appearance.name)
    assert 0.12 < np.mean(foreground_fractions) < 0.7


def test_bodies_tell_their_class_and_clutter_does_not_pass_for_a_body(demo_splits):
    # Puzzle-CAM needs class evidence in the tiles that miss the head: every object's (saturation-weighted, circular)
    # mean hue is nearest to its own class's body hue, and hardly any background pixel is as saturated as a typical
    # body. With body hues 0.07 apart (7 of these objects nearer another class) and clutter as saturated as bodies
    # (6% of background pixels at >= 0.5) Puzzle-CAM lost to plain CAM (README).
    body_hues = np.array([appearance.body_hue for appearance in demo.CLASS_APPEARANCES])
    body_like_background, body_saturations = [], []
    for split in ("pretrain", "train"):
        source, info = demo_splits[split]
        for record in source:
            hsv = cv2.cvtColor(record["image"], cv2.COLOR_RGB2HSV_FULL).astype(np.float64) / 255.0
            hue, saturation = hsv[..., 0], hsv[..., 1]
            body_like_background.append(np.mean(saturation[record["mask"] == 0] >= 0.5))
            for class_index in np.flatnonzero(record["labels"]):
                inside = record["mask"] == class_index + 1
                mean_vector = np.sum(saturation[inside] * np.exp(2j * np.pi * hue[inside]))
                mean_hue = np.angle(mean_vector) / (2 * np.pi) % 1.0
                distances = np.abs((mean_hue - body_hues[: info.num_classes] + 0.5) % 1.0 - 0.5)
                assert distances.argmin() == class_index, (record["id"], class_index, mean_hue)
                body_saturations.append(np.median(saturation[inside]))
    assert np.mean(body_like_background) < 0.03
    assert np.median(body_saturations) >= 0.5


def test_source_is_picklable_for_grain_workers(demo_splits):
    source, _ = demo_splits["val"]
    restored = pickle.loads(pickle.dumps(source))
    np.testing.assert_array_equal(restored[1]["image"], source[1]["image"])
    assert restored[-1]["id"] == source[len(source) - 1]["id"]
    with pytest.raises(IndexError):
        source[len(source)]


def test_split_opened_without_masks_has_the_same_records_minus_the_mask(demo_splits, data_dir):
    """decode_masks=False (classifier training) skips the PNG decode; workers reopen it the same way."""
    source, _ = demo_splits["val"]
    unmasked, _ = datasets.load_split("puzzle_demo", "val", data_dir=data_dir, seed=3, decode_masks=False, **SIZES)
    for records in (unmasked, pickle.loads(pickle.dumps(unmasked))):
        assert len(records) == len(source)
        for index in (0, len(source) - 1):
            record, full = records[index], source[index]
            assert set(record) == {"image", "id", "labels"} and "mask" in full and "parts" in full
            np.testing.assert_array_equal(record["image"], full["image"])
            np.testing.assert_array_equal(record["labels"], full["labels"])
            assert record["id"] == full["id"]


def test_in_a_multi_process_run_process_0_prepares_before_the_others_open(monkeypatch):
    """The split is opened through ``sharding.first_on_process_zero``: its order and failures are tested in
    tests/test_sharding.py, with two real processes in tests/test_multiprocess.py."""
    import ml_collections

    from puzzle_jax import sharding

    events = []
    monkeypatch.setattr(sharding, "first_on_process_zero", lambda name, function: events.append(name) or function())
    monkeypatch.setattr(datasets, "load_split", lambda *args, **kwargs: events.append("prepare and open") or (1, 2))
    data_config = ml_collections.ConfigDict(
        {"dataset": "puzzle_demo", "root": "", "data_dir": "/data", "builder_kwargs": {}}
    )
    assert datasets.load_split_from_config(data_config, "train") == (1, 2)
    assert events == ["dataset puzzle_demo train prepared", "prepare and open"]


def test_pretrain_images_are_disjoint_from_train_and_val(demo_splits):
    digests = {split: {image_digest(r["image"]) for r in demo_splits[split][0]} for split in SPLITS}
    assert not digests["pretrain"] & digests["train"]
    assert not digests["pretrain"] & digests["val"]
    assert not digests["train"] & digests["val"]


def test_generation_is_deterministic_by_seed(demo_splits, tmp_path):
    # Regenerated from scratch into another directory: same seed, same bytes.
    same, _ = datasets.load_split(
        "puzzle_demo", "train", data_dir=str(tmp_path / "a"), seed=3, **SIZES
    )
    other, _ = datasets.load_split(
        "puzzle_demo", "train", data_dir=str(tmp_path / "b"), seed=4, **SIZES
    )
    original = demo_splits["train"][0]
    for index in range(len(original)):
        np.testing.assert_array_equal(same[index]["image"], original[index]["image"])
        np.testing.assert_array_equal(same[index]["mask"], original[index]["mask"])
        np.testing.assert_array_equal(same[index]["labels"], original[index]["labels"])
    other_digests = {image_digest(record["image"]) for record in other}
    assert other_digests.isdisjoint(image_digest(record["image"]) for record in original)


def test_stored_records_equal_freshly_rendered_examples(demo_splits):
    """PNG storage is lossless and record i of a split is example i of that split's stream."""
    source, _ = demo_splits["val"]
    for index in range(len(source)):
        image, mask, labels, parts = demo.generate_example(
            demo.example_rng(3, "val", index), num_classes=5, min_side=80, max_side=128
        )
        np.testing.assert_array_equal(source[index]["image"], image)
        np.testing.assert_array_equal(source[index]["mask"], mask)
        np.testing.assert_array_equal(source[index]["labels"], labels)
        np.testing.assert_array_equal(source[index]["parts"], parts)


def test_part_maps_mark_the_heads_inside_the_objects_and_the_bodies_around_them(demo_splits):
    head_fractions = []
    for split in SPLITS:
        source, info = demo_splits[split]
        for record in source:
            mask, parts = record["mask"], record["parts"]
            is_object = (mask >= 1) & (mask <= info.num_classes)
            assert set(np.unique(parts).tolist()) <= set(PART_VALUES)
            # 255 exactly on the mask's void band; 1 and 2 exactly on the object pixels, 0 on the background.
            np.testing.assert_array_equal(parts == 255, mask == 255)
            np.testing.assert_array_equal((parts == 1) | (parts == 2), is_object)
            assert np.all(parts[mask == 0] == 0)
            for class_id in np.unique(mask[is_object]):
                head, body = (mask == class_id) & (parts == 2), (mask == class_id) & (parts == 1)
                assert head.any() and body.any(), record["id"]
                head_fractions.append(head.sum() / (head.sum() + body.sum()))
                # The head is the class evidence: its core colour is found there (up to blur and noise).
                core = np.asarray(demo.CLASS_APPEARANCES[class_id - 1].head_core_rgb)
                distance = np.abs(record["image"].astype(int) - core).max(axis=-1)
                assert np.count_nonzero(head & (distance < 40)) >= 4, (record["id"], class_id)
    # Heads are the small discriminative part: ~10-15% of an object (GENERATION.head_radius), never most of it.
    assert 0.05 < np.median(head_fractions) < 0.2 and max(head_fractions) < 0.5


def _generate_example_before_part_maps(rng, *, num_classes, min_side, max_side):
    """`demo.generate_example` as it was before part maps existed (revision 1, commit 065c738), verbatim but for
    the docstring: what the demo's published results were measured on."""
    params, classes = demo.GENERATION, demo.CLASS_APPEARANCES
    height, width = (int(side) for side in rng.integers(min_side, max_side + 1, size=2))
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    image = demo._render_background(rng, height, width, params)
    placed = []
    num_objects = rng.integers(params.objects_per_image[0], params.objects_per_image[1] + 1)
    for object_number in range(num_objects):
        class_index = int(rng.integers(num_classes))
        placement = demo._try_place_object(rng, ys, xs, placed, params)
        if placement is None and object_number == 0:
            relaxed = dataclasses.replace(params, min_body_inside=0.0, placement_attempts=1000)
            placement = demo._try_place_object(rng, ys, xs, placed, relaxed)
        if placement is None:
            continue
        geometry, body, head = placement
        demo._paint_object(rng, image, ys, xs, geometry, body, head, classes[class_index], params)
        region = body | head
        for other in placed:
            other.visible &= ~region
        placed.append(demo._PlacedObject(class_index=class_index, visible=region, head=head))

    if params.blur_sigma > 0:
        image = cv2.GaussianBlur(image, (0, 0), params.blur_sigma)
    image = image * 255.0 + rng.normal(0.0, params.noise_std, size=image.shape)
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)

    mask = np.zeros((height, width), np.uint8)
    for placed_object in placed:
        mask[placed_object.visible] = placed_object.class_index + 1
    for placed_object in placed:
        mask[demo._boundary_band(placed_object.visible)] = 255
    present = np.unique(mask)
    present = present[(present >= 1) & (present <= num_classes)]
    labels = np.zeros((num_classes,), np.float32)
    labels[present - 1] = 1.0
    return image, mask, labels


# Computed with the generator of commit 065c738 (before part maps) for seed 0 and the default sizes: per example,
# the sha256 of its mask and labels (integer geometry: the same on every CPU) and the generator's next draw after
# it (which changes if a random number is drawn more or less).
_EXAMPLES_BEFORE_PART_MAPS = {
    ("pretrain", 0): ("5c82fb94735ca401", 1567626582249177831),
    ("train", 7): ("12b8988ae8c1cee8", 1141615819712567888),
    ("val", 3): ("c431455a481926c1", 462217223006317316),
    ("train", 599): ("3a8a3b7ca5aa59d5", 3542782850733752588),
}


def test_part_maps_leave_images_masks_and_labels_bit_identical_to_the_generator_before_them():
    """The demo's published results were measured on data without part maps: adding them draws no random number
    and changes no image, mask or label."""
    for (split, index), (geometry_digest, next_draw) in _EXAMPLES_BEFORE_PART_MAPS.items():
        rng = demo.example_rng(0, split, index)
        _, mask, labels, _ = demo.generate_example(rng, num_classes=5, min_side=80, max_side=128)
        digest = hashlib.sha256(mask.tobytes() + str(mask.shape).encode() + labels.tobytes()).hexdigest()[:16]
        assert (digest, int(rng.integers(1 << 62))) == (geometry_digest, next_draw), (split, index)
    for split in SPLITS:
        for index in range(6):
            before_rng, rng = demo.example_rng(5, split, index), demo.example_rng(5, split, index)
            before = _generate_example_before_part_maps(before_rng, num_classes=5, min_side=80, max_side=128)
            now = demo.generate_example(rng, num_classes=5, min_side=80, max_side=128)
            for old, new in zip(before, now[:3]):
                assert old.dtype == new.dtype
                np.testing.assert_array_equal(old, new)
            assert before_rng.integers(1 << 62) == rng.integers(1 << 62)


def test_part_maps_moved_the_demo_to_a_new_prepared_copy():
    """A copy prepared before part maps (renderer revision 1) has no `parts`: the config name must differ from that
    revision's (whose default config was named c5_seed0_n1200-600-200_side80-128_gdd63a6dd)."""
    assert demo.DEMO_RENDERER_REVISION >= 2
    assert not demo.create_demo_config().name.endswith("_gdd63a6dd")
    assert "parts" in demo.PuzzleDemo(config=demo.create_demo_config(), data_dir="/nonexistent").info.features


def test_configurable_classes_and_sides(tmp_path):
    source, info = datasets.load_split(
        "puzzle_demo", "val", data_dir=str(tmp_path), num_classes=3, min_side=48, max_side=56,
        num_pretrain=1, num_train=1, num_val=5,
    )
    assert info.num_classes == 3
    assert info.class_names == tuple(appearance.name for appearance in demo.CLASS_APPEARANCES[:3])
    for record in source:
        assert record["labels"].shape == (3,)
        assert 48 <= min(record["image"].shape[:2]) and max(record["image"].shape[:2]) <= 56
        assert set(np.unique(record["mask"]).tolist()) <= {0, 1, 2, 3, 255}


def test_default_config_sizes_and_registered_name():
    config = demo.create_demo_config()
    assert (config.num_pretrain, config.num_train, config.num_val) == (1200, 600, 200)
    assert config is demo.PuzzleDemo.BUILDER_CONFIGS[0]
    assert demo.create_demo_config(seed=1).name != config.name


def test_unknown_dataset_split_and_option_are_clear_errors(data_dir):
    with pytest.raises(ValueError, match=r"'voc_oops'.*data\.dataset.*puzzle_demo"):
        datasets.load_split("voc_oops", "train", data_dir=data_dir)
    with pytest.raises(ValueError, match=r"'test'.*\['pretrain', 'train', 'val'\]"):
        datasets.load_split("puzzle_demo", "test", data_dir=data_dir, seed=3, **SIZES)
    with pytest.raises(ValueError, match=r"\['num_objects'\].*allowed"):
        datasets.load_split("puzzle_demo", "train", data_dir=data_dir, num_objects=3)
    with pytest.raises(ValueError, match="num_classes=9"):
        datasets.load_split("puzzle_demo", "train", data_dir=data_dir, num_classes=9)


def test_generating_says_generating_not_downloading(tmp_path, capfd):
    """Issue 17: tfds announced 'Downloading and preparing dataset Unknown size (download: Unknown size ...)' for
    data that is generated; the line now says what happens, and tfds' bars stay out of a non-terminal output."""
    datasets.load_split("puzzle_demo", "val", data_dir=str(tmp_path), seed=5, num_pretrain=1, num_train=1, num_val=2)
    output = capfd.readouterr()
    text = output.out + output.err
    assert "Generating the demo dataset (4 images: pretrain 1, train 1, val 2; nothing is downloaded) into" in text
    assert "is ready in" in text
    assert "Downloading" not in text and "downloaded and prepared" not in text and "\r" not in text
    # A second load reads the prepared copy silently.
    datasets.load_split("puzzle_demo", "val", data_dir=str(tmp_path), seed=5, num_pretrain=1, num_train=1, num_val=2)
    assert "Generating" not in capfd.readouterr().out
