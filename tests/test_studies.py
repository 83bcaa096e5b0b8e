"""Tests of the study code: the parts dataset generator (studies/parts_dataset.py)."""

import os

import cv2
import numpy as np
import pytest
from PIL import Image

from puzzle_jax.data import datasets
from studies import parts_dataset
from studies.parts_dataset import PART_BODY, PART_EMBLEM, PART_NONE, PART_VOID

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_SIZES = dict(num_pretrain=3, num_train=4, num_train_large=6, num_val=2)


def _folder_files(root) -> dict[str, bytes]:
    files = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            files[os.path.relpath(path, root)] = open(path, "rb").read()
    return files


# --------------------------------------------------------------------------------------------------
# The parts dataset.
# --------------------------------------------------------------------------------------------------


def test_examples_are_deterministic_and_independent():
    first = parts_dataset.generate_example(parts_dataset.example_rng(0, "train", 3))
    again = parts_dataset.generate_example(parts_dataset.example_rng(0, "train", 3))
    for field in ("image", "mask", "parts", "labels"):
        np.testing.assert_array_equal(getattr(first, field), getattr(again, field))
    other_index = parts_dataset.generate_example(parts_dataset.example_rng(0, "train", 4))
    other_split = parts_dataset.generate_example(parts_dataset.example_rng(0, "val", 3))
    other_seed = parts_dataset.generate_example(parts_dataset.example_rng(1, "train", 3))
    for other in (other_index, other_split, other_seed):
        assert other.image.shape != first.image.shape or not np.array_equal(other.image, first.image)
    # train_large continues train's stream: its example i is train's example i.
    large = parts_dataset.generate_example(parts_dataset.example_rng(0, "train_large", 3))
    np.testing.assert_array_equal(large.image, first.image)


def test_examples_have_the_designed_structure():
    """Over 40 examples: sides off multiples of 32, labels = classes in the mask, every object an emblem inside it,
    the part mask consistent with the class mask, emblems a small share of their objects, 1-3 classes."""
    emblem_shares, sides, class_counts = [], [], []
    for index in range(40):
        example = parts_dataset.generate_example(parts_dataset.example_rng(0, "pretrain", index))
        height, width = example.mask.shape
        assert example.image.shape == (height, width, 3) and example.image.dtype == np.uint8
        sides += [height, width]
        present = sorted(set(np.unique(example.mask).tolist()) - {0, 255})
        assert np.flatnonzero(example.labels).tolist() == [c - 1 for c in present]
        class_counts.append(len(present))
        objects = (example.mask >= 1) & (example.mask <= parts_dataset.NUM_CLASSES)
        # Parts: body or emblem exactly on object pixels, void exactly where the class mask is void.
        np.testing.assert_array_equal(np.isin(example.parts, (PART_BODY, PART_EMBLEM)), objects)
        np.testing.assert_array_equal(example.parts == PART_VOID, example.mask == 255)
        np.testing.assert_array_equal(example.parts == PART_NONE, example.mask == 0)
        assert set(np.unique(example.parts).tolist()) <= {PART_NONE, PART_BODY, PART_EMBLEM, PART_VOID}
        for class_value in present:
            # Every labelled class shows its emblem, the evidence the label rests on.
            assert (example.parts[example.mask == class_value] == PART_EMBLEM).any(), (index, class_value)
        emblem_shares.append((example.parts == PART_EMBLEM).sum() / objects.sum())
        assert (example.mask == 255).any()  # the void band along object boundaries
    assert all(side % 32 for side in sides)
    assert min(sides) >= parts_dataset.GENERATION.side[0] and max(sides) <= parts_dataset.GENERATION.side[1] + 1
    assert 0.02 < np.mean(emblem_shares) < 0.2 and max(emblem_shares) < 0.5
    assert set(class_counts) <= {1, 2, 3} and len(set(class_counts)) > 1


def test_class_design_groups_bodies_and_makes_emblems_unique():
    classes = parts_dataset.CLASSES
    assert len(classes) == 12 and len({c.name for c in classes}) == 12
    # The emblem alone identifies a class; the three classes of a group differ in glyph and in colour.
    assert len({(c.glyph, c.emblem_colour) for c in classes}) == 12
    for group in range(len(parts_dataset.GROUPS)):
        members = [c for c in classes if c.group == group]
        assert len(members) == 3
        assert len({c.glyph for c in members}) == 3 and len({c.emblem_colour for c in members}) == 3
        hues = sorted(c.tint_hue for c in members)
        np.testing.assert_allclose(np.diff(hues), [1 / 3, 1 / 3])


def test_folder_is_deterministic_and_prepared_by_voc_folder(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    description = parts_dataset.write_folder(str(first), seed=0, **TINY_SIZES)
    parts_dataset.write_folder(str(second), seed=0, **TINY_SIZES)
    files = _folder_files(first)
    assert files == _folder_files(second)
    assert description["sizes"] == {"pretrain": 3, "train": 4, "val": 2, "train_large": 6}
    lists = {
        split: (first / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()
        for split in ("pretrain", "train", "train_large", "val")
    }
    assert lists["train_large"][:4] == lists["train"]
    assert len(set(lists["pretrain"]) | set(lists["train_large"]) | set(lists["val"])) == 3 + 6 + 2
    parts_png = np.asarray(Image.open(first / "SegmentationParts" / f"{lists['val'][0]}.png"))
    assert parts_png.dtype == np.uint8 and parts_png.ndim == 2

    data_dir = str(tmp_path / "tfds")
    for split, ids in lists.items():
        source, info = datasets.load_split("voc_folder", split, data_dir=data_dir, root=str(first))
        assert info.class_names == tuple(c.name for c in parts_dataset.CLASSES)
        assert info.split_sizes == {name: len(value) for name, value in lists.items()}
        assert [record["id"] for record in source] == ids
    record = source[0]  # val's first example, as generated
    example = parts_dataset.generate_example(parts_dataset.example_rng(0, "val", 0))
    np.testing.assert_array_equal(record["image"], example.image)
    np.testing.assert_array_equal(record["mask"], example.mask)
    np.testing.assert_array_equal(record["labels"], example.labels)

    # The folder is reused as it is, and never mixed with another seed or size.
    assert parts_dataset.write_folder(str(first), seed=0, **TINY_SIZES) == description
    with pytest.raises(ValueError, match="another parts dataset"):
        parts_dataset.write_folder(str(first), seed=1, **TINY_SIZES)
    with pytest.raises(ValueError, match="train_large"):
        parts_dataset.write_folder(str(tmp_path / "c"), **dict(TINY_SIZES, num_train_large=2))


def test_preview_sheet(tmp_path):
    path = tmp_path / "sheet.png"
    parts_dataset.main(["--preview", str(path), "--preview-count", "3"])
    sheet = cv2.imread(str(path))
    assert sheet.shape[0] >= 2 * 192 and sheet.shape[1] >= 2 * 3 * 192
    assert sheet.std() > 10
