"""Tests for the readers of example files (puzzle_jax/data/readers.py): split lists, images, VOC XML labels.

Files are written by the helpers of test_readers.py; expected values come from what the test wrote.
"""

import cv2
import numpy as np
import pytest
from PIL import Image
from test_voc import SPEC_VOC_CLASSES, expected_labels, write_image, write_list, write_xml

from puzzle_jax.data import readers
from puzzle_jax.labels import BadExampleError


def test_xml_labels_count_difficult_objects_and_skip_zero_size_boxes(tmp_path):
    path = str(tmp_path / "a.xml")
    objects = [
        ("dog", True, (10, 10, 40, 30)),
        ("person", False, (5, 7, 5, 20)),    # zero width
        ("cat", False, (5, 7, 30, 7)),       # zero height
        ("sofa", False, None),               # no box: the name still counts
        ("dog", False, (1, 1, 2, 2)),
    ]
    write_xml(path, objects)
    labels = readers.parse_xml_labels(path, SPEC_VOC_CLASSES)
    assert [SPEC_VOC_CLASSES[i] for i in np.flatnonzero(labels)] == ["dog", "sofa"]
    np.testing.assert_array_equal(labels, expected_labels(objects))


@pytest.mark.parametrize(
    "content, message",
    [
        ("<annotation><object><name>zebra</name></object></annotation>",
         r"unknown class name 'zebra'; allowed: \['aeroplane'"),
        ("<annotation><object><name>dog</name><bndbox><xmin>9</xmin><ymin>1</ymin><xmax>3</xmax>"
         "<ymax>5</ymax></bndbox></object></annotation>", "negative size"),
        ("<annotation><object><name>dog</name>", "not valid XML"),
        ("<annotation><object><pose>x</pose></object></annotation>", "has no <name>"),
    ],
)
def test_bad_xml_is_a_clear_error_naming_the_file(tmp_path, content, message):
    path = tmp_path / "bad.xml"
    path.write_text(content)
    with pytest.raises(BadExampleError, match=message) as caught:
        readers.parse_xml_labels(path, SPEC_VOC_CLASSES)
    assert str(path) in str(caught.value)


def test_images_keep_their_bytes_and_odd_ones_are_converted(tmp_path):
    written = write_image(str(tmp_path / "a.jpg"), 10, 14, seed=1)
    data, height, width = readers.read_image(tmp_path / "a.jpg")
    assert data == (tmp_path / "a.jpg").read_bytes() and (height, width) == written.shape[:2]
    rgba = np.dstack([written, np.full(written.shape[:2], 9, np.uint8)])
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    data, height, width = readers.read_image(tmp_path / "rgba.png")
    decoded = cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED),
                           cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(decoded, written)  # Alpha dropped, colours exact.
    truncated = (tmp_path / "a.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(truncated[: len(truncated) // 2])
    with pytest.raises(BadExampleError, match=r"cut\.jpg: image is corrupt"):
        readers.read_image(tmp_path / "cut.jpg")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(BadExampleError, match=r"empty\.jpg: image file is empty"):
        readers.read_image(tmp_path / "empty.jpg")


def test_split_lists_tolerate_crlf_and_reject_empty_or_duplicate(tmp_path):
    write_list(str(tmp_path / "a.txt"), ["x1", "x2"], newline="\r\n")
    assert readers.read_id_list(tmp_path / "a.txt") == ["x1", "x2"]
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match=r"empty\.txt is empty"):
        readers.read_id_list(tmp_path / "empty.txt")
    (tmp_path / "twice.txt").write_text("x1\nx2\nx1\n")
    with pytest.raises(ValueError, match=r"twice\.txt lists id 'x1' more than once"):
        readers.read_id_list(tmp_path / "twice.txt")
