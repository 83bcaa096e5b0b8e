"""Tests for the voc_folder builder (puzzle_jax/data/voc_folder.py) on small fake user folders."""

import json
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from test_voc import write_image, write_list, write_palette_mask, write_xml

from puzzle_jax.data import datasets, demo, input_pipeline, manual_builder, voc, voc_folder
from puzzle_jax.labels import BadExampleError

CLASSES = ("apple", "traffic light", "cat")


class FakeFolder:
    """A user folder: classes.txt, labels.csv, masks for val only, a test split without labels."""

    def __init__(self, root, *, label_file=True, classes=CLASSES):
        self.root = str(root)
        os.makedirs(self.root, exist_ok=True)
        self.images, self.masks, self.labels = {}, {}, {}
        with open(os.path.join(self.root, "classes.txt"), "w") as file:
            file.write("# my classes\n" + "\n".join(classes) + "\n\n")
        self.splits = {"train": ["img_a", "img_b", "img_c"], "val": ["v1", "v2"], "test": ["t1"]}
        rows = ["image_id,labels"]
        rng = np.random.default_rng(0)
        for number, example_id in enumerate(sum(self.splits.values(), [])):
            height, width = 18 + number, 25 - number
            extension = "png" if number % 2 else "jpg"  # Mixed formats, as users have.
            self.images[example_id] = (
                write_image(os.path.join(self.root, "JPEGImages", f"{example_id}.{extension}"),
                            height, width, seed=number),
                extension,
            )
            if example_id in self.splits["test"]:
                continue
            present = sorted(rng.choice(len(classes), size=1 + number % 2, replace=False).tolist())
            self.labels[example_id] = present
            # One cell per name, or several names in one cell separated by ";".
            names = [classes[i] for i in present]
            rows.append(",".join([example_id] + names) if number % 2 else
                        f"{example_id},{';'.join(names)}")
            if example_id in self.splits["val"]:
                mask = np.zeros((height, width), np.uint8)
                mask[2:9, 3:12] = present[0] + 1
                mask[9, :] = 255
                self.masks[example_id] = mask
                mask_path = os.path.join(self.root, "SegmentationClass", f"{example_id}.png")
                write_palette_mask(mask_path, mask)
        if label_file:
            with open(os.path.join(self.root, "labels.csv"), "w") as file:
                file.write("\n".join(rows) + "\n")
        for split, ids in self.splits.items():
            write_list(os.path.join(self.root, "ImageSets", "Segmentation", f"{split}.txt"), ids)

    def expected_labels(self, example_id, num_classes=None):
        num_classes = len(CLASSES) if num_classes is None else num_classes
        labels = np.zeros(num_classes, np.float32)
        labels[self.labels.get(example_id, [])] = 1.0
        return labels


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return FakeFolder(tmp_path_factory.mktemp("my_data"))


@pytest.fixture(scope="module")
def folder_splits(folder, tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("folder_tfds"))
    return {split: datasets.load_split("voc_folder", split, data_dir=data_dir, root=folder.root)
            for split in ("train", "val", "test")}


def test_splits_classes_labels_images_and_masks(folder, folder_splits):
    for split, (source, info) in folder_splits.items():
        assert info.class_names == CLASSES and info.num_classes == 3
        assert info.split_sizes == {name: len(ids) for name, ids in folder.splits.items()}
        assert [record["id"] for record in source] == folder.splits[split]
        report = info.tfds_info.metadata["splits"][split]
        assert report["label_source"] == "csv"
        assert report["ids_without_mask"] == (0 if split == "val" else len(folder.splits[split]))
        for record in source:
            written, extension = folder.images[record["id"]]
            if extension == "png":
                np.testing.assert_array_equal(record["image"], written)
            else:
                assert np.abs(record["image"].astype(int) - written.astype(int)).mean() < 4
            np.testing.assert_array_equal(record["labels"], folder.expected_labels(record["id"]))
            if record["id"] in folder.masks:
                np.testing.assert_array_equal(record["mask"], folder.masks[record["id"]])
            else:  # No mask: nothing to score.
                assert record["mask"].shape == written.shape[:2] and np.all(record["mask"] == 255)


def test_records_go_through_the_training_and_eval_pipelines(folder_splits):
    source, _ = folder_splits["train"]
    transform = input_pipeline.ClassifierAugmentation(crop_size=16, rescale_range=(16, 32))
    batches = list(input_pipeline.create_train_loader(
        source, transform=transform, global_batch_size=2, seed=1, num_epochs=1))
    assert len(batches) == 1 and batches[0]["image"].shape == (2, 16, 16, 3)
    assert batches[0]["labels"].shape == (2, 3)
    evaluated = list(input_pipeline.iterate_eval(folder_splits["val"][0], process_index=1,
                                                 process_count=2))
    assert [item["id"] for item in evaluated] == ["v2"]


def test_auto_label_source_prefers_csv_then_xml_then_masks(tmp_path):
    tree = FakeFolder(tmp_path / "root", label_file=False)
    data_dir = str(tmp_path / "tfds")
    # Only masks: labels are the classes in each mask (PSA/IRN's rule); ids without a mask are bad.
    with pytest.raises(BadExampleError,
                       match=r"img_a\.png: mask file is missing \(label_source"):
        datasets.load_split("voc_folder", "val", data_dir=data_dir, root=tree.root)
    source, info = datasets.load_split("voc_folder", "val", data_dir=data_dir, root=tree.root,
                                       splits="val")
    assert info.tfds_info.metadata["splits"]["val"]["label_source"] == "mask"
    for record in source:
        expected = np.zeros(3, np.float32)
        expected[tree.labels[record["id"]][0]] = 1.0  # The mask holds the first class only.
        np.testing.assert_array_equal(record["labels"], expected)
    # With XML annotations (custom class names) those win over masks.
    for example_id, present in tree.labels.items():
        write_xml(os.path.join(tree.root, "Annotations", f"{example_id}.xml"),
                  [(CLASSES[i], False, (1, 1, 6, 6)) for i in present])
    source, info = datasets.load_split("voc_folder", "train", data_dir=data_dir, root=tree.root)
    assert info.tfds_info.metadata["splits"]["train"]["label_source"] == "xml"
    for record in source:
        np.testing.assert_array_equal(record["labels"], tree.expected_labels(record["id"]))
    # The test split has no XML: its labels are zeros.
    test_source, _ = datasets.load_split("voc_folder", "test", data_dir=data_dir, root=tree.root)
    assert not test_source[0]["labels"].any()


def test_default_classes_are_voc_and_bad_class_lists_are_errors(tmp_path):
    tree = FakeFolder(tmp_path / "root")
    os.remove(os.path.join(tree.root, "classes.txt"))
    assert voc_folder.read_class_names(tree.root) == voc.VOC_CLASS_NAMES
    # labels.csv names classes that VOC does not have: a clear error naming the file and line.
    with pytest.raises(BadExampleError, match=r"labels\.csv: line \d: unknown class name"):
        datasets.load_split("voc_folder", "train", data_dir=str(tmp_path / "tfds"), root=tree.root)
    (tmp_path / "root" / "classes.txt").write_text("_background_\ncat\n")
    with pytest.raises(ValueError,
                       match=r"classes\.txt line 1: '_background_' is not a foreground"):
        voc_folder.read_class_names(tree.root)
    (tmp_path / "root" / "classes.txt").write_text("cat\ndog\ncat\n")
    with pytest.raises(ValueError, match=r"classes\.txt line 3: class 'cat' is listed twice"):
        voc_folder.read_class_names(tree.root)


def test_bad_examples_error_or_are_skipped_and_counted(tmp_path):
    tree = FakeFolder(tmp_path / "root")
    data_dir = str(tmp_path / "tfds")
    rows = (tmp_path / "root" / "labels.csv").read_text().splitlines()
    (tmp_path / "root" / "labels.csv").write_text("\n".join(r for r in rows if not r.startswith(
        "img_b")) + "\n")
    os.remove(os.path.join(tree.root, "JPEGImages", f"img_c.{tree.images['img_c'][1]}"))
    with pytest.raises(BadExampleError, match=r"labels\.csv: has no row for id 'img_b'"):
        datasets.load_split("voc_folder", "train", data_dir=data_dir, root=tree.root)
    source, info = datasets.load_split("voc_folder", "train", data_dir=data_dir, root=tree.root,
                                       on_bad_example="skip")
    assert [record["id"] for record in source] == ["img_a"]
    report = info.tfds_info.metadata["splits"]["train"]
    assert report["skipped"] == 2
    assert [item["id"] for item in report["skipped_examples"]] == ["img_b", "img_c"]
    assert "JPEGImages" in report["skipped_examples"][1]["file"]
    # A mask whose size differs from its image names the mask file.
    write_palette_mask(os.path.join(tree.root, "SegmentationClass", "v1.png"),
                       np.zeros((4, 4), np.uint8))
    with pytest.raises(BadExampleError, match=r"v1\.png: mask is 4x4"):
        datasets.load_split("voc_folder", "val", data_dir=data_dir, root=tree.root, splits="val")
    # Two images for one id.
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(os.path.join(tree.root, "JPEGImages",
                                                                     "t1.bmp"))
    with pytest.raises(BadExampleError, match=r"id 't1' has several images"):
        datasets.load_split("voc_folder", "test", data_dir=data_dir, root=tree.root, splits="test")


def test_missing_layout_parts_are_clear_errors(tmp_path):
    tree = FakeFolder(tmp_path / "root")
    data_dir = str(tmp_path / "tfds")
    write_list(os.path.join(tree.root, "ImageSets", "Segmentation", "my-split.txt"), ["v1"])
    with pytest.raises(ValueError, match=r"split name 'my-split' may only contain"):
        datasets.load_split("voc_folder", "train", data_dir=data_dir, root=tree.root)
    os.remove(os.path.join(tree.root, "ImageSets", "Segmentation", "my-split.txt"))
    with pytest.raises(ValueError, match=r"label_source='xml' but .*Annotations does not exist"):
        datasets.load_split("voc_folder", "train", data_dir=data_dir, root=tree.root,
                            label_source="xml")
    with pytest.raises(ValueError, match=r"label_source='boxes'.*\['auto', 'csv', 'xml', 'mask'\]"):
        datasets.load_split("voc_folder", "train", data_dir=data_dir, root=tree.root,
                            label_source="boxes")
    shutil.rmtree(os.path.join(tree.root, "ImageSets"))
    with pytest.raises(FileNotFoundError, match=r"no split list in .*ImageSets/Segmentation"):
        datasets.load_split("voc_folder", "train", data_dir=data_dir, root=tree.root)


def write_parts(root, example_id, parts, palette=False):
    """A part map PNG in `SegmentationParts/`, grey or (with random colours) palette."""
    path = os.path.join(root, "SegmentationParts", f"{example_id}.png")
    if palette:
        write_palette_mask(path, parts, seed=7)
    else:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(parts.astype(np.uint8), mode="L").save(path)
    return path


def _name_before_part_maps(root, splits):
    """The config name the builder gave a folder before part maps existed (commit 065c738's fingerprint)."""
    root_path = manual_builder.resolve_root(root, "voc_folder", "")
    lists = voc_folder.find_split_lists(root_path)
    digest = manual_builder.fingerprint({
        "root": os.fspath(root_path),
        "splits": tuple(splits),
        "label_source": "csv",
        "on_bad_example": "error",
        "class_names": CLASSES,
        "lists": {name: manual_builder.file_digest(lists[name]) for name in splits},
        "labels_csv": manual_builder.file_digest(root_path / "labels.csv"),
    })
    return manual_builder.make_config_name(root_path, digest)


def test_without_segmentation_parts_records_have_no_part_map_and_keep_their_prepared_copy(folder, folder_splits):
    for source, info in folder_splits.values():
        assert "parts" not in info.tfds_info.features
        assert all("parts" not in record for record in source)
    builder = datasets.create_builder("voc_folder", data_dir="/unused", root=folder.root)
    assert not builder.builder_config.parts
    assert builder.builder_config.name == _name_before_part_maps(folder.root, sorted(folder.splits))


def test_segmentation_parts_are_read_validated_and_zero_where_missing(tmp_path):
    tree = FakeFolder(tmp_path / "root")
    data_dir = str(tmp_path / "tfds")
    without_parts = datasets.create_builder("voc_folder", data_dir=data_dir, root=tree.root).builder_config.name
    mask = tree.masks["v1"]
    parts = np.where(mask == 255, 255, np.where(mask > 0, 1, 0)).astype(np.uint8)
    parts[3:5, 4:6] = 2
    write_parts(tree.root, "v1", parts, palette=True)
    write_parts(tree.root, "img_a", np.zeros(tree.images["img_a"][0].shape[:2]))
    builder = datasets.create_builder("voc_folder", data_dir=data_dir, root=tree.root)
    # The folder's appearance changes the config name: a copy prepared without part maps is not read for it.
    assert builder.builder_config.parts and builder.builder_config.name != without_parts
    val, info = datasets.load_split("voc_folder", "val", data_dir=data_dir, root=tree.root)
    assert "parts" in info.tfds_info.features
    np.testing.assert_array_equal(val[0]["parts"], parts)
    assert val[1]["parts"].shape == tree.masks["v2"].shape and not val[1]["parts"].any()  # No file: all 0.
    assert info.tfds_info.metadata["splits"]["val"]["ids_without_parts"] == 1
    assert info.tfds_info.metadata["splits"]["train"]["ids_without_parts"] == 2
    # Opened for classifier training (no masks), records carry no part map either.
    unmasked, _ = datasets.load_split("voc_folder", "val", data_dir=data_dir, root=tree.root, decode_masks=False)
    assert set(unmasked[0]) == {"image", "id", "labels"}

    bad_value = parts.copy()
    bad_value[0, 0] = 3
    path = write_parts(tree.root, "v2", np.pad(bad_value, ((0, 1), (0, 0))))
    with pytest.raises(BadExampleError, match=r"v2\.png: part map has value\(s\) \[3\]"):
        datasets.load_split("voc_folder", "val", data_dir=str(tmp_path / "tfds2"), root=tree.root, splits="val")
    write_parts(tree.root, "v2", parts)  # v1's size, not v2's.
    with pytest.raises(BadExampleError, match=rf"{path}: part map is {parts.shape[0]}x{parts.shape[1]} \(HxW\) but"):
        datasets.load_split("voc_folder", "val", data_dir=str(tmp_path / "tfds3"), root=tree.root, splits="val")
    source, info = datasets.load_split(
        "voc_folder", "val", data_dir=str(tmp_path / "tfds4"), root=tree.root, splits="val", on_bad_example="skip"
    )
    assert [record["id"] for record in source] == ["v1"]
    assert info.tfds_info.metadata["splits"]["val"]["skipped_examples"][0]["file"] == path


def write_image_array(path, image):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(image).save(path)


@pytest.mark.slow
def test_train_infer_and_eval_cam_run_end_to_end_on_a_voc_folder(tmp_path):
    """The CAM stages on a small voc_folder of demo-rendered images, through the command line."""
    root = tmp_path / "folder"
    rng = np.random.default_rng(0)
    names = demo.class_names(3)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "classes.txt").write_text("\n".join(names) + "\n")
    ids = [f"image_{index:03d}" for index in range(24)]
    for example_id in ids:
        image, mask, _, _ = demo.generate_example(rng, num_classes=3, min_side=64, max_side=80)
        write_image_array(root / "JPEGImages" / f"{example_id}.png", image)
        write_palette_mask(str(root / "SegmentationClass" / f"{example_id}.png"), mask)
    write_list(str(root / "ImageSets" / "Segmentation" / "train.txt"), ids[:16])
    write_list(str(root / "ImageSets" / "Segmentation" / "val.txt"), ids[16:])
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    command = [
        sys.executable, "-m", "puzzle_jax.main", "--config=configs/demo.py",
        f"--workdir={tmp_path / 'run'}", f"--config.data.data_dir={tmp_path / 'tfds'}",
        "--config.data.dataset=voc_folder", f"--config.data.root={root}",
        "--config.stages=train_cam,infer_cam,eval_cam", "--config.train_cam.init_from=",
        "--config.train_cam.split=train", "--config.infer.split=val",
        "--config.train_cam.epochs=1", "--config.train_cam.batch_size=8", "--config.train_cam.crop_size=64",
        "--config.train_cam.rescale_range=(48, 80)", "--config.infer.flip=False",
    ]
    environment = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    result = subprocess.run(command, cwd=repo, env=environment, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    evaluation = json.loads((tmp_path / "run" / "eval_cam" / "summary.json").read_text())
    assert evaluation["num_images"] == 8 and 0.0 < evaluation["miou"] <= 100.0
    assert len(os.listdir(tmp_path / "run" / "infer_cam" / "cams")) == 8


def test_source_is_picklable_for_grain_workers(folder_splits):
    source, _ = folder_splits["val"]
    restored = pickle.loads(pickle.dumps(source))
    np.testing.assert_array_equal(restored[1]["image"], source[1]["image"])
    np.testing.assert_array_equal(restored[0]["mask"], source[0]["mask"])


def test_preparing_a_folder_says_preparing_from_the_folder_not_downloading(tmp_path, capfd):
    """Issue 17: tfds' 'Downloading and preparing dataset Unknown size' banner for a local folder."""
    tree = FakeFolder(tmp_path / "mine")
    datasets.load_split("voc_folder", "val", data_dir=str(tmp_path / "tfds"), root=tree.root)
    text = "".join(capfd.readouterr())
    assert "Preparing voc_folder (splits " in text and f"from the files in {tree.root} (nothing is downloaded)" in text
    assert "Downloading" not in text and "is ready in" in text
