"""Tests for the voc2012_aug builder (puzzle_jax/data/voc.py) and its base (data/manual_builder.py).

Every test builds a small fake tree of the real layout (VOCdevkit/VOC2012 + SBD's
benchmark_RELEASE, or SegmentationClassAug) in a temporary directory; expected values come from
what the test wrote (ids, object lists, mask arrays), never from the builder.

The helpers `write_image`, `write_palette_mask`, `write_xml`, `write_list` are also used by
test_voc_folder.py, test_readers.py and test_labels.py.
"""

import os
import shutil

import cv2
import numpy as np
import pytest
import scipy.io
from PIL import Image

from puzzle_jax.data import datasets, input_pipeline, voc
from puzzle_jax.labels import BadExampleError

# Spec §1: VOC class order, aeroplane..tvmonitor (label index i = mask value i + 1).
SPEC_VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)


# --------------------------------------------------------------------------------------------------
# Writers of the fake layout (shared with test_voc_folder.py).
# --------------------------------------------------------------------------------------------------


def write_image(path, height, width, seed, extension_format=None):
    """Writes a random smooth RGB image (JPEG or PNG by extension); returns it as written (RGB)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (4, 4, 3)).astype(np.float32)
    image = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_LINEAR).astype(np.uint8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(image).save(path, format=extension_format, quality=95)
    return image


def write_palette_mask(path, mask, seed=0):
    """Writes a mask as a palette PNG whose colours are random: only the indices carry classes."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    picture = Image.fromarray(mask.astype(np.uint8), mode="P")
    picture.putpalette(np.random.default_rng(seed).integers(0, 256, 768).astype(np.uint8).tolist())
    picture.save(path)


def write_xml(path, objects):
    """Writes a VOC XML annotation; objects are (name, difficult, (xmin, ymin, xmax, ymax))."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    parts = ["<annotation><filename>x.jpg</filename>"]
    for name, difficult, box in objects:
        parts.append(
            f"<object>\n  <name> {name} </name><pose>Left</pose><truncated>0</truncated>"
            f"<difficult>{int(difficult)}</difficult>"
        )
        if box is not None:
            xmin, ymin, xmax, ymax = box
            parts.append(
                f"<bndbox><xmin>{xmin}</xmin><ymin>{ymin}</ymin><xmax>{xmax}</xmax>"
                f"<ymax>{ymax}</ymax></bndbox>"
            )
        parts.append("</object>")
    parts.append("</annotation>")
    with open(path, "w") as file:
        file.write("\n".join(parts))


def write_list(path, ids, newline="\n"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as file:
        file.write(newline.join(ids) + newline)


def expected_labels(objects, class_names=SPEC_VOC_CLASSES):
    """The spec's rule: every object counts (difficult too) unless its box has zero size."""
    labels = np.zeros(len(class_names), np.float32)
    for name, _, box in objects:
        if box is not None and (box[2] - box[0] == 0 or box[3] - box[1] == 0):
            continue
        labels[class_names.index(name)] = 1.0
    return labels


def random_mask(height, width, seed, num_classes=20):
    rng = np.random.default_rng(seed)
    mask = np.zeros((height, width), np.uint8)
    top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
    mask[top : top + height // 2, left : left + width // 2] = rng.integers(1, num_classes + 1)
    mask[top, :] = 255  # A void line, as VOC's object borders.
    return mask


class FakeVoc:
    """A VOCdevkit + SBD tree: what was written, to compare the records with."""

    def __init__(self, root, *, voc_train, voc_val, sbd_train, sbd_val, test=(), sbd="mat"):
        self.root = str(root)
        self.voc_dir = os.path.join(self.root, "VOCdevkit", "VOC2012")
        self.voc_train, self.voc_val = list(voc_train), list(voc_val)
        self.sbd_train, self.sbd_val = list(sbd_train), list(sbd_val)
        self.images, self.objects, self.fine_masks, self.sbd_masks = {}, {}, {}, {}
        all_ids = sorted(set(voc_train) | set(voc_val) | set(sbd_train) | set(sbd_val) | set(test))
        names = SPEC_VOC_CLASSES
        for number, example_id in enumerate(all_ids):
            height, width = 20 + number % 3, 26 + number % 5
            self.images[example_id] = write_image(self.path("JPEGImages", example_id, "jpg"),
                                                  height, width, seed=number)
            if example_id in test:
                continue
            objects = [
                (names[number % 20], False, (1, 2, 9, 12)),
                (names[(number * 7 + 3) % 20], True, (3, 3, 8, 9)),  # difficult: still counts
                (names[(number * 3 + 11) % 20], False, (5, 5, 5, 9)),  # zero width: skipped
            ]
            self.objects[example_id] = objects
            write_xml(self.path("Annotations", example_id, "xml"), objects)
            if example_id in self.voc_train or example_id in self.voc_val:
                mask = random_mask(height, width, seed=100 + number)
                self.fine_masks[example_id] = mask
                write_palette_mask(self.path("SegmentationClass", example_id, "png"), mask, number)
            if example_id in self.sbd_train or example_id in self.sbd_val:
                # SBD masks have no void border; they differ from the fine masks on purpose.
                sbd_mask = np.minimum(random_mask(height, width, seed=200 + number), 20)
                self.sbd_masks[example_id] = sbd_mask
                if sbd == "mat":
                    cls_dir = os.path.join(self.root, "benchmark_RELEASE", "dataset", "cls")
                    os.makedirs(cls_dir, exist_ok=True)
                    scipy.io.savemat(
                        os.path.join(cls_dir, f"{example_id}.mat"),
                        {"GTcls": {"Segmentation": sbd_mask, "CategoriesPresent": np.array([1])}},
                    )
                else:
                    aug_path = os.path.join(self.voc_dir, "SegmentationClassAug",
                                            f"{example_id}.png")
                    os.makedirs(os.path.dirname(aug_path), exist_ok=True)
                    Image.fromarray(sbd_mask, mode="L").save(aug_path)
        lists = os.path.join(self.voc_dir, "ImageSets", "Segmentation")
        write_list(os.path.join(lists, "train.txt"), voc_train, newline="\r\n")  # As the authors'.
        write_list(os.path.join(lists, "val.txt"), voc_val)
        if test:
            write_list(os.path.join(lists, "test.txt"), test)
        if sbd == "mat":
            sbd_dir = os.path.join(self.root, "benchmark_RELEASE", "dataset")
            write_list(os.path.join(sbd_dir, "train.txt"), sbd_train)
            write_list(os.path.join(sbd_dir, "val.txt"), sbd_val)

    def path(self, folder, example_id, extension):
        return os.path.join(self.voc_dir, folder, f"{example_id}.{extension}")


def ids(prefix, numbers):
    return [f"{prefix}_{number:06d}" for number in numbers]


VOC_TRAIN = ids("2007", range(0, 4))
VOC_VAL = ids("2007", range(4, 7))
# SBD overlaps VOC train (ids 2, 3) and VOC val (ids 5, 6): the recipe removes VOC val.
SBD_TRAIN = ids("2007", [2, 5]) + ids("2008", range(0, 3))
SBD_VAL = ids("2007", [3, 6]) + ids("2008", range(3, 5))
TEST_IDS = ids("2009", range(0, 3))


@pytest.fixture(scope="module")
def fake_voc(tmp_path_factory):
    return FakeVoc(tmp_path_factory.mktemp("voc_root"), voc_train=VOC_TRAIN, voc_val=VOC_VAL,
                   sbd_train=SBD_TRAIN, sbd_val=SBD_VAL, test=TEST_IDS)


@pytest.fixture(scope="module")
def voc_splits(fake_voc, tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("voc_tfds"))
    return {
        split: datasets.load_split("voc2012_aug", split, data_dir=data_dir, root=fake_voc.root)
        for split in ("train_aug", "train", "val", "test")
    }


# --------------------------------------------------------------------------------------------------
# The builder on a well-formed tree.
# --------------------------------------------------------------------------------------------------


def test_class_order_is_the_spec_order():
    assert voc.VOC_CLASS_NAMES == SPEC_VOC_CLASSES


def test_split_ids_and_counts_follow_voc_lists_and_the_train_aug_recipe(voc_splits):
    # The standard recipe, written out: (SBD train + SBD val + VOC train) - VOC val.
    expected_train_aug = sorted((set(SBD_TRAIN) | set(SBD_VAL) | set(VOC_TRAIN)) - set(VOC_VAL))
    assert len(expected_train_aug) == 9  # 4 VOC train + 5 SBD-only ids; SBD's 2 val ids removed.
    expected = {"train_aug": expected_train_aug, "train": VOC_TRAIN, "val": VOC_VAL,
                "test": TEST_IDS}
    for split, (source, info) in voc_splits.items():
        assert [record["id"] for record in source] == expected[split], split
        assert info.num_examples == len(expected[split])
        assert info.split_sizes == {name: len(value) for name, value in expected.items()}
        assert info.class_names == SPEC_VOC_CLASSES and info.num_classes == 20
    report = voc_splits["train_aug"][1].tfds_info.metadata["splits"]["train_aug"]
    assert report["sbd_ids"] == len(set(SBD_TRAIN) | set(SBD_VAL))
    assert (report["voc_train_ids"], report["voc_val_ids"]) == (len(VOC_TRAIN), len(VOC_VAL))
    assert report["examples"] == 9 and report["skipped"] == 0


def test_records_hold_the_written_images_xml_labels_and_masks(fake_voc, voc_splits):
    for split in ("train_aug", "train", "val"):
        source, _ = voc_splits[split]
        for record in source:
            example_id = record["id"]
            written = fake_voc.images[example_id]
            assert record["image"].dtype == np.uint8 and record["image"].shape == written.shape
            # JPEG is lossy: compare with PIL's decoding of the written file.
            with Image.open(fake_voc.path("JPEGImages", example_id, "jpg")) as picture:
                decoded = np.asarray(picture.convert("RGB")).astype(int)
            assert np.abs(record["image"].astype(int) - decoded).max() <= 2
            np.testing.assert_array_equal(
                record["labels"], expected_labels(fake_voc.objects[example_id])
            )
            assert record["labels"].dtype == np.float32 and record["mask"].dtype == np.uint8
            # VOC's fine mask wherever it exists (train, val), SBD's mask for the other ids.
            expected_mask = fake_voc.fine_masks.get(example_id, fake_voc.sbd_masks.get(example_id))
            np.testing.assert_array_equal(record["mask"], expected_mask)


def test_train_aug_uses_the_fine_mask_for_voc_train_ids_that_sbd_also_has(fake_voc, voc_splits):
    source, _ = voc_splits["train_aug"]
    by_id = {record["id"]: record for record in source}
    for example_id in set(VOC_TRAIN) & (set(SBD_TRAIN) | set(SBD_VAL)):
        assert not np.array_equal(fake_voc.fine_masks[example_id], fake_voc.sbd_masks[example_id])
        np.testing.assert_array_equal(by_id[example_id]["mask"], fake_voc.fine_masks[example_id])


def test_test_split_has_images_only_zero_labels_and_ignored_masks(fake_voc, voc_splits):
    source, _ = voc_splits["test"]
    for record in source:
        assert record["image"].shape == fake_voc.images[record["id"]].shape
        assert not record["labels"].any()
        assert record["mask"].shape == record["image"].shape[:2]
        assert np.all(record["mask"] == 255)


def test_records_go_through_the_training_and_eval_pipelines(voc_splits):
    source, info = voc_splits["train_aug"]
    transform = input_pipeline.ClassifierAugmentation(crop_size=32, rescale_range=(24, 40))
    loader = input_pipeline.create_train_loader(
        source, transform=transform, global_batch_size=3, seed=0, num_epochs=1
    )
    batches = list(loader)
    assert len(batches) == 3
    for batch in batches:
        assert batch["image"].shape == (3, 32, 32, 3) and batch["image"].dtype == np.uint8
        assert batch["image_box"].shape == (3, 4)
        assert batch["labels"].shape == (3, info.num_classes)
    evaluated = list(input_pipeline.iterate_eval(voc_splits["val"][0]))
    assert [item["id"] for item in evaluated] == VOC_VAL


def test_segmentation_class_aug_pngs_stand_in_for_sbd(tmp_path):
    tree = FakeVoc(tmp_path / "root", voc_train=VOC_TRAIN, voc_val=VOC_VAL, sbd_train=SBD_TRAIN,
                   sbd_val=SBD_VAL, sbd="png")
    source, info = datasets.load_split("voc2012_aug", "train_aug", data_dir=str(tmp_path / "tfds"),
                                       root=os.path.join(tree.root, "VOCdevkit"))
    # No SBD lists: the PNG file names are SBD's ids.
    expected = sorted((set(SBD_TRAIN) | set(SBD_VAL) | set(VOC_TRAIN)) - set(VOC_VAL))
    assert [record["id"] for record in source] == expected
    assert "test" not in info.split_sizes  # No test.txt: no test split.
    for record in source:
        expected_mask = tree.fine_masks.get(record["id"], tree.sbd_masks.get(record["id"]))
        np.testing.assert_array_equal(record["mask"], expected_mask)
    report = info.tfds_info.metadata["splits"]["train_aug"]
    assert report["sbd_source"] == "png"


# --------------------------------------------------------------------------------------------------
# Bad input in the builder: errors naming the file, or counted skips.
# --------------------------------------------------------------------------------------------------


def small_tree(root):
    return FakeVoc(root, voc_train=ids("2007", range(3)), voc_val=ids("2007", range(3, 5)),
                   sbd_train=ids("2008", range(2)), sbd_val=[])


def break_tree(tree, problem):
    """Damages one example of VOC train; returns (id, the file a message must name, message)."""
    example_id = tree.voc_train[1]
    image_path = tree.path("JPEGImages", example_id, "jpg")
    if problem == "missing image":
        os.remove(image_path)
        return example_id, image_path, "image file is missing"
    if problem == "corrupt image":
        with open(image_path, "r+b") as file:
            file.truncate(os.path.getsize(image_path) // 2)
        return example_id, image_path, "image is corrupt"
    if problem == "mask size":
        mask_path = tree.path("SegmentationClass", example_id, "png")
        write_palette_mask(mask_path, np.zeros((5, 7), np.uint8))
        return example_id, mask_path, "mask is 5x7 .* but its image .* is"
    if problem == "unknown class":
        xml_path = tree.path("Annotations", example_id, "xml")
        write_xml(xml_path, [("unicorn", False, (1, 1, 5, 5))])
        return example_id, xml_path, "unknown class name 'unicorn'"
    raise ValueError(problem)


@pytest.mark.parametrize(
    "problem", ["missing image", "corrupt image", "mask size", "unknown class"]
)
def test_bad_example_stops_preparation_naming_the_file_or_is_skipped_and_counted(tmp_path, problem):
    tree = small_tree(tmp_path / "root")
    bad_id, bad_file, message = break_tree(tree, problem)
    with pytest.raises(BadExampleError, match=message) as caught:
        datasets.load_split("voc2012_aug", "train", data_dir=str(tmp_path / "tfds"), root=tree.root,
                            splits="train")
    assert bad_file in str(caught.value) and repr(bad_id) in str(caught.value)
    assert "on_bad_example='skip'" in str(caught.value)

    source, info = datasets.load_split("voc2012_aug", "train", data_dir=str(tmp_path / "tfds"),
                                       root=tree.root, splits="train", on_bad_example="skip")
    assert [record["id"] for record in source] == [i for i in tree.voc_train if i != bad_id]
    report = info.tfds_info.metadata["splits"]["train"]
    assert (report["listed"], report["examples"], report["skipped"]) == (3, 2, 1)
    assert report["skipped_examples"][0]["id"] == bad_id
    assert report["skipped_examples"][0]["file"] == bad_file


def test_empty_split_list_and_fully_skipped_split_are_errors(tmp_path):
    tree = small_tree(tmp_path / "root")
    val_list = os.path.join(tree.voc_dir, "ImageSets", "Segmentation", "val.txt")
    with open(val_list, "w") as file:
        file.write("\n")
    with pytest.raises(ValueError, match=r"val\.txt is empty"):
        datasets.load_split("voc2012_aug", "val", data_dir=str(tmp_path / "tfds"), root=tree.root,
                            splits="val")
    write_list(val_list, ["2007_000099"])  # An id without any file.
    with pytest.raises(ValueError, match=r"split 'val' is empty: all 1 ids listed in .*val\.txt"):
        datasets.load_split("voc2012_aug", "val", data_dir=str(tmp_path / "tfds"), root=tree.root,
                            splits="val", on_bad_example="skip")


def test_missing_sbd_root_and_bad_options_are_clear_errors(tmp_path):
    tree = small_tree(tmp_path / "root")
    data_dir = str(tmp_path / "tfds")
    shutil.rmtree(os.path.join(tree.root, "benchmark_RELEASE"))
    with pytest.raises(FileNotFoundError, match=r"'train_aug' needs SBD.*splits='train,val'"):
        datasets.load_split("voc2012_aug", "train_aug", data_dir=data_dir, root=tree.root)
    source, info = datasets.load_split("voc2012_aug", "val", data_dir=data_dir, root=tree.root,
                                       splits="train,val")
    assert sorted(info.split_sizes) == ["train", "val"] and len(source) == 2
    with pytest.raises(ValueError, match=r"--config\.data\.root=DIR"):
        datasets.load_split("voc2012_aug", "train", data_dir=data_dir)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        datasets.load_split("voc2012_aug", "train", data_dir=data_dir, root=str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no JPEGImages/ folder"):
        datasets.load_split("voc2012_aug", "train", data_dir=data_dir, root=str(tmp_path))
    with pytest.raises(ValueError, match=r"on_bad_example='ignore'.*\['error', 'skip'\]"):
        datasets.load_split("voc2012_aug", "train", data_dir=data_dir, root=tree.root,
                            on_bad_example="ignore")
    with pytest.raises(ValueError, match=r"unknown split\(s\) \['trainaug'\]"):
        datasets.load_split("voc2012_aug", "train", data_dir=data_dir, root=tree.root,
                            splits="trainaug")


def test_edited_split_list_prepares_a_new_copy(tmp_path):
    tree = small_tree(tmp_path / "root")
    data_dir = str(tmp_path / "tfds")
    first, _ = datasets.load_split("voc2012_aug", "train", data_dir=data_dir, root=tree.root,
                                   splits="train")
    write_list(os.path.join(tree.voc_dir, "ImageSets", "Segmentation", "train.txt"),
               tree.voc_train[:2])
    second, _ = datasets.load_split("voc2012_aug", "train", data_dir=data_dir, root=tree.root,
                                    splits="train")
    assert len(first) == 3 and [record["id"] for record in second] == tree.voc_train[:2]
    assert len(os.listdir(os.path.join(data_dir, "voc2012_aug"))) == 2
