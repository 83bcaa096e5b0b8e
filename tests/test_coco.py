"""Tests for the coco2014 builder and COCO segmentation decoding (puzzle_jax/data/coco.py).

References are independent of the code under test: a compressed RLE string worked out by hand from
the documented format, an encoder transcribed from that format, a brute-force point-in-polygon test
at pixel centres, and masks of axis-aligned boxes painted by slicing.
"""

import json
import os

import numpy as np
import pytest
from PIL import Image

from puzzle_jax.data import coco, datasets
from puzzle_jax.labels import BadExampleError

# --------------------------------------------------------------------------------------------------
# RLE.
# --------------------------------------------------------------------------------------------------


def test_compressed_rle_string_worked_out_by_hand():
    # Runs [1, 40, 2, 29] on a 9 x 8 mask, written per the format (5-bit groups, value + 48, 0x20 =
    # "more", 0x10 of the last group = sign, runs from the 4th on as differences to run i - 2):
    #   1 -> '1';  40 = 8 + 1*32 -> (8|0x20)+48 = 'X', then 1 -> '1';  2 -> '2';
    #   29 - 40 = -11 -> low 5 bits 21 (sign bit 0x10 set, rest all ones) -> 21+48 = 'E'.
    assert coco.decode_rle_string("1X12E") == [1, 40, 2, 29]
    flat = np.zeros(72, bool)
    flat[1:41] = True
    flat[43:72] = True
    expected = flat.reshape(8, 9).T  # Column-major: runs go down the columns.
    np.testing.assert_array_equal(coco.rle_to_mask("1X12E", 9, 8), expected)
    np.testing.assert_array_equal(coco.rle_to_mask(b"1X12E", 9, 8), expected)
    np.testing.assert_array_equal(coco.rle_to_mask([1, 40, 2, 29], 9, 8), expected)


def encode_rle_string(runs):
    """The documented encoder (pycocotools rleToString), transcribed for the round trip."""
    characters = []
    for index, run in enumerate(runs):
        value = run - runs[index - 2] if index > 2 else run
        more = True
        while more:
            group = value & 0x1F
            value >>= 5
            more = value != -1 if group & 0x10 else value != 0
            if more:
                group |= 0x20
            characters.append(chr(group + 48))
    return "".join(characters)


def runs_of(mask):
    flat = mask.T.reshape(-1).astype(np.int8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    runs = np.diff(bounds).tolist()
    return ([0] + runs) if flat[0] else runs


def test_random_masks_round_trip_through_the_documented_encoding():
    rng = np.random.default_rng(0)
    for trial in range(20):
        height, width = rng.integers(1, 60, size=2)
        mask = rng.uniform(size=(height, width)) < rng.uniform(0.05, 0.95)
        if trial % 3 == 0:  # Long runs: multi-character numbers and large differences.
            mask = np.zeros((height, width), bool)
            mask[rng.integers(height) :, rng.integers(width) :] = True
        runs = runs_of(mask)
        assert sum(runs) == height * width
        decoded = coco.rle_to_mask(encode_rle_string(runs), height, width)
        np.testing.assert_array_equal(decoded, mask)
        np.testing.assert_array_equal(coco.rle_to_mask(runs, height, width), mask)


def test_bad_rle_is_a_clear_error():
    with pytest.raises(ValueError, match="cover 73 pixels but the mask is 9x8 = 72"):
        coco.rle_to_mask([1, 40, 2, 30], 9, 8)
    with pytest.raises(ValueError, match="ends inside a run length"):
        coco.decode_rle_string("X")
    with pytest.raises(ValueError, match=r"character '~'"):
        coco.decode_rle_string("1~")
    with pytest.raises(ValueError, match=r"RLE size \[5, 5\] differs from the image size \[9, 8\]"):
        coco.segmentation_to_mask({"counts": "1X12E", "size": [5, 5]}, 9, 8)


# --------------------------------------------------------------------------------------------------
# Polygons.
# --------------------------------------------------------------------------------------------------


def box_polygon(left, top, right, bottom):
    return [left, top, right, top, right, bottom, left, bottom]


def inside_polygon(x, y, polygon):
    """Brute-force even-odd ray casting of one point."""
    points = np.asarray(polygon, float).reshape(-1, 2)
    inside = False
    for (x1, y1), (x2, y2) in zip(points, np.roll(points, -1, axis=0)):
        if (y1 > y) != (y2 > y) and x < x1 + (y - y1) * (x2 - x1) / (y2 - y1):
            inside = not inside
    return inside


def test_integer_box_polygon_covers_exactly_its_pixels():
    mask = coco.polygons_to_mask([box_polygon(2, 1, 6, 4)], 7, 9)
    expected = np.zeros((7, 9), bool)
    expected[1:4, 2:6] = True  # rows 1..3, columns 2..5: area 4 x 3 = 12, as pycocotools
    np.testing.assert_array_equal(mask, expected)


def test_random_polygons_match_brute_force_at_pixel_centres():
    rng = np.random.default_rng(1)
    height, width = 23, 31
    for _ in range(12):
        vertices = rng.integers(3, 9)
        # Some vertices outside the image, to exercise clipping.
        polygon = np.stack([rng.uniform(-5, width + 5, vertices),
                            rng.uniform(-5, height + 5, vertices)], axis=1).reshape(-1).tolist()
        expected = np.array([[inside_polygon(x + 0.5, y + 0.5, polygon) for x in range(width)]
                             for y in range(height)])
        np.testing.assert_array_equal(coco.polygons_to_mask([polygon], height, width), expected)


def test_polygons_of_one_instance_are_united_not_xored():
    mask = coco.polygons_to_mask([box_polygon(0, 0, 5, 5), box_polygon(3, 3, 8, 8), [1, 1, 2, 2]],
                                 10, 10)
    expected = np.zeros((10, 10), bool)
    expected[0:5, 0:5] = True
    expected[3:8, 3:8] = True
    np.testing.assert_array_equal(mask, expected)


# --------------------------------------------------------------------------------------------------
# Semantic masks.
# --------------------------------------------------------------------------------------------------


def box_annotation(annotation_id, category_id, box, iscrowd=0, height=None, width=None):
    left, top, right, bottom = box
    if iscrowd:
        region = np.zeros((height, width), bool)
        region[top:bottom, left:right] = True
        segmentation = {"counts": runs_of(region), "size": [height, width]}
    else:
        segmentation = [box_polygon(left, top, right, bottom)]
    return {"id": annotation_id, "category_id": category_id, "iscrowd": iscrowd,
            "segmentation": segmentation}


def test_class_ids_follow_category_id_order():
    assert len(coco.COCO_CLASS_NAMES) == 80
    ids = [category_id for category_id, _ in coco.COCO_CATEGORIES]
    assert ids == sorted(ids) and len(set(ids)) == 80
    # Category ids 12, 26, 29, 30, 45, 66, 68, 69, 71, 83 do not exist in COCO 2014.
    assert coco.CLASS_OF_CATEGORY[1] == 1 and coco.COCO_CLASS_NAMES[0] == "person"
    assert coco.CLASS_OF_CATEGORY[13] == 12 and coco.COCO_CLASS_NAMES[11] == "stop sign"
    assert coco.CLASS_OF_CATEGORY[67] == 61 and coco.COCO_CLASS_NAMES[60] == "dining table"
    assert coco.CLASS_OF_CATEGORY[90] == 80 and coco.COCO_CLASS_NAMES[79] == "toothbrush"


def test_overlapping_instances_smaller_on_top_and_crowd_ignored():
    height, width = 12, 16
    annotations = [
        box_annotation(1, 18, (4, 3, 8, 7)),                      # dog, small, listed first
        box_annotation(2, 1, (2, 2, 14, 10)),                     # person, large, on the dog
        box_annotation(3, 3, (10, 0, 16, 4), iscrowd=1, height=height, width=width),  # car crowd
        box_annotation(4, 19, (12, 2, 15, 6)),                    # horse, over the crowd
    ]
    dog, person, car, horse = (coco.CLASS_OF_CATEGORY[c] for c in (18, 1, 3, 19))
    expected = np.zeros((height, width), np.uint8)
    expected[0:4, 10:16] = 255        # crowd first (ignored) ...
    expected[2:10, 2:14] = person     # ... then by decreasing area: person (96 px),
    expected[3:7, 4:8] = dog          # dog (16 px),
    expected[2:6, 12:15] = horse      # horse (12 px).
    mask = coco.render_semantic_mask(annotations, height, width)
    np.testing.assert_array_equal(mask, expected)
    with_crowd_class = coco.render_semantic_mask(annotations, height, width, crowd="class")
    expected[expected == 255] = car
    np.testing.assert_array_equal(with_crowd_class, expected)
    labels = coco.labels_of_annotations(annotations)
    assert np.flatnonzero(labels).tolist() == sorted(c - 1 for c in (dog, person, car, horse))


def test_unknown_category_is_a_clear_error():
    with pytest.raises(ValueError, match=r"annotation 7 has unknown category_id 12; allowed: \[1,"):
        coco.render_semantic_mask([box_annotation(7, 12, (0, 0, 2, 2))], 4, 4)


# --------------------------------------------------------------------------------------------------
# The builder on a fake COCO tree.
# --------------------------------------------------------------------------------------------------

CATEGORIES_JSON = [{"id": i, "name": n, "supercategory": "x"} for i, n in coco.COCO_CATEGORIES]


class FakeCoco:
    """root/{train2014,val2014}/*.jpg and root/annotations/instances_*.json."""

    def __init__(self, root):
        self.root = str(root)
        self.images, self.annotations, self.json_paths = {}, {}, {}
        self.add_split("train", [
            # (number, height, width, [annotation boxes (category, box, iscrowd)], grey)
            (9, 20, 24, [(18, (2, 2, 10, 12), 0), (1, (5, 5, 20, 18), 0)], False),
            (25, 16, 30, [(3, (0, 0, 30, 8), 1), (62, (4, 6, 9, 15), 0)], True),
            (30, 18, 18, [], False),   # no annotation
            (42, 22, 20, [(90, (1, 1, 4, 4), 0)], False),
        ])
        self.add_split("val", [
            (7, 20, 20, [(44, (3, 3, 12, 15), 0)], False),
            (8, 20, 20, [], False),
        ])

    def add_split(self, split, entries):
        folder = f"{split}2014"
        images, annotations = [], []
        for number, height, width, boxes, grey in entries:
            file_name = f"COCO_{folder}_{number:012d}.jpg"
            rng = np.random.default_rng(number)
            pixels = rng.integers(0, 256, (height, width) if grey else (height, width, 3))
            path = os.path.join(self.root, folder, file_name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            Image.fromarray(pixels.astype(np.uint8)).save(path, quality=95)
            images.append({"id": number, "file_name": file_name, "height": height, "width": width})
            example_annotations = [
                box_annotation(1000 * number + k, category, box, crowd, height, width)
                for k, (category, box, crowd) in enumerate(boxes)
            ]
            for annotation in example_annotations:
                annotations.append({**annotation, "image_id": number, "area": 1.0, "bbox": [0] * 4})
            self.images[file_name[:-4]] = (path, height, width, grey)
            self.annotations[file_name[:-4]] = boxes
        json_path = os.path.join(self.root, "annotations", f"instances_{folder}.json")
        os.makedirs(os.path.dirname(json_path), exist_ok=True)
        with open(json_path, "w") as file:
            json.dump({"images": images[::-1], "annotations": annotations,
                       "categories": CATEGORIES_JSON}, file)
        self.json_paths[split] = json_path

    def expected_mask(self, example_id, crowd_value=255):
        _, height, width, _ = self.images[example_id]
        mask = np.zeros((height, width), np.uint8)
        boxes = self.annotations[example_id]
        for _category, (left, top, right, bottom), crowd in boxes:
            if crowd:
                mask[top:bottom, left:right] = crowd_value
        instances = [(b, c) for c, b, crowd in boxes if not crowd]
        for (left, top, right, bottom), category in sorted(
            instances, key=lambda item: -(item[0][2] - item[0][0]) * (item[0][3] - item[0][1])
        ):
            mask[top:bottom, left:right] = coco.CLASS_OF_CATEGORY[category]
        return mask


@pytest.fixture(scope="module")
def fake_coco(tmp_path_factory):
    return FakeCoco(tmp_path_factory.mktemp("coco_root"))


@pytest.fixture(scope="module")
def coco_splits(fake_coco, tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("coco_tfds"))
    return {split: datasets.load_split("coco2014", split, data_dir=data_dir, root=fake_coco.root)
            for split in ("train", "val")}


def test_builder_renders_masks_labels_and_skips_images_without_annotations(fake_coco, coco_splits):
    for split, (source, info) in coco_splits.items():
        annotated = sorted(i for i in fake_coco.images if f"_{split}2014_" in i
                           and fake_coco.annotations[i])
        assert [record["id"] for record in source] == annotated
        assert info.num_classes == 80 and info.class_names == coco.COCO_CLASS_NAMES
        report = info.tfds_info.metadata["splits"][split]
        assert report["images_without_annotations"] == 1 and report["examples"] == len(annotated)
        for record in source:
            path, height, width, grey = fake_coco.images[record["id"]]
            with Image.open(path) as picture:
                decoded = np.asarray(picture.convert("RGB")).astype(int)
            assert record["image"].shape == (height, width, 3)
            assert np.abs(record["image"].astype(int) - decoded).max() <= 2
            if grey:
                assert np.array_equal(record["image"][..., 0], record["image"][..., 2])
            np.testing.assert_array_equal(record["mask"], fake_coco.expected_mask(record["id"]))
            categories = {c for c, _, _ in fake_coco.annotations[record["id"]]}
            expected_labels = sorted(coco.CLASS_OF_CATEGORY[c] - 1 for c in categories)
            assert np.flatnonzero(record["labels"]).tolist() == expected_labels


def test_images_without_annotations_can_be_kept_as_background(fake_coco, tmp_path):
    source, _ = datasets.load_split("coco2014", "val", data_dir=str(tmp_path), root=fake_coco.root,
                                    splits="val", images_without_annotations="background",
                                    crowd="class")
    by_id = {record["id"]: record for record in source}
    assert sorted(by_id) == sorted(i for i in fake_coco.images if "_val2014_" in i)
    empty = by_id["COCO_val2014_000000000008"]
    assert not empty["labels"].any() and not empty["mask"].any()


def test_bad_coco_input_is_a_clear_error_naming_the_file(tmp_path):
    tree = FakeCoco(tmp_path / "root")
    data_dir = str(tmp_path / "tfds")
    with open(tree.json_paths["val"]) as file:
        content = json.load(file)
    content["annotations"][0]["category_id"] = 12
    with open(tree.json_paths["val"], "w") as file:
        json.dump(content, file)
    with pytest.raises(BadExampleError, match=r"instances_val2014\.json: image COCO_val2014_"
                       r"000000000007\.jpg: annotation \d+ has unknown category_id 12"):
        datasets.load_split("coco2014", "val", data_dir=data_dir, root=tree.root, splits="val")
    # The train image 42 on disk is smaller than its JSON entry says.
    path, height, width, _ = tree.images["COCO_train2014_000000000042"]
    Image.fromarray(np.zeros((height - 2, width, 3), np.uint8)).save(path)
    with pytest.raises(BadExampleError, match=r"000000000042\.jpg: image is 20x20 \(HxW\) but "
                       r".*instances_train2014\.json says 22x20"):
        datasets.load_split("coco2014", "train", data_dir=data_dir, root=tree.root, splits="train")
    os.remove(tree.images["COCO_train2014_000000000009"][0])
    source, info = datasets.load_split("coco2014", "train", data_dir=data_dir, root=tree.root,
                                       splits="train", on_bad_example="skip")
    assert [record["id"] for record in source] == ["COCO_train2014_000000000025"]
    report = info.tfds_info.metadata["splits"]["train"]
    assert report["skipped"] == 2
    assert {item["problem"].split(" ")[0] for item in report["skipped_examples"]} == {"image"}
    content["categories"] = content["categories"][:-1]
    with open(tree.json_paths["val"], "w") as file:
        json.dump(content, file)
    with pytest.raises(ValueError, match=r"instances_val2014\.json: its categories are not COCO "
                       r"2014's 80 .*\(90, 'toothbrush'\)"):
        datasets.load_split("coco2014", "val", data_dir=data_dir, root=tree.root, splits="val")
    os.remove(tree.json_paths["val"])
    with pytest.raises(FileNotFoundError, match=r"annotation file .*instances_val2014\.json does "
                       "not exist"):
        datasets.load_split("coco2014", "val", data_dir=data_dir, root=tree.root, splits="val")
    with pytest.raises(ValueError, match=r"crowd='drop'.*\['ignore', 'class'\]"):
        datasets.load_split("coco2014", "val", data_dir=data_dir, root=tree.root, crowd="drop")
