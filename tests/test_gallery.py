"""Tests of the HTML galleries: the CAM gallery (order, links, compare rows) and the refinement-chain gallery on a
tiny workdir of synthetic files (columns follow the folders present, order by a brute-force IoU, picture colours),
and the pseudo_labels stage drawing it."""

import importlib
import math
import os
import re

import ml_collections
import numpy as np
import pytest
from PIL import Image

from puzzle_jax import cam_files, labels, pipeline
from puzzle_jax.data import datasets
from puzzle_jax.stages import pseudo_labels
from puzzle_jax.viz import gallery

# VOC colours, written out (not taken from the code under test): background, class 1, class 2, void.
BLACK, MAROON, GREEN, VOID_CREAM = (0, 0, 0), (128, 0, 0), (0, 128, 0), (224, 224, 192)


def _entry(image_id, foreground_columns, **extra):
    """A 4x4 image whose GT is class 1 in the left two columns; the CAM is hot on `foreground_columns`."""
    ground_truth = np.zeros((4, 4), np.uint8)
    ground_truth[:, :2] = 1
    cams = np.zeros((1, 4, 4), np.float32)
    cams[0, :, :foreground_columns] = 1.0
    rng = np.random.default_rng(0)
    entry = {
        "id": image_id,
        "image": rng.integers(0, 256, (4, 4, 3), dtype=np.uint8),
        "ground_truth": ground_truth,
        "cams": cams,
        "keys": np.array([0, 1]),
        "threshold": 0.5,
    }
    entry.update(extra)
    return entry


def _img_sources(page):
    return re.findall(r'<img src="([^"]+)"', page)


def test_gallery_orders_worst_first_and_links_exist(tmp_path):
    # IoUs: perfect 100%; 3 predicted columns: (8/12 + 4/8) / 2 = 58.3%; empty: (8/16 + 0) / 2 = 25%.
    entries = [_entry("a_perfect", 2), _entry("m_wide", 3), _entry("z_empty", 0)]
    index = gallery.write_gallery(str(tmp_path), entries, class_names=["cat", "dog"], title="Test gallery")
    assert index == os.path.join(str(tmp_path), "index.html")
    page = open(index, encoding="utf-8").read()
    assert "Test gallery" in page
    assert page.index("z_empty") < page.index("m_wide") < page.index("a_perfect")
    for expected in ("25.0%", "58.3%", "100.0%", "cat"):
        assert expected in page
    sources = _img_sources(page)
    # Per image: image, GT, prediction and one CAM overlay.
    assert len(sources) == 3 * 4
    for source in sources:
        assert not os.path.isabs(source) and ".." not in source
        assert os.path.isfile(os.path.join(str(tmp_path), source)), source
    assert "compare" not in page
    assert not [name for name in os.listdir(tmp_path / "images") if name.startswith(".")]


def test_gallery_compare_columns(tmp_path):
    compare_cams = np.zeros((1, 4, 4), np.float32)  # the plain run misses the object: 25%
    entries = [
        _entry("img_a", 2, compare_cams=compare_cams, compare_keys=np.array([0, 1])),
        _entry("img_b", 0, compare_cams=compare_cams, compare_keys=np.array([0, 1])),
    ]
    index = gallery.write_gallery(
        str(tmp_path), entries, class_names=["cat", "dog"], title="Puzzle vs plain", compare_name="plain"
    )
    page = open(index, encoding="utf-8").read()
    assert page.index("img_b") < page.index("img_a")
    assert "plain IoU 25.0%" in page and "(+75.0)" in page
    sources = _img_sources(page)
    assert len(sources) == 2 * 6
    assert sum("compare_" in source for source in sources) == 2 * 2
    for source in sources:
        assert os.path.isfile(os.path.join(str(tmp_path), source)), source
    assert os.path.isfile(tmp_path / "images" / "img_a_compare_cam1.png")


def test_gallery_rejects_duplicate_ids(tmp_path):
    with pytest.raises(ValueError, match="same file name"):
        gallery.write_gallery(str(tmp_path), [_entry("x", 2), _entry("x", 2)], class_names=["cat"], title="t")


# --------------------------------------------------------------------------------------------------
# The refinement-chain gallery.
# --------------------------------------------------------------------------------------------------

CLASS_NAMES = ["cat", "dog"]
HEIGHT, WIDTH = 6, 8
CAM_THRESHOLD, RW_THRESHOLD = 0.3, 0.4
# Column suffixes of the chain gallery's pictures, in chain order.
STEP_SUFFIXES = ("cam_labels", "affinity_labels", "rw_labels", "pseudo_labels")
STEP_NAMES = dict(zip(STEP_SUFFIXES, ("CAM labels", "affinity labels", "random-walk labels", "pseudo labels")))


def _brute_force_iou(prediction, ground_truth, num_classes=3):
    """Mean IoU in percent over the classes in GT or prediction, GT 255 not scored, predicted 255 wrong."""
    scored = ground_truth != 255
    ious = []
    for value in range(num_classes):
        true_positive = np.sum(scored & (prediction == value) & (ground_truth == value))
        false_positive = np.sum(scored & (prediction == value) & (ground_truth != value))
        false_negative = np.sum(scored & (prediction != value) & (ground_truth == value))
        union = true_positive + false_positive + false_negative
        if union:
            ious.append(true_positive / union)
    return 100.0 * float(np.mean(ious)) if ious else math.nan


def _threshold_labels(maps, keys, threshold):
    """Background at `threshold`, else the best map's class (strictly above; the maps are random, so no ties)."""
    foreground = np.asarray(keys)[1:]
    if not len(foreground):
        return np.zeros(maps.shape[1:], np.int64)
    return np.where(maps.max(axis=0) > threshold, foreground[maps.argmax(axis=0)], 0)


def _records(count=5):
    """Images whose GT has a cat (left) and, from the second image on, a dog (right), with a void border row."""
    rng = np.random.default_rng(0)
    records = []
    for index in range(count):
        mask = np.zeros((HEIGHT, WIDTH), np.uint8)
        mask[1:5, 1:4] = 1
        if index:
            mask[2:6, 5:8] = 2
        mask[0] = 255
        image = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
        records.append({"id": f"img_{index}", "image": image, "mask": mask})
    return records


def _noisy(ground_truth, rng, wrong_share, values):
    """The GT with a share of its pixels replaced by random values (GT void becomes background)."""
    result = np.where(ground_truth == 255, 0, ground_truth).astype(np.uint8)
    wrong = rng.random(result.shape) < wrong_share
    return np.where(wrong, rng.choice(values, result.shape), result).astype(np.uint8)


def _write_chain(workdir, records, steps=STEP_SUFFIXES):
    """Writes the given steps' files for every record; returns id -> {suffix: expected label map}."""
    rng = np.random.default_rng(1)
    expected = {}
    for index, record in enumerate(records):
        image_id, mask = record["id"], record["mask"]
        keys = np.array([0, 1, 2]) if index else np.array([0, 1])
        shape = (len(keys) - 1, HEIGHT, WIDTH)
        want = {}
        if "cam_labels" in steps:
            hr_cam = rng.random(shape)
            cam_files.write_cam_file(cam_files.path_of(workdir.cam_dir(), image_id), keys=keys, hr_cam=hr_cam)
            want["cam_labels"] = _threshold_labels(hr_cam.astype(np.float32), keys, CAM_THRESHOLD)
        if "affinity_labels" in steps:
            want["affinity_labels"] = _noisy(mask, rng, 0.4, [0, 1, 255])
        if "rw_labels" in steps:
            rw = rng.random(shape)
            cam_files.write_cam_file(cam_files.path_of(workdir.random_walk_dir(), image_id), keys=keys, rw=rw)
            want["rw_labels"] = _threshold_labels(rw.astype(np.float32), keys, RW_THRESHOLD)
        if "pseudo_labels" in steps:
            # A different share of wrong pixels per image, so the images' IoUs differ.
            want["pseudo_labels"] = _noisy(mask, rng, 0.1 + 0.15 * ((index * 3) % 5), [0, 1, 2])
        for suffix, directory in (
            ("affinity_labels", workdir.affinity_label_dir()),
            ("pseudo_labels", workdir.pseudo_label_dir()),
        ):
            if suffix in want:
                labels.write_label_png(os.path.join(directory, f"{image_id}.png"), want[suffix])
        expected[image_id] = want
    return expected


def _chain_gallery(output_dir, workdir, records, count=5):
    return gallery.write_chain_gallery(
        str(output_dir),
        records,
        count=count,
        class_names=CLASS_NAMES,
        cam_dir=workdir.cam_dir(),
        cam_threshold=CAM_THRESHOLD,
        affinity_label_dir=workdir.affinity_label_dir(),
        random_walk_dir=workdir.random_walk_dir(),
        rw_threshold=RW_THRESHOLD,
        pseudo_label_dir=workdir.pseudo_label_dir(),
        title="Chain",
    )


def _sections(page):
    """The image id and the <img> sources of each image's section, in page order."""
    sections = []
    for section in page.split("<section>")[1:]:
        image_id = re.search(r"<h2>#\d+ ([^<\s]+)", section).group(1)
        sections.append((image_id, _img_sources(section), section))
    return sections


def _picture(output_dir, image_id, suffix):
    return np.asarray(Image.open(os.path.join(str(output_dir), "images", f"{image_id}_{suffix}.png")).convert("RGB"))


def test_chain_gallery_columns_order_iou_and_links(tmp_path):
    records = _records()
    workdir = pipeline.Workdir(str(tmp_path / "run"))
    expected = _write_chain(workdir, records)
    output_dir = tmp_path / "gallery"
    index = _chain_gallery(output_dir, workdir, records)
    assert index == os.path.join(str(output_dir), "index.html")
    page = open(index, encoding="utf-8").read()
    sections = _sections(page)
    masks = {record["id"]: record["mask"] for record in records}
    pseudo_iou = {
        image_id: _brute_force_iou(want["pseudo_labels"], masks[image_id]) for image_id, want in expected.items()
    }
    assert len(set(pseudo_iou.values())) == len(records)  # distinct, so the order is defined
    assert [image_id for image_id, _, _ in sections] == sorted(pseudo_iou, key=pseudo_iou.get)
    for image_id, sources, section in sections:
        # image, GT, then every step in chain order.
        assert sources == [f"images/{image_id}_{suffix}.png" for suffix in ("image", "gt", *STEP_SUFFIXES)]
        for source in sources:
            assert os.path.isfile(os.path.join(str(output_dir), source)), source
        for suffix in STEP_SUFFIXES:
            iou = _brute_force_iou(expected[image_id][suffix], masks[image_id])
            caption = re.search(rf'src="images/{image_id}_{suffix}.png" alt="([^"]*)"', section).group(1)
            assert f"IoU {iou:.1f}%" in caption, (suffix, caption)
        # The pseudo labels' IoU heads the section; the affinity labels tell their void share.
        assert f"pseudo labels IoU {pseudo_iou[image_id]:.1f}%" in section
        void = 100 * np.mean(expected[image_id]["affinity_labels"] == 255)
        assert f"{void:.0f}% void" in section
    assert "CAM labels (threshold 0.3)" in page and "random-walk labels (threshold 0.4)" in page
    mean = np.mean(list(pseudo_iou.values()))
    assert f"pseudo labels {mean:.1f}%" in page
    assert not [name for name in os.listdir(output_dir / "images") if name.startswith(".")]


def test_chain_gallery_pictures_show_the_labels_in_voc_colours(tmp_path):
    records = _records(2)
    workdir = pipeline.Workdir(str(tmp_path / "run"))
    expected = _write_chain(workdir, records)
    _chain_gallery(tmp_path / "gallery", workdir, records)
    colours = {0: BLACK, 1: MAROON, 2: GREEN, 255: VOID_CREAM}
    for record in records:
        image_id = record["id"]
        np.testing.assert_array_equal(_picture(tmp_path / "gallery", image_id, "image"), record["image"])
        maps = {"gt": record["mask"], **expected[image_id]}
        for suffix, label_map in maps.items():
            picture = _picture(tmp_path / "gallery", image_id, suffix)
            assert picture.shape == (HEIGHT, WIDTH, 3)
            for value, colour in colours.items():
                np.testing.assert_array_equal(
                    picture[label_map == value], np.full(((label_map == value).sum(), 3), colour)
                )
    # The data reach every colour: void in the GT and the affinity labels, both classes in the second image.
    assert (expected[records[0]["id"]]["affinity_labels"] == 255).any()
    assert (records[1]["mask"] == 2).any() and (expected[records[1]["id"]]["rw_labels"] == 2).any()


@pytest.mark.parametrize(
    "steps",
    [("cam_labels", "pseudo_labels"), ("cam_labels", "affinity_labels", "rw_labels"), ("affinity_labels",), ()],
)
def test_chain_gallery_columns_follow_the_folders_present(tmp_path, steps):
    records = _records(4)
    workdir = pipeline.Workdir(str(tmp_path / "run"))
    expected = _write_chain(workdir, records, steps)
    page = open(_chain_gallery(tmp_path / "gallery", workdir, records), encoding="utf-8").read()
    sections = _sections(page)
    masks = {record["id"]: record["mask"] for record in records}
    for image_id, sources, _ in sections:
        assert sources == [f"images/{image_id}_{suffix}.png" for suffix in ("image", "gt", *steps)]
    if steps:
        # Worst first by the last step present: what the chain delivers so far.
        last_iou = {image_id: _brute_force_iou(want[steps[-1]], masks[image_id]) for image_id, want in expected.items()}
        ids = [image_id for image_id, _, _ in sections]
        assert [last_iou[image_id] for image_id in ids] == sorted(last_iou.values())
    else:
        assert "no step of the refinement chain" in page
    for suffix, name in STEP_NAMES.items():
        assert (name in page) == (suffix in steps), name


def test_chain_gallery_spreads_over_the_split_and_notes_missing_files(tmp_path):
    records = _records(5)
    workdir = pipeline.Workdir(str(tmp_path / "run"))
    _write_chain(workdir, records)
    os.remove(os.path.join(workdir.pseudo_label_dir(), "img_2.png"))
    page = open(_chain_gallery(tmp_path / "gallery", workdir, records, count=3), encoding="utf-8").read()
    sections = _sections(page)
    # 3 of 5 images: the first, the middle and the last; the one without pseudo labels goes last.
    assert sorted(image_id for image_id, _, _ in sections) == ["img_0", "img_2", "img_4"]
    assert sections[-1][0] == "img_2"
    assert "pseudo labels: no file" in sections[-1][2] and sections[-1][1][-1].endswith("img_2_rw_labels.png")
    assert "no file" not in sections[0][2] + sections[1][2]
    # Issue 17: the header read as "the 3 worst images"; it says they are a sample of the split, sorted worst first.
    assert "A sample of 3 of the split&#x27;s 5 images, spread evenly over it in split order (not the split&#x27;s " \
        "worst images), sorted worst pseudo labels IoU first." in page
    page = open(_chain_gallery(tmp_path / "all", workdir, records, count=9), encoding="utf-8").read()
    assert "All 5 images of the split, sorted worst pseudo labels IoU first." in page


def test_chain_gallery_names_a_label_png_of_the_wrong_size(tmp_path):
    records = _records(2)
    workdir = pipeline.Workdir(str(tmp_path / "run"))
    _write_chain(workdir, records)
    bad = os.path.join(workdir.affinity_label_dir(), "img_1.png")
    labels.write_label_png(bad, np.zeros((HEIGHT + 1, WIDTH), np.uint8))
    with pytest.raises(ValueError, match=rf"img_1\.png: size \({HEIGHT + 1}, {WIDTH}\) differs"):
        _chain_gallery(tmp_path / "gallery", workdir, records)
    assert not os.path.exists(tmp_path / "gallery" / "index.html")


# --------------------------------------------------------------------------------------------------
# The pseudo_labels stage draws the chain gallery.
# --------------------------------------------------------------------------------------------------


def test_pseudo_labels_stage_writes_the_chain_gallery(tmp_path, capsys):
    config = importlib.import_module("configs.demo").get_config()
    config.data.data_dir = str(tmp_path / "tfds")
    config.data.builder_kwargs = ml_collections.ConfigDict(dict(num_pretrain=2, num_train=6, num_val=2))
    config.infer.split = "train"
    config.refine.pseudo_crf_iterations = 0
    config.refine.workers = 1
    config.eval.gallery_images = 4
    source, info = datasets.load_split_from_config(config.data, config.infer.split)
    records = list(source)
    workdir = pipeline.Workdir(str(tmp_path / "run"))
    for record in records:
        # Perfect maps of the image's GT classes: CAM files and random-walk files alike.
        classes = np.unique(record["mask"][(record["mask"] > 0) & (record["mask"] < 255)])
        maps = np.stack([record["mask"] == value for value in classes]).astype(np.float32)
        keys = np.concatenate([[0], classes])
        cam_files.write_cam_file(cam_files.path_of(workdir.cam_dir(), record["id"]), keys=keys, hr_cam=maps)
        cam_files.write_cam_file(cam_files.path_of(workdir.random_walk_dir(), record["id"]), keys=keys, rw=maps)
    os.makedirs(workdir.stage_dir("eval_cam"))
    with open(workdir.summary_path("eval_cam"), "w") as handle:
        handle.write('{"miou": 50.0, "best_threshold": 0.25, "per_threshold_miou": {}}')

    summary = pseudo_labels.run(config, workdir)
    index = os.path.join(workdir.gallery_dir("pseudo_labels"), "index.html")
    assert summary["gallery"] == index
    assert f"Refinement chain gallery (worst pseudo labels first): {index}" in capsys.readouterr().out
    sections = _sections(open(index, encoding="utf-8").read())
    assert len(sections) == 4
    for image_id, sources, section in sections:
        # No aff_labels folder in this workdir: no affinity column.
        suffixes = ("image", "gt", "cam_labels", "rw_labels", "pseudo_labels")
        assert sources == [f"images/{image_id}_{suffix}.png" for suffix in suffixes]
        assert all(os.path.isfile(os.path.join(workdir.gallery_dir("pseudo_labels"), source)) for source in sources)
        assert "CAM labels (threshold 0.25)" in section and "random-walk labels (threshold 0.35)" in section
    # The pictures are the pseudo labels the stage wrote, in VOC colours.
    image_id = sections[0][0]
    written = labels.read_label_png(os.path.join(workdir.pseudo_label_dir(), f"{image_id}.png"), info.num_classes)
    picture = _picture(workdir.gallery_dir("pseudo_labels"), image_id, "pseudo_labels")
    np.testing.assert_array_equal(picture, labels.voc_palette()[written])

    config.eval.gallery_images = 0
    assert pseudo_labels.run(config, workdir)["gallery"] is None
